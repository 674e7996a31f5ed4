"""Joint image/mask transforms: alignment, exactness of flips, seeding, normalisation and the
on-device batch augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg_core.transforms import (
    Compose,
    GpuAugment,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    Resize,
    augment_batch,
    build_transforms,
    normalize_batch,
    to_channels,
    to_unit_float,
)

AUG = {"rotate": 180, "shift": 0.1, "scale": [0.9, 1.1], "hflip": 0.5, "vflip": 0.5}


def blobs(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of a few random ellipses (uint8 0/1)."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(4):
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        ry, rx = rng.uniform(4, h / 5), rng.uniform(4, w / 5)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m.astype(np.uint8)


def sample_for(seed: int, h: int = 96, w: int = 128) -> dict:
    """Image whose channel 0 is 255 * mask; the other channels are noise and a ramp."""
    rng = np.random.default_rng(seed)
    mask = blobs(h, w, rng)
    ramp = np.tile(np.linspace(0, 255, w), (h, 1))
    image = np.stack([mask * 255, rng.integers(0, 256, (h, w)), ramp], axis=2).astype(np.uint8)
    return {"id": f"s{seed}", "image": image, "mask": mask, "label": 2}


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds both mask values."""
    p = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    stack = np.stack([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return stack.max(0) != stack.min(0)


def disagreement(channel0: np.ndarray, mask: np.ndarray, level: float) -> tuple[int, int, int]:
    """(pixels where thresholded channel 0 and mask differ, of those off the mask boundary band,
    band size)."""
    diff = (channel0 > level) != (mask > 0)
    band = boundary_band(mask)
    return int(diff.sum()), int((diff & ~band).sum()), int(band.sum())


def assert_aligned(channel0: np.ndarray, mask: np.ndarray, level: float) -> None:
    diff, off_band, band = disagreement(channel0, mask, level)
    assert mask.any() and band > 0
    assert off_band == 0, f"{off_band} disagreeing pixels away from the mask boundary"
    # Interpolation flips under 10% of the band here; a 1-pixel shift flips over a quarter.
    assert diff <= 0.15 * band, f"{diff} of {band} boundary pixels disagree"


# ----------------------------------------------------------------------------- CPU transforms


def test_alignment_metric_detects_a_one_pixel_shift() -> None:
    s = sample_for(0)
    shifted = np.roll(s["mask"], 1, axis=1)
    with pytest.raises(AssertionError):
        assert_aligned(s["image"][..., 0], shifted, 127)


def test_resize_shapes_kinds_and_alignment() -> None:
    s = sample_for(1)
    out = Resize((77, 101))(s, np.random.default_rng(0))
    assert out["image"].shape == (77, 101, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (77, 101) and set(np.unique(out["mask"])) <= {0, 1}
    assert out["id"] == "s1" and out["label"] == 2
    assert_aligned(out["image"][..., 0], out["mask"], 127)
    # Bilinear keeps a constant image constant; int size means a square.
    const = {"image": np.full((30, 50, 3), 77, np.uint8), "mask": np.ones((30, 50), np.uint8)}
    sq = Resize(64)(const)
    assert sq["image"].shape == (64, 64, 3) and (sq["image"] == 77).all() and (sq["mask"] == 1).all()


def test_resize_to_same_size_is_identity_and_mask_optional() -> None:
    s = sample_for(2)
    out = Resize((96, 128))({"image": s["image"]})
    assert "mask" not in out
    np.testing.assert_array_equal(out["image"], s["image"])


def test_flips_are_exact() -> None:
    s = sample_for(3)
    rng = np.random.default_rng(0)
    h = RandomFlip(1.0, 0.0)(s, rng)
    np.testing.assert_array_equal(h["image"], s["image"][:, ::-1])
    np.testing.assert_array_equal(h["mask"], s["mask"][:, ::-1])
    v = RandomFlip(0.0, 1.0)(s, rng)
    np.testing.assert_array_equal(v["image"], s["image"][::-1])
    np.testing.assert_array_equal(v["mask"], s["mask"][::-1])
    none = RandomFlip(0.0, 0.0)(s, rng)
    np.testing.assert_array_equal(none["image"], s["image"])
    # With p = 0.5 both outcomes occur over seeds.
    flipped = {bool((RandomFlip(0.5, 0)(s, np.random.default_rng(k))["mask"] != s["mask"]).any())
               for k in range(20)}
    assert flipped == {True, False}


def test_affine_identity_rotation_and_fill() -> None:
    s = sample_for(4, 31, 47)
    ident = RandomAffine(0, 0, (1, 1))(s, np.random.default_rng(0))
    np.testing.assert_array_equal(ident["image"], s["image"])
    np.testing.assert_array_equal(ident["mask"], s["mask"])
    # A 180 degree rotation about the centre is both flips, exactly, for image and mask.
    rot = RandomAffine.apply(s, np.array([[-1.0, 0, 0], [0, -1.0, 0]]))
    np.testing.assert_array_equal(rot["image"], s["image"][::-1, ::-1])
    np.testing.assert_array_equal(rot["mask"], s["mask"][::-1, ::-1])
    # An integer shift moves content and fills the uncovered strip with 0 in both.
    full = {"image": np.full((20, 30, 3), 200, np.uint8), "mask": np.ones((20, 30), np.uint8)}
    shifted = RandomAffine.apply(full, np.array([[1.0, 0, 5], [0, 1.0, -3]]))
    assert (shifted["image"][:, :5] == 0).all() and (shifted["mask"][:, :5] == 0).all()
    assert (shifted["image"][-3:] == 0).all() and (shifted["mask"][-3:] == 0).all()
    assert (shifted["image"][:-3, 5:] == 200).all() and (shifted["mask"][:-3, 5:] == 1).all()


@pytest.mark.parametrize("seed", range(12))
def test_random_affine_keeps_image_and_mask_aligned(seed: int) -> None:
    s = sample_for(seed)
    out = RandomAffine(180, 0.1, (0.9, 1.1))(s, np.random.default_rng(seed))
    assert set(np.unique(out["mask"])) <= {0, 1}
    assert not np.array_equal(out["mask"], s["mask"])
    assert_aligned(out["image"][..., 0], out["mask"], 127)


@pytest.mark.parametrize("seed", range(8))
def test_training_pipeline_keeps_alignment(seed: int) -> None:
    cfg = {"size": [64, 80], "brightness": 0.0, "contrast": 0.0, **AUG}
    out = build_transforms(cfg, train=True)(sample_for(seed), np.random.default_rng(seed))
    assert out["image"].shape == (64, 80, 3) and out["mask"].shape == (64, 80)
    assert_aligned(out["image"][..., 0], out["mask"], 127)


def test_three_channels_in_one_pil_call_equal_plane_by_plane() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (83, 117, 3), dtype=np.uint8)
    mask = blobs(83, 117, rng)
    steps = [Resize((64, 40)), Resize((200, 150))]
    forward = RandomAffine(30, 0.1, (0.8, 1.2)).sample_params(rng, 83, 117)
    for step in (*steps, lambda s, rng=None: RandomAffine.apply(s, forward)):
        whole = step({"image": image, "mask": mask})
        planes = [step({"image": image[:, :, c:c + 1], "mask": mask})["image"] for c in range(3)]
        np.testing.assert_array_equal(whole["image"], np.concatenate(planes, axis=2))


@pytest.mark.parametrize("seed", range(3))
def test_grey_plane_through_the_pipeline_equals_its_repeated_rgb(seed: int) -> None:
    """keep_grey decoding: one plane augmented, then repeated, is the 3-channel result."""
    s = sample_for(seed)
    grey = s["image"][:, :, 1:2]
    tf = build_transforms({"size": [64, 80], **AUG, "brightness": 0.2, "contrast": 0.3},
                          train=True)
    one = tf({**s, "image": grey}, np.random.default_rng(seed))
    three = tf({**s, "image": np.repeat(grey, 3, axis=2)}, np.random.default_rng(seed))
    assert one["image"].shape == (64, 80, 1)
    np.testing.assert_array_equal(to_channels(one["image"], 3), three["image"])
    np.testing.assert_array_equal(one["mask"], three["mask"])


def test_same_seed_same_output_different_seed_different() -> None:
    t = build_transforms({"size": 64, "brightness": 0.2, "contrast": 0.2, **AUG}, train=True)
    s = sample_for(5)
    a = t(s, np.random.default_rng(123))
    b = t(s, np.random.default_rng(123))
    c = t(s, np.random.default_rng(124))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])
    # The input is never modified in place.
    np.testing.assert_array_equal(s["image"], sample_for(5)["image"])


