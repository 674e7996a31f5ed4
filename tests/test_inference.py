"""Segmenter / Classifier / Chain on tiny bundles saved to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle
from medseg_core.inference import (
    Chain,
    Classifier,
    Segmenter,
    mask_bbox,
    model_input,
    to_channels,
)
from medseg_core.models import build_model
from medseg_core.transforms import normalize_batch, resize_image

MEAN, STD = [0.45, 0.5, 0.55], [0.25, 0.2, 0.3]
TILE, OVERLAP = 48, 24  # margin 12 on each side, core 24: both multiples of the UNet stride (2)
SEG_MODEL = {"name": "unet", "in_channels": 3, "widths": [4, 8]}  # receptive radius about 10 px
CLS_MODEL = {"name": "classifier", "in_channels": 3, "num_classes": 3, "widths": [4, 8]}
CLASS_NAMES = ["normal", "benign", "malignant"]


def _spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw weights with a larger scale so outputs vary visibly across pixels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.25 if p.ndim > 1 else 0.1))
    return model


def _save_seg(root: Path, name: str, model: torch.nn.Module, input_size, mode="tile",
              overlap=OVERLAP, channels=3, threshold=0.5) -> str:
    cfg = make_bundle_config(
        {**SEG_MODEL, "in_channels": channels}, task="segmentation", input_size=input_size,
        mean=MEAN[:channels], std=STD[:channels], threshold=threshold,
        inference={"mode": mode, "tile_overlap": overlap},
    )
    return save_bundle(str(root / name), model, cfg, metrics={"dice": 0.5}, version=f"v-{name}")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def seg_model() -> torch.nn.Module:
    return _spread(build_model(SEG_MODEL), 0).eval()


@pytest.fixture(scope="module")
def seg_uri(root: Path, seg_model: torch.nn.Module) -> str:
    return _save_seg(root, "seg_tile", seg_model, [TILE, TILE])


@pytest.fixture(scope="module")
def cls_uri(root: Path) -> str:
    model = _spread(build_model(CLS_MODEL), 1)
    cfg = make_bundle_config(CLS_MODEL, task="classification", input_size=[32, 32], mean=MEAN,
                             std=STD, threshold=None, class_names=CLASS_NAMES)
    return save_bundle(str(root / "cls"), model, cfg, version="v-cls")


def images_for(seed: int, sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def reference_tiled(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The whole reflect-padded image through the model at once, cropped back: what overlap-tile
    inference must reproduce when the receptive field fits inside the margin."""
    m, core = OVERLAP // 2, TILE - OVERLAP
    h, w = image.shape[:2]
    ny, nx = -(-h // core), -(-w // core)
    padded = np.pad(image, ((m, ny * core - h + m), (m, nx * core - w + m), (0, 0)), mode="reflect")
    with torch.no_grad():
        logits = model(normalize_batch(torch.from_numpy(padded[None]), MEAN, STD))
    return torch.sigmoid(logits)[0, 0].numpy()[m:m + h, m:m + w]


# ----------------------------------------------------------------------------- Segmenter


def test_probabilities_are_resized_alike_along_either_axis_and_thin_images_are_cheap():
    """Back to an image whose one side shrinks and the other grows, PyTorch's antialiased
    kernel in one call took about 7 s for a 1 x 4,000,000 image (it held a Serve replica for
    50 s on a 40-Mpx one), and gave a 4,000,000 x 1 image another result than its transpose.
    Each axis is now resized on its own: a transposed map gives the transposed result, and
    what an axis-wise reference gives."""
    import torch.nn.functional as F

    from medseg_core.inference import resize_probabilities

    prob = torch.rand(64, 48, generator=torch.Generator().manual_seed(0))
    for size in ((1, 5000), (3, 700), (5000, 1), (40, 40), (30, 200), (128, 96)):
        out = resize_probabilities(prob, size)
        flipped = resize_probabilities(prob.T.contiguous(), size[::-1]).T
        assert out.shape == size
        torch.testing.assert_close(out, flipped, atol=1e-6, rtol=0)
        ref = prob[None, None]  # one axis at a time, each antialiased where it shrinks
        for axis in (0, 1):
            target = list(ref.shape[2:])
            target[axis] = size[axis]
            ref = F.interpolate(ref, size=tuple(target), mode="bilinear", align_corners=False,
                                antialias=size[axis] < prob.shape[axis])
        torch.testing.assert_close(out, ref[0, 0].clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(101, 77), (130, 50), (48, 48), (73, 200)])
