"""medseg_core.synthetic: BUSI-layout output, determinism, lesion appearance, speed."""

from __future__ import annotations

import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from medseg_core.layouts import list_records, load_record
from medseg_core.synthetic import generate_dataset, make_sample


def box_blur(a: np.ndarray, r: int = 3) -> np.ndarray:
    """Mean filter via a summed-area table (no scipy)."""
    p = np.pad(a.astype(np.float64), r, mode="edge")
    s = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


def boundary_fraction(mask: np.ndarray) -> float:
    """Boundary pixels / area: larger for irregular, spiculated shapes than for ovals."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return float((m & ~inner).sum()) / float(m.sum()) ** 0.5


def test_generate_busi_layout(tmp_path):
    root = generate_dataset(str(tmp_path / "syn"), n_per_class=4, size=64, seed=0)
    assert root == str(tmp_path / "syn")
    for cls in ("normal", "benign", "malignant"):
        for i in range(1, 5):
            assert (tmp_path / "syn" / cls / f"{cls} ({i}).png").is_file()
            m = Image.open(tmp_path / "syn" / cls / f"{cls} ({i})_mask.png")
            assert m.mode == "L" and m.size == (64, 64)
            assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
    listing = list_records(root, "busi", check_sizes=True)
    assert len(listing.records) == 12
    assert sorted(r.label for r in listing.records) == [0] * 4 + [1] * 4 + [2] * 4
    for rec in listing.records:
        s = load_record(rec)
        assert s["image"].shape == (64, 64, 3)
        assert s["mask"].any() == (rec.label != 0)  # normal: empty masks; lesions otherwise


def test_class_kinds_follow_whole_words(tmp_path):
    """'abnormal' is a lesion class (it contains 'normal', but is not it), 'Non-malignant'
    is not malignant: both fall back to their position."""
    from medseg_core.synthetic import _kind_for

    assert [_kind_for(c, i) for i, c in enumerate(["normal", "abnormal"])] == ["normal", "benign"]
    assert _kind_for("Non-malignant", 1) == "benign" and _kind_for("malignant_x", 1) == "malignant"
    root = generate_dataset(str(tmp_path / "bin"), n_per_class=2, size=32, seed=0,
                            class_names=["normal", "abnormal"])
    masks = [load_record(r)["mask"].any()
             for r in list_records(root, "busi", class_names=["normal", "abnormal"]).records]
    assert masks == [True, True, False, False]  # abnormal/..., then normal/...


def test_deterministic_per_seed(tmp_path):
    a = generate_dataset(str(tmp_path / "a"), n_per_class=2, size=48, seed=5)
    b = generate_dataset(str(tmp_path / "b"), n_per_class=3, size=48, seed=5)
    c = generate_dataset(str(tmp_path / "c"), n_per_class=2, size=48, seed=6)
    for rel in ("benign/benign (2).png", "malignant/malignant (1)_mask.png"):
        assert (Path(a) / rel).read_bytes() == (Path(b) / rel).read_bytes()
        assert (Path(a) / rel).read_bytes() != (Path(c) / rel).read_bytes()


def test_fsspec_root_and_custom_classes():
    root = "memory://medseg-test-synthetic/ds"
    generate_dataset(root, n_per_class=2, size=32, class_names=("healthy", "benign", "cancer"))
    listing = list_records(root, "busi", class_names=("healthy", "benign", "cancer"))
    assert len(listing.records) == 6
    healthy = [load_record(r)["mask"].any() for r in listing.records if r.label == 0]
    assert healthy == [False, False]
    fsspec.filesystem("memory").rm("/medseg-test-synthetic", recursive=True)


def test_lesions_dark_visible_and_shaped_by_class():
    rng = np.random.default_rng(0)
    contrast, shape = {}, {}
    for kind in ("benign", "malignant"):
        ratios, fractions = [], []
        for _ in range(20):
            img, mask = make_sample(kind, 128, rng)
            assert img.dtype == np.uint8 and mask.dtype == np.uint8 and mask.any()
            ratios.append(img[mask > 0].mean() / img[mask == 0].mean())
            fractions.append(boundary_fraction(mask))
        contrast[kind], shape[kind] = np.mean(ratios), np.mean(fractions)
    assert contrast["benign"] < 0.6 and contrast["malignant"] < 0.6  # hypoechoic, visible
    assert shape["malignant"] > 1.2 * shape["benign"]  # spiculated vs smooth
    img, mask = make_sample("normal", 64, rng)
    assert not mask.any() and img.std() > 5  # speckled tissue, no lesion


def test_not_a_raw_intensity_threshold():
    # The best single global threshold on a blurred image must still segment badly: dark
    # distractors (fat lobules, shadows, deep attenuation) compete with the lesion.
    rng = np.random.default_rng(1)
    samples = [make_sample(k, 96, rng) for k in ("benign", "malignant", "normal") * 10]
    blurred = [box_blur(img) for img, _ in samples]
    best = 0.0
    for t in range(5, 160, 5):
        tp = fp = fn = 0
        for b, (_, m) in zip(blurred, samples):
            p = b < t
            tp += int((p & (m > 0)).sum())
            fp += int((p & (m == 0)).sum())
            fn += int((~p & (m > 0)).sum())
        best = max(best, 2 * tp / max(1, 2 * tp + fp + fn))
    assert 0.2 < best < 0.75


def test_fast(tmp_path):
    start = time.perf_counter()
    generate_dataset(str(tmp_path / "fast"), n_per_class=40, size=128, seed=0)
    elapsed = time.perf_counter() - start
    assert len(list((tmp_path / "fast").rglob("*.png"))) == 240
    assert elapsed < 4.0, f"120 pairs at 128 px took {elapsed:.2f}s"


def test_bad_kind():
    with pytest.raises(ValueError):
        make_sample("cyst")