def test_brightness_contrast_is_image_only() -> None:
    s = sample_for(6)
    s["image"] = (s["image"] // 2 + 60).astype(np.uint8)  # room on both sides, no clipping
    out = RandomBrightnessContrast(0.1, 0.0)(s, np.random.default_rng(0))
    assert out["mask"] is s["mask"]
    delta = out["image"].astype(int) - s["image"].astype(int)
    assert delta.min() == delta.max() != 0  # pure brightness: one offset everywhere
    out = RandomBrightnessContrast(0.0, 0.3)(s, np.random.default_rng(1))
    ratio = out["image"].astype(float).std() / s["image"].astype(float).std()
    assert ratio != pytest.approx(1.0, abs=1e-3) and 0.69 < ratio < 1.31
    same = RandomBrightnessContrast(0.0, 0.0)(s, np.random.default_rng(2))
    np.testing.assert_array_equal(same["image"], s["image"])


def test_build_transforms_eval_is_resize_only() -> None:
    cfg = {"size": [40, 60], "brightness": 0.3, "contrast": 0.3, **AUG}
    ev = build_transforms(cfg, train=False)
    assert len(ev) == 1 and isinstance(ev.transforms[0], Resize)
    s = sample_for(7)
    a, b = ev(s, np.random.default_rng(0)), ev(s, np.random.default_rng(1))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (40, 60, 3)
    tr = build_transforms(cfg, train=True)
    kinds = [type(t) for t in tr.transforms]
    assert kinds == [Resize, RandomFlip, RandomAffine, RandomBrightnessContrast]
    assert tr.transforms[2].scale_range == (0.9, 1.1)
    assert build_transforms({"size": 8, "scale": 0.2}, train=True).transforms[1].scale_range == (0.8, 1.2)
    assert isinstance(build_transforms({}, train=True), Compose)


# ----------------------------------------------------------------------------- torch side


def test_normalize_batch_values_and_layout() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    out = normalize_batch(torch.from_numpy(batch), mean, std)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    expected = (batch.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    grey = normalize_batch(torch.from_numpy(batch[..., :1]), 0.5, 0.5)
    np.testing.assert_allclose(grey.numpy()[:, 0], (batch[..., 0] / 255.0 - 0.5) / 0.5, atol=1e-5)
    with pytest.raises(ValueError):
        normalize_batch(torch.from_numpy(batch), [0.5, 0.5], [0.5, 0.5])


def _torch_batch(seed: int, n: int = 4, h: int = 64, w: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = np.stack([blobs(h, w, rng) for _ in range(n)])[:, None].astype(np.float32)
    noise = rng.random((n, 1, h, w), dtype=np.float32)
    images = np.concatenate([masks, noise, 1 - masks], axis=1)
    return torch.from_numpy(images), torch.from_numpy(masks)


def test_augment_batch_flips_exact_and_identity() -> None:
    x, m = _torch_batch(0)
    g = torch.Generator().manual_seed(0)
    same, same_m = augment_batch(x, m, g, {})
    assert torch.equal(same, x) and torch.equal(same_m, m)
    h, hm = augment_batch(x, m, g, {"hflip": 1.0})
    assert torch.equal(h, x.flip(3)) and torch.equal(hm, m.flip(3))
    v, vm = augment_batch(x, m, g, {"vflip": 1.0})
    assert torch.equal(v, x.flip(2)) and torch.equal(vm, m.flip(2))
    # p = 0.5 flips some items and leaves others exactly as they were.
    half, _ = augment_batch(x, m, torch.Generator().manual_seed(3), {"hflip": 0.5})
    flipped = [torch.equal(half[i], x[i].flip(2)) for i in range(4)]
    kept = [torch.equal(half[i], x[i]) for i in range(4)]
    assert all(a or b for a, b in zip(flipped, kept))


@pytest.mark.parametrize("seed", range(4))
def test_augment_batch_alignment(seed: int) -> None:
    x, m = _torch_batch(seed)
    u8 = m.to(torch.uint8)
    out, out_m = augment_batch(x, u8, torch.Generator().manual_seed(seed), AUG)
    assert out_m.dtype == torch.uint8 and set(out_m.unique().tolist()) <= {0, 1}
    assert out.shape == x.shape and out_m.shape == m.shape
    for i in range(x.shape[0]):
        assert not torch.equal(out_m[i], u8[i])
        assert_aligned(out[i, 0].numpy(), out_m[i, 0].numpy(), 0.5)
        # Channel 2 is 1 - mask inside the picture and 0 where the rotation filled.
        assert out[i, 2].min() >= 0 and out[i, 2].max() <= 1


def test_augment_batch_seeding() -> None:
    x, m = _torch_batch(1)
    cfg = {**AUG, "brightness": 0.2, "contrast": 0.2}
    a = augment_batch(x, m, torch.Generator().manual_seed(7), cfg)
    b = augment_batch(x, m, torch.Generator().manual_seed(7), cfg)
    c = augment_batch(x, m, torch.Generator().manual_seed(8), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    aug = GpuAugment(cfg)
    d = aug(x, m, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], d[0])


def test_augment_batch_intensity_is_image_only() -> None:
    x, m = _torch_batch(2)
    x = x * 0.5 + 0.25
    out, out_m = augment_batch(x, m, torch.Generator().manual_seed(0), {"brightness": 0.1})
    assert torch.equal(out_m, m)
    delta = out - x
    per_item = delta.flatten(1)
    assert torch.allclose(per_item.min(1).values, per_item.max(1).values, atol=1e-6)
    assert (per_item.abs().max(1).values > 0).all()
    out, _ = augment_batch(x, None, torch.Generator().manual_seed(0), {"contrast": 0.5})
    assert not torch.allclose(out.std(dim=(2, 3)), x.std(dim=(2, 3)))
    # The per-channel mean is the fixed point of the contrast change.
    torch.testing.assert_close(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5, rtol=0)


def test_augment_batch_on_normalized_images_matches_unit_path() -> None:
    rng = np.random.default_rng(3)
    u8 = torch.from_numpy(rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8))
    m = torch.from_numpy(np.stack([blobs(40, 56, rng) for _ in range(3)])[:, None].astype(np.float32))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    cfg = {**AUG, "brightness": 0.3, "contrast": 0.3}
    unit, unit_m = augment_batch(to_unit_float(u8), m, torch.Generator().manual_seed(5), cfg)
    norm, norm_m = augment_batch(normalize_batch(u8, mean, std), m, torch.Generator().manual_seed(5),
                                 cfg, mean=mean, std=std)
    assert torch.equal(unit_m, norm_m)
    expected = (unit.clamp(0, 1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, expected, atol=1e-4, rtol=1e-4)
    # Rotation fill is black in 0-1 units, i.e. -mean/std after normalisation.
    corner = norm[:, :, 0, 0]
    black = (-torch.tensor(mean) / torch.tensor(std)).expand_as(corner)
    filled = (unit[:, :, 0, 0] == 0).all(1)
    torch.testing.assert_close(corner[filled], black[filled], atol=1e-5, rtol=0)


def test_augment_batch_rejects_mismatched_masks() -> None:
    x, m = _torch_batch(0)
    with pytest.raises(ValueError):
        augment_batch(x, m[:, :, :10], None, AUG)