def test_tiled_equals_whole_padded_image(seg_uri: str, seg_model, size) -> None:
    seg = Segmenter(load_bundle(seg_uri), batch_size=5)
    assert seg.mode == "tile" and seg.margins == (12, 12)
    (image,) = images_for(1, [size])
    prob = seg.predict_proba([image])[0]
    assert prob.shape == size and prob.dtype == np.float32
    expected = reference_tiled(seg_model, image)
    np.testing.assert_allclose(prob, expected, atol=2e-5, rtol=0)
    assert prob.std() > 0.01  # the comparison is not between two constant maps


def test_tile_mode_refuses_an_image_whose_tiles_exceed_the_work_limit(seg_uri: str) -> None:
    """A thin image is few pixels but a long row of whole tiles: refused before any work."""
    from medseg_core.io import ImageTooLargeError

    seg = Segmenter(load_bundle(seg_uri), max_work_pixels=40 * TILE * TILE)
    core = TILE - OVERLAP
    assert seg.work_pixels(1, 100 * core) == 100 * TILE * TILE
    assert seg.work_pixels(4 * core, 4 * core) == 16 * TILE * TILE
    seg.check_work((4 * core, 4 * core, 3))
    thin = np.zeros((1, 100 * core, 3), np.uint8)
    with pytest.raises(ImageTooLargeError, match=f"1x{100 * core} image: tile inference would run"):
        seg.predict_proba([thin])
    from medseg_core.evaluation import FlipTTA

    with pytest.raises(ImageTooLargeError, match="tile inference would run"):
        FlipTTA(seg).check_work(thin.shape)  # the wrapper keeps the limit
    assert seg.predict_proba([images_for(2, [(60, 60)])[0]])[0].shape == (60, 60)
    resize = Segmenter(load_bundle(seg_uri), mode="resize", max_work_pixels=TILE * TILE)
    resize.check_work((1, 10**7, 3))  # one model input whatever the image


def test_tiled_equals_whole_image_inference_away_from_the_border(root: Path, seg_model, seg_uri) -> None:
    """Mode resize with input_size == image size runs the model on the whole image unresized;
    inside the image (beyond the receptive field) it must agree with overlap-tile inference."""
    h, w = 98, 134
    (image,) = images_for(2, [(h, w)])
    whole = Segmenter(load_bundle(_save_seg(root, "seg_whole", seg_model, [h, w], mode="resize")))
    tiled = Segmenter(load_bundle(seg_uri))
    a, b = whole.predict_proba([image])[0], tiled.predict_proba([image])[0]
    r = 12
    np.testing.assert_allclose(a[r:-r, r:-r], b[r:-r, r:-r], atol=2e-5, rtol=0)
    # Near the border they differ (zero padding vs reflected context): the test can tell.
    assert np.abs(a - b).max() > 1e-3


def test_tiled_with_receptive_field_beyond_the_margin_differs(root: Path, seg_model) -> None:
    """Negative control: with almost no overlap, tile seams change the result."""
    uri = _save_seg(root, "seg_thin", seg_model, [TILE, TILE], overlap=2)
    (image,) = images_for(3, [(101, 77)])
    prob = Segmenter(load_bundle(uri)).predict_proba([image])[0]
    assert np.abs(prob - reference_tiled(seg_model, image)).max() > 1e-3


@pytest.mark.parametrize("mode", ["tile", "resize"])
def test_shapes_odd_sizes_and_batches_equal_single(seg_uri: str, mode: str) -> None:
    sizes = [(1, 1), (5, 7), (47, 49), (48, 48), (97, 33), (3, 150), (64, 80)]
    images = images_for(4, sizes)
    seg = Segmenter(load_bundle(seg_uri), batch_size=3, mode=mode)
    batched = seg.predict_proba(images)
    single = Segmenter(load_bundle(seg_uri), batch_size=1, mode=mode)
    for image, size, prob in zip(images, sizes, batched):
        assert prob.shape == size and prob.dtype == np.float32
        assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
        # Batched and single convolutions may pick different kernels: float-level differences.
        np.testing.assert_allclose(prob, single.predict_proba([image])[0], atol=1e-4, rtol=0)


