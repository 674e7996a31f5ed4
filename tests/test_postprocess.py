"""Largest-component post-processing: the labelling, the Segmenter option and the choice made
after training on the validation split; and the chain's mask clearing, chosen the same way."""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle
from medseg_core.inference import Segmenter
from medseg_core.layouts import list_records
from medseg_core.models import build_model
from medseg_core.postprocess import component_labels, keep_largest
from pipelines import tuning
from pipelines.config import load_config
from pipelines.tuning import POSTPROCESS, choose_postprocess

SEG_MODEL = {"name": "unet", "in_channels": 3, "widths": [4, 8]}


def bfs_components(mask: np.ndarray) -> np.ndarray:
    """Reference 8-connected labelling (1..n, 0 = background) by breadth-first search."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=int)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_components_match_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 21, 26)) > rng.uniform(0.35, 0.75)
    got = component_labels(torch.from_numpy(masks)).numpy()
    for mask, labels in zip(masks, got):
        ref = bfs_components(mask)
        assert ((labels > 0) == mask).all()
        pairs = set(zip(ref[mask].tolist(), labels[mask].tolist()))
        # the same partition: a one-to-one map between reference and computed labels
        assert len(pairs) == len(np.unique(ref[mask])) == len(np.unique(labels[mask]))


def test_keep_largest_keeps_one_component_per_mask():
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True                       # 4 px
    masks[0, 6:10, 6:10] = True                     # 16 px
    masks[0, 5, 5] = True                           # touches the 16 px block diagonally
    masks[1, 0, 0] = masks[1, 11, 11] = True        # a tie: the later pixel's component wins
    out = keep_largest(masks)
    expected0 = torch.zeros(12, 12, dtype=torch.bool)
    expected0[6:10, 6:10] = True
    expected0[5, 5] = True
    assert torch.equal(out[0], expected0)
    assert out[1].nonzero().tolist() == [[11, 11]]
    assert not out[2].any()                         # empty stays empty


def _bundle(tmp_path: Path, keep: bool | None = None) -> str:
    torch.manual_seed(0)
    inference = {"mode": "resize", "tile_overlap": 0.25}
    if keep is not None:
        inference["keep_largest"] = keep
    cfg = make_bundle_config(SEG_MODEL, task="segmentation", input_size=[32, 32],
                             mean=[0.5] * 3, std=[0.25] * 3, threshold=0.5, inference=inference)
    return save_bundle(str(tmp_path / "seg"), build_model(SEG_MODEL), cfg, version="v0")


def _two_blobs(batch: np.ndarray) -> torch.Tensor:
    probs = torch.full((len(batch), 32, 32), 0.05)
    probs[:, 4:8, 4:8] = 0.9       # small lesion
    probs[:, 16:28, 14:30] = 0.9   # large lesion
    return probs


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_segmenter_keeps_the_largest_lesion_at_original_size(tmp_path, mode):
    uri = _bundle(tmp_path, keep=True)
    image = np.zeros((64, 64, 3), dtype=np.uint8) if mode == "resize" else \
        np.zeros((32, 32, 3), dtype=np.uint8)
    masks = {}
    for keep in (False, True):
        seg = Segmenter(load_bundle(uri), mode=mode, tile_overlap=0,
                        keep_largest=None if keep else False)
        assert seg.keep_largest is keep
        seg._probabilities = _two_blobs
        masks[keep] = seg.predict([image])[0]
    scale = image.shape[0] // 32
    big = np.zeros(image.shape[:2], dtype=bool)
    big[16 * scale:28 * scale, 14 * scale:30 * scale] = True
    small = np.zeros(image.shape[:2], dtype=bool)
    small[4 * scale:8 * scale, 4 * scale:8 * scale] = True
    assert masks[False][small].all() and masks[False][big].all()
    assert not masks[True][small].any() and masks[True][big].all()
    assert masks[True].sum() == masks[False].sum() - small.sum()


def test_flip_averages_the_image_and_its_mirror(tmp_path):
    seg = Segmenter(load_bundle(_bundle(tmp_path)), flip=True)
    # a stand-in model that looks left (a running sum along x): mirroring changes its output
    seg.model = lambda x: x[:, :1].cumsum(-1)  # logits
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    x = seg._normalize(image)[:, 0]
    expected = (torch.sigmoid(x.cumsum(-1)) + torch.sigmoid(x.flip(-1).cumsum(-1)).flip(-1)) / 2
    assert torch.allclose(seg._probabilities(image), expected)
    seg.flip = False
    assert torch.allclose(seg._probabilities(image), torch.sigmoid(x.cumsum(-1)))


def test_choose_postprocess_sets_the_bundle_from_validation_dice(tmp_path, synthetic_archive):
    records = list_records(synthetic_archive, "busi").records[:6]
    cfg = load_config([f"output_dir={tmp_path}", "data.image_size=[32,32]"])
    uri = _bundle(tmp_path)
    weights = load_bundle(uri).model.state_dict()
    scores = {name: tuning.test_dice(uri, records, cfg, flip=flip, keep_largest=keep)["dice"]
              for name, (flip, keep) in POSTPROCESS.items()}
    best = max(scores.values())
    choice = choose_postprocess(uri, records, cfg)
    assert scores[choice] == best
    assert choice == next(n for n in POSTPROCESS if scores[n] == best)  # cheapest of the best
    bundle = load_bundle(uri)
    flip, keep = POSTPROCESS[choice]
    assert bundle.config["inference"].get("flip", False) is flip
    assert bundle.config["inference"].get("keep_largest", False) is keep
    assert bundle.version == ("v0" if choice == "none" else f"v0+{choice}")
    for mode in ("largest", "largest", "flip+largest", "none", "flip"):
        before = load_bundle(uri)
        cfg["train"]["postprocess"] = mode
        assert choose_postprocess(uri, records, cfg) == mode
        after = load_bundle(uri)
        flip, keep = POSTPROCESS[mode]
        assert after.config["inference"].get("flip", False) is flip
        assert after.config["inference"].get("keep_largest", False) is keep
        assert after.version == ("v0" if mode == "none" else f"v0+{mode}")
        if before.version == after.version:
            assert after.metrics == before.metrics  # the same setting: not rewritten
        else:
            assert after.metrics["postprocess"]["choice"] == mode
    after = load_bundle(uri).model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    cfg["train"]["postprocess"] = "biggest"
    with pytest.raises(ValueError, match="train.postprocess"):
        choose_postprocess(uri, records, cfg)


CLS_MODEL = {"name": "classifier", "in_channels": 3, "num_classes": 3, "widths": [4, 8]}


def _constant(model: torch.nn.Module, kind: type, bias: list[float]) -> torch.nn.Module:
    """The model with its last `kind` layer (the output layer) giving `bias` everywhere."""
    last = [m for m in model.modules() if isinstance(m, kind)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(bias))
    return model


def _constant_bundles(tmp_path: Path) -> tuple[str, str]:
    """A segmenter that marks every pixel and a classifier that says `normal` to every image."""
    seg_cfg = make_bundle_config(SEG_MODEL, task="segmentation", input_size=[32, 32],
                                 mean=[0.5] * 3, std=[0.25] * 3, threshold=0.5)
    seg = save_bundle(str(tmp_path / "seg"), _constant(build_model(SEG_MODEL),
                                                        torch.nn.Conv2d, [20.0]), seg_cfg)
    cls_cfg = make_bundle_config(CLS_MODEL, task="classification", input_size=[32, 32],
                                 mean=[0.5] * 3, std=[0.25] * 3, threshold=None,
                                 class_names=["normal", "benign", "malignant"])
    cls = save_bundle(str(tmp_path / "cls"), _constant(build_model(CLS_MODEL), torch.nn.Linear,
                                                        [5.0, 0.0, 0.0]), cls_cfg, version="c0")
    return seg, cls


def test_chain_scores_keep_and_clear_the_masks_of_lesion_free_classes(tmp_path, synthetic_archive):
    records = list_records(synthetic_archive, "busi").records
    assert {r.label for r in records} == {0, 1, 2}  # normal images (empty masks) and lesions
    cfg = load_config([f"output_dir={tmp_path}", "data.image_size=[32,32]"])
    seg, cls = _constant_bundles(tmp_path)
    scores = tuning.chain_scores(seg, cls, records, cfg, ("normal",))
    assert scores["kept"] == tuning.test_dice(seg, records, cfg)  # the segmenter's own masks
    assert 0 < scores["kept"]["dice"] < 1
    assert scores["cleared"]["dice"] == 0.0  # every image called normal: no lesion pixel found
    other = tuning.chain_scores(seg, cls, records, cfg, ("benign",))
    assert other["cleared"] == other["kept"]


def test_choose_mask_clearing_sets_the_classifier_bundle_from_validation_dice(
        tmp_path, synthetic_archive, monkeypatch):
    records = list_records(synthetic_archive, "busi").records
    normal = [r for r in records if r.label == 0]
    cfg = load_config([f"output_dir={tmp_path}", "data.image_size=[32,32]"])
    seg, cls = _constant_bundles(tmp_path)
    weights = load_bundle(cls).model.state_dict()

    # only normal images: clearing their masks (the segmenter marks everything) scores 1 vs 0
    assert tuning.choose_mask_clearing(cls, seg, normal, cfg) == ("normal",)
    bundle = load_bundle(cls)
    assert bundle.config["lesion_free_classes"] == ["normal"] and bundle.version == "c0+clear"
    assert bundle.metrics["clear_masks"]["val_dice"] == {"kept": 0.0, "cleared": 1.0}
    assert all(torch.equal(weights[k], v) for k, v in bundle.model.state_dict().items())
    # the run's closing lines then give the chain's Dice beside the segmenter's
    from pipelines.train import summarize

    lines = summarize(cfg, {"segmenter": seg, "classifier": cls}, {"test": normal})
    assert lines[-2:] == [f"test split ({len(normal)} images): Dice 0.0000  IoU 0.0000",
                          "  through the chain (masks of images classified normal cleared): "
                          "Dice 1.0000  IoU 1.0000"]
    # lesions as well: clearing loses them, and the masks are kept again
    assert tuning.choose_mask_clearing(cls, seg, records, cfg) == ()
    bundle = load_bundle(cls)
    assert bundle.config["lesion_free_classes"] == [] and bundle.version == "c0"

    # a "normal" validation image with a lesion: the setting does not fit the data
    relabelled = [*normal, dataclasses.replace(next(r for r in records if r.label == 1), label=0)]
    with pytest.warns(UserWarning, match="1 validation image"):
        assert tuning.choose_mask_clearing(cls, seg, relabelled, cfg) == ()

    monkeypatch.setattr(tuning, "chain_scores", lambda *a, **k: pytest.fail("scored"))
    cfg["train"]["clear_masks"] = True
    assert tuning.choose_mask_clearing(cls, seg, records, cfg) == ("normal",)
    assert load_bundle(cls).config["lesion_free_classes"] == ["normal"]
    cfg["train"]["clear_masks"] = False
    assert tuning.choose_mask_clearing(cls, seg, normal, cfg) == ()
    cfg["train"]["clear_masks"] = "auto"
    assert tuning.choose_mask_clearing(cls, None, normal, cfg) == ()  # no segmenter to score
    cfg["data"]["lesion_free_classes"] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.choose_mask_clearing(cls, seg, relabelled, cfg) == ()

    for key, value, message in (("train", "sometimes", "train.clear_masks must be"),
                                ("data", ["healthy"], "data.lesion_free_classes must list")):
        bad = {**cfg, key: {**cfg[key], ("clear_masks" if key == "train" else
                                          "lesion_free_classes"): value}}
        with pytest.raises(ValueError, match=message):
            tuning.choose_mask_clearing(cls, seg, records, bad)