def test_resize_mode_maps_back_to_original_size(root: Path, seg_model) -> None:
    uri = _save_seg(root, "seg_resize", seg_model, [TILE, TILE], mode="resize")
    seg = Segmenter(load_bundle(uri))
    assert seg.mode == "resize"
    (image,) = images_for(5, [(TILE, TILE)])
    # At the input size the map is the model's output unchanged.
    with torch.no_grad():
        direct = torch.sigmoid(seg_model(normalize_batch(torch.from_numpy(image[None]), MEAN, STD)))
    np.testing.assert_allclose(seg.predict_proba([image])[0], direct[0, 0].numpy(), atol=1e-6)
    # Other sizes: the model runs on the bilinear resize, its map is resized back bilinearly.
    for size in [(96, 96), (30, 70)]:
        (other,) = images_for(5, [size])
        small = resize_image(other, (TILE, TILE))
        with torch.no_grad():
            p = torch.sigmoid(seg_model(normalize_batch(torch.from_numpy(small[None]), MEAN, STD)))
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False,
                              antialias=min(size) < TILE)
        got = seg.predict_proba([other])[0]
        assert got.shape == size
        np.testing.assert_allclose(got, p[0, 0].clamp(0, 1).numpy(), atol=1e-5, rtol=0)


def test_predict_thresholds(seg_uri: str) -> None:
    seg = Segmenter(load_bundle(seg_uri))
    images = images_for(6, [(60, 70), (33, 41)])
    probs = seg.predict_proba(images)
    masks = seg.predict(images)
    for p, m in zip(probs, masks):
        assert m.dtype == np.uint8 and m.shape == p.shape
        np.testing.assert_array_equal(m, (p > seg.threshold).astype(np.uint8))
    t = float(np.median(probs[0]))
    m = seg.predict(images[:1], threshold=t)[0]
    np.testing.assert_array_equal(m, (probs[0] > t).astype(np.uint8))
    assert 0 < m.mean() < 1
    # as the jobs and the endpoint take it: 1.5 or NaN made every mask empty, -0.2 every mask full
    for bad in (1.0, 1.5, -0.2, 0.0, float("nan"), "0.3x"):
        with pytest.raises(ValueError, match="threshold"):
            seg.predict(images[:1], threshold=bad)


def test_channel_conversion(root: Path, seg_uri: str) -> None:
    seg = Segmenter(load_bundle(seg_uri))
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((40, 52, 1), 9, np.uint8)], axis=2)
    expected = seg.predict_proba([rgb])[0]
    grey_alpha = np.stack([grey, np.full_like(grey, 200)], axis=2)
    for variant in (grey, grey[:, :, None], rgba, grey_alpha):
        np.testing.assert_array_equal(seg.predict_proba([variant])[0], expected)
    # A one-channel model sees RGB input as PIL's luma.
    one = _spread(build_model({**SEG_MODEL, "in_channels": 1}), 3)
    seg1 = Segmenter(load_bundle(_save_seg(root, "seg_grey", one, [TILE, TILE], channels=1)))
    colour = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    np.testing.assert_array_equal(seg1.predict_proba([colour])[0], seg1.predict_proba([luma])[0])
    assert to_channels(colour, 1).shape == (40, 52, 1)


def test_model_input_resizes_a_grey_plane_before_repeating_it() -> None:
    rng = np.random.default_rng(11)
    grey = rng.integers(0, 256, (37, 61), dtype=np.uint8)
    variants = [grey, grey[:, :, None], np.stack([grey, np.full_like(grey, 3)], axis=2),
                rng.integers(0, 256, (37, 61, 3), dtype=np.uint8), grey > 99]
    for image in variants:
        for channels in (1, 3):
            want = resize_image(to_channels(image, channels), (24, 32))
            got = model_input(image, channels, (24, 32))
            assert got.shape == (24, 32, channels)
            np.testing.assert_array_equal(got, want)


def test_input_validation(seg_uri: str) -> None:
    seg = Segmenter(load_bundle(seg_uri))
    assert seg.predict([]) == []
    with pytest.raises(TypeError):
        seg.predict(np.zeros((10, 10, 3), np.uint8))  # one image, not a list
    with pytest.raises(TypeError):
        seg.predict([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError):
        seg.predict([np.zeros((10, 10, 5), np.uint8)])
    with pytest.raises(ValueError):
        Segmenter(load_bundle(seg_uri), mode="sliding")
    # An (N,H,W,C) array is a batch.
    stacked = np.stack(images_for(8, [(20, 20), (20, 20)]))
    assert len(seg.predict(stacked)) == 2


def test_fractional_overlap_from_config(root: Path, seg_model) -> None:
    uri = _save_seg(root, "seg_frac", seg_model, [40, 64], overlap=0.25)
    assert Segmenter(load_bundle(uri)).margins == (5, 8)


# ----------------------------------------------------------------------------- Classifier


def test_classifier_probabilities(cls_uri: str) -> None:
    clf = Classifier(load_bundle(cls_uri), batch_size=2)
    rng = np.random.default_rng(9)
    images = images_for(9, [(50, 60), (32, 32), (17, 90)])
    masks = [(rng.random(im.shape[:2]) > 0.7).astype(np.uint8) for im in images]
    probs = clf.predict(images, masks)
    assert probs.shape == (3, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    single = np.concatenate([clf.predict([im], [m]) for im, m in zip(images, masks)])
    np.testing.assert_allclose(probs, single, atol=1e-5)
    # The mask is an input: a different mask changes the answer.
    other = clf.predict(images[:1], [1 - masks[0]])
    assert np.abs(other - probs[:1]).max() > 1e-4
    # bool masks and 0/255 masks mean the same as 0/1.
    np.testing.assert_allclose(clf.predict(images[:1], [masks[0].astype(bool)]), probs[:1], atol=1e-6)
    np.testing.assert_allclose(clf.predict(images[:1], [masks[0] * 255]), probs[:1], atol=1e-6)
    with pytest.raises(ValueError):
        clf.predict(images[:2], masks[:1])
    with pytest.raises(ValueError):
        clf.predict(images[:1], [masks[1]])
    assert clf.predict([], []).shape == (0, 3)


# ----------------------------------------------------------------------------- Chain


def test_chain_outputs_are_consistent(seg_uri: str, cls_uri: str) -> None:
    chain = Chain.from_uris(seg_uri, cls_uri, device="cpu")
    assert chain.versions == {"segmenter": "v-seg_tile", "classifier": "v-cls"}
    images = images_for(10, [(90, 70), (41, 123), (48, 48)])
    probs = chain.segmenter.predict_proba(images)
    t = float(np.median(probs[0]))
    results = chain.predict(images, threshold=t)
    assert len(results) == 3
    expected_masks = chain.segmenter.predict(images, threshold=t)
    cls_probs = chain.classifier.predict(images, expected_masks)
    for image, res, exp_mask, p in zip(images, results, expected_masks, cls_probs):
        mask = res["mask"]
        assert set(res) == {"mask", "label", "label_name", "probabilities", "lesion_area_fraction", "bbox"}
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, exp_mask)
        assert res["lesion_area_fraction"] == pytest.approx(mask.sum() / mask.size)
        assert list(res["probabilities"]) == CLASS_NAMES
        assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(list(res["probabilities"].values()), p, atol=1e-6)
        assert res["label"] == int(np.argmax(p)) and res["label_name"] == CLASS_NAMES[res["label"]]
        if mask.any():
            x0, y0, x1, y1 = res["bbox"]
            assert all(isinstance(v, int) for v in res["bbox"])
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = 1
            assert mask[inside == 0].sum() == 0  # bbox encloses the mask
            # ... tightly: every edge row/column of the box holds a mask pixel.
            assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        else:
            assert res["bbox"] is None
    assert 0 < results[0]["lesion_area_fraction"] < 1


def test_chain_empty_and_full_masks(seg_uri: str, cls_uri: str) -> None:
    chain = Chain(Segmenter(load_bundle(seg_uri)), Classifier(load_bundle(cls_uri)))
    (image,) = images_for(11, [(30, 45)])
    proba = chain.segmenter.predict_proba([image])[0]
    assert 0 < proba.min() and proba.max() < 1
    # the next float32 values (the maps' type, which a Python float threshold is compared in)
    above, below = (float(np.nextafter(p, np.float32(t))) for p, t in ((proba.max(), 1),
                                                                        (proba.min(), 0)))
    empty = chain.predict([image], threshold=above)[0]
    assert empty["bbox"] is None and empty["lesion_area_fraction"] == 0.0 and empty["mask"].sum() == 0
    full = chain.predict([image], threshold=below)[0]
    assert full["bbox"] == [0, 0, 45, 30] and full["lesion_area_fraction"] == 1.0
    assert chain.predict([]) == []


def test_chain_without_classifier(seg_uri: str) -> None:
    chain = Chain.from_uris(seg_uri, None)
    assert chain.versions == {"segmenter": "v-seg_tile", "classifier": None}
    (res,) = chain.predict(images_for(12, [(20, 30)]))
    assert res["label"] == -1 and res["label_name"] is None and res["probabilities"] == {}


def test_mask_bbox() -> None:
    m = np.zeros((10, 12), np.uint8)
    assert mask_bbox(m) is None
    m[2, 3] = 1
    m[6, 9] = 1
    assert mask_bbox(m) == [3, 2, 10, 7]


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_channels_last_gives_the_same_results(root: Path, seg_model, cls_uri: str,
                                              mode: str) -> None:
    uri = _save_seg(root, f"seg_nhwc_{mode}", seg_model, [TILE, TILE], mode=mode)
    images = images_for(11, [(40, 56), (70, 33)])
    nhwc = Segmenter(load_bundle(uri), batch_size=2, channels_last=True)
    nchw = Segmenter(load_bundle(uri), batch_size=2, channels_last=False)
    assert nhwc.channels_last and not nchw.channels_last
    assert next(nhwc.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(nhwc.predict_proba(images), nchw.predict_proba(images)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    masks = nchw.predict(images)
    probs = [Classifier(load_bundle(cls_uri), channels_last=flag).predict(images, masks)
             for flag in (True, False)]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


def test_channels_last_default_follows_the_model_and_the_bundle(root: Path, seg_model) -> None:
    uri = _save_seg(root, "seg_layout", seg_model, [TILE, TILE], mode="resize")
    assert Segmenter(load_bundle(uri)).channels_last  # batch-norm / plain convolutions
    spec = {**SEG_MODEL, "norm": "instance"}
    cfg = make_bundle_config(spec, task="segmentation", input_size=[TILE, TILE], mean=MEAN,
                             std=STD)
    inst_uri = save_bundle(str(root / "seg_inst"), build_model(spec), cfg, version="v-inst")
    assert not Segmenter(load_bundle(inst_uri)).channels_last  # instance norm: NCHW is faster
    bundle = load_bundle(uri)
    bundle.config["inference"] = {**bundle.config["inference"], "channels_last": False}
    assert not Segmenter(bundle).channels_last


def test_chain_clears_the_masks_of_images_classified_lesion_free(root: Path, seg_uri: str,
                                                                 cls_uri: str) -> None:
    """A classifier bundle's `lesion_free_classes` (chosen when training): an image classified
    as one of them gets an empty mask, area and bbox; the others keep the segmenter's."""

    class Scripted(Classifier):  # the bundle's classifier, its labels set per image
        def predict(self, images, masks):
            return np.eye(3, dtype=np.float32)[[0, 1, 2, 0][:len(images)]]

    bundle = load_bundle(cls_uri)
    assert Classifier(bundle).lesion_free == ()
    uri = save_bundle(str(root / "cls_free"), bundle.model,
                      {**bundle.config, "lesion_free_classes": ["normal"]}, version="v-cls+clear")
    images = images_for(13, [(30, 45), (40, 32), (28, 28), (50, 36)])
    plain = Chain(Segmenter(load_bundle(seg_uri)), Scripted(bundle)).predict(images)
    classifier = Scripted(load_bundle(uri))
    assert classifier.lesion_free == ("normal",)
    cleared = Chain(Segmenter(load_bundle(seg_uri)), classifier).predict(images)
    assert [r["label_name"] for r in cleared] == ["normal", "benign", "malignant", "normal"]
    assert all(0 < r["lesion_area_fraction"] < 1 for r in plain)  # something to clear or keep
    for before, after in zip(plain, cleared):
        assert after["probabilities"] == before["probabilities"]
        if after["label_name"] == "normal":
            assert not after["mask"].any() and after["mask"].shape == before["mask"].shape
            assert after["lesion_area_fraction"] == 0.0 and after["bbox"] is None
        else:
            assert np.array_equal(after["mask"], before["mask"]) and after["bbox"] == before["bbox"]


@pytest.mark.parametrize("native", [True, False])
def test_amp_on_a_cpu_runs_bf16_only_where_the_cpu_has_it(root: Path, seg_model, cls_uri: str,
                                                          fake_native_bf16, native: bool) -> None:
    """`amp=True` on a CPU: bf16 autocast where the CPU computes bf16 natively, results close to
    float32's and still float32 arrays; elsewhere a warning and exactly the float32 results.
    The default (None) stays float32 on CPUs."""
    import warnings

    fake_native_bf16(native)
    uri = _save_seg(root, "seg_amp", seg_model, [TILE, TILE], mode="resize")
    images = images_for(12, [(40, 56), (48, 48)])
    plain = Segmenter(load_bundle(uri))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        amp = Segmenter(load_bundle(uri), amp=True)
        clf_amp = Classifier(load_bundle(cls_uri), amp=True)
    warned = [w for w in caught if "no native bf16" in str(w.message)]
    assert len(warned) == (0 if native else 2)
    assert plain.amp_dtype is None
    assert amp.amp_dtype == clf_amp.amp_dtype == (torch.bfloat16 if native else None)

    computed: list[torch.dtype] = []
    conv = next(m for m in amp.model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
    try:
        got = amp.predict_proba(images)
    finally:
        hook.remove()
    assert set(computed) == {torch.bfloat16 if native else torch.float32}
    masks = plain.predict(images)
    probs = [c.predict(images, masks) for c in (clf_amp, Classifier(load_bundle(cls_uri)))]
    for a, b in zip(got, plain.predict_proba(images)):
        assert a.dtype == np.float32
        if native:
            np.testing.assert_allclose(a, b, atol=0.05)  # bf16 keeps 8 bits of mantissa
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)
    assert probs[0].dtype == np.float32
    if native:
        np.testing.assert_allclose(probs[0], probs[1], atol=0.05)
    else:
        np.testing.assert_array_equal(probs[0], probs[1])


def test_predictors_refuse_the_other_task_and_inputs_that_are_not_arrays(seg_uri, cls_uri):
    """A bundle of the other task built without error and failed at its first forward pass; a
    PIL image failed deep in the segmenter and a 1xHxW mask was blamed on the image's size."""
    from PIL import Image

    with pytest.raises(ValueError, match=r"is a 'classification' bundle; Segmenter needs a "
                                         r"'segmentation' one"):
        Segmenter(load_bundle(cls_uri))
    with pytest.raises(ValueError, match=r"is a 'segmentation' bundle; Classifier needs a "
                                         r"'classification' one"):
        Classifier(load_bundle(seg_uri))
    with pytest.raises(ValueError, match=r"is a 'classification' bundle; Segmenter needs"):
        Chain.from_uris(cls_uri, seg_uri)  # the two swapped
    seg, clf = Segmenter(load_bundle(seg_uri)), Classifier(load_bundle(cls_uri))
    (image,) = images_for(13, [(20, 24)])
    for bad in (Image.fromarray(image), image.tobytes(), "image.png"):
        with pytest.raises(TypeError, match=r"image 0 is a \w+, not a numpy array"):
            seg.predict([bad])
        with pytest.raises(TypeError, match=r"image 0 is a \w+, not a numpy array"):
            clf.predict([bad], [np.zeros((20, 24), np.uint8)])
    with pytest.raises(ValueError, match=r"mask 0 must be HxW, got shape \(1, 20, 24\)"):
        clf.predict([image], [np.zeros((1, 20, 24), np.uint8)])
    for bad in (2.5, True, 0):  # 2.5 and True were taken
        with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
            Segmenter(load_bundle(seg_uri), batch_size=bad)
    if not torch.cuda.is_available():  # torch's bare AssertionError before
        with pytest.raises(ValueError, match="torch sees no such CUDA device here"):
            Segmenter(load_bundle(seg_uri), device="cuda")
