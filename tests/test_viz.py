"""Overlays, confusion colouring, curves, montages, confusion matrices and PNG writing."""

from __future__ import annotations

import io
import math
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from medseg_core.viz import (
    FN_COLOR,
    FP_COLOR,
    PALETTE,
    TN_COLOR,
    TP_COLOR,
    confusion_matrix_image,
    confusion_overlay,
    montage,
    overlay,
    plot_curves,
    save_png,
    to_rgb,
)


def colour_mask(image: np.ndarray, colour, tol: int = 0) -> np.ndarray:
    return (np.abs(image.astype(int) - np.asarray(colour)) <= tol).all(axis=2)


def test_confusion_colours_are_exact() -> None:
    pred = np.array([[1, 1, 0, 0]] * 3, np.uint8)
    truth = np.array([[1, 0, 1, 0]] * 3, np.uint8)
    out = confusion_overlay(pred, truth)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert TP_COLOR == (0, 255, 255) and FP_COLOR == (255, 0, 255)
    assert FN_COLOR == (255, 255, 0) and TN_COLOR == (0, 0, 0)
    for col, colour in enumerate([TP_COLOR, FP_COLOR, FN_COLOR, TN_COLOR]):
        assert (out[:, col] == colour).all()
    # bool inputs behave like 0/1.
    np.testing.assert_array_equal(confusion_overlay(pred.astype(bool), truth.astype(bool)), out)
    with pytest.raises(ValueError):
        confusion_overlay(pred, truth[:, :3])


def test_confusion_overlay_on_image_keeps_true_negatives() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    pred = np.array([[1, 1, 0, 0]] * 3, np.uint8)
    truth = np.array([[1, 0, 1, 0]] * 3, np.uint8)
    out = confusion_overlay(pred, truth, image=image, alpha=0.5)
    np.testing.assert_array_equal(out[:, 3], image[:, 3])
    expected_tp = np.rint(0.5 * image[:, 0] + 0.5 * np.array(TP_COLOR)).astype(np.uint8)
    np.testing.assert_array_equal(out[:, 0], expected_tp)


def test_overlay_changes_only_mask_pixels() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    before = image.copy()
    out = overlay(image, mask, color=(255, 0, 0), alpha=0.4)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
    expected = np.rint(0.6 * image[mask == 1].astype(float) + 0.4 * np.array([255, 0, 0]))
    np.testing.assert_array_equal(out[mask == 1], expected.astype(np.uint8))
    np.testing.assert_array_equal(image, before)  # the input is not modified
    full = overlay(image, mask, color=(1, 2, 3), alpha=1.0)
    assert (full[mask == 1] == (1, 2, 3)).all()
    # Grey input becomes RGB with equal channels outside the mask.
    grey = overlay(image[:, :, 0], mask)
    assert grey.shape == (20, 30, 3)
    np.testing.assert_array_equal(grey[mask == 0], np.repeat(image[:, :, 0][mask == 0][:, None], 3, 1))
    with pytest.raises(ValueError):
        overlay(image, mask[:10])


def test_to_rgb_conversions() -> None:
    m = np.eye(3, dtype=np.uint8)
    assert (to_rgb(m)[..., 0] == m * 255).all()
    assert (to_rgb(m.astype(bool))[..., 1] == m * 255).all()
    f = np.array([[0.0, 0.5, 1.0]])
    assert to_rgb(f)[0, :, 2].tolist() == [0, 128, 255]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert to_rgb(rgba).shape == (2, 2, 3) and to_rgb(rgba).max() == 0
    assert to_rgb(np.full((2, 2), 65535, np.uint16)).max() == 255


def test_montage_shape_and_content() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 25), dtype=np.uint8)  # grey, half size: same aspect ratio
    c = (rng.random((40, 50)) > 0.5).astype(np.uint8)  # a mask
    d = rng.random((10, 50)).astype(np.float32)  # a probability map, other aspect ratio
    e = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    pad = 3
    out = montage([a, b, c, d, e], ncols=2, pad=pad)
    assert out.shape == (3 * (40 + pad) + pad, 2 * (50 + pad) + pad, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[pad:pad + 40, pad:pad + 50], a)  # already cell-sized
    cell_c = out[pad + 43:pad + 83, pad:pad + 50]
    np.testing.assert_array_equal(cell_c[..., 0], c * 255)
    assert (out[:pad] == 255).all() and (out[:, :pad] == 255).all()
    # Letterboxing: d fills the cell width, and background fills above and below.
    cell_d = out[pad + 43:pad + 83, 2 * pad + 50:2 * pad + 100]
    assert (cell_d[0] == 255).all() and not (cell_d[20] == 255).all()
    # Labels add a strip under each row; ncols beyond the count is capped.
    labelled = montage([a, b], ncols=5, labels=["first", "second"], pad=pad, cell=(32, 32))
    assert labelled.shape[1] == 2 * (32 + pad) + pad
    assert labelled.shape[0] > 32 + 2 * pad
    strip = labelled[pad + 32:-pad, pad:pad + 32]
    assert (strip < 128).any()  # label text is drawn
    with pytest.raises(ValueError):
        montage([], ncols=2)
    with pytest.raises(ValueError):
        montage([a], ncols=1, labels=["x", "y"])


def test_plot_curves_draws_each_series(tmp_path: Path) -> None:
    history = {
        "train_loss": [1.0, 0.7, 0.5, math.nan, 0.3, 0.25, 0.2],
        "val_dice": [0.1, 0.3, 0.45, 0.55, 0.6, 0.64, 0.66],
        "lr": [],
        "broken": [math.nan, math.nan],
    }
    path = tmp_path / "plots" / "curves.png"
    out = plot_curves(history, path=str(path), title="run 1", size=(500, 320))
    assert out.shape == (320, 500, 3) and out.dtype == np.uint8
    decoded = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(decoded, out)
    # The plot area (inside the margins) holds pixels of both drawn series' colours, in many
    # columns (lines, not only the legend swatch).
    area = out[40:260, 60:480]
    for colour in PALETTE[:2]:
        cols = np.flatnonzero(colour_mask(area, colour, tol=40).any(axis=0))
        assert cols.size > 100, colour
    # Background white dominates, and there is dark ink (axes, ticks, labels).
    assert (out == 255).all(axis=2).mean() > 0.5
    assert (out.max(axis=2) < 80).sum() > 200


def test_curves_number_their_points_from_first() -> None:
    """Training's curves numbered epochs from 1 while metrics.csv, TensorBoard and the log
    number them from 0: `first` moves the axis labels and leaves the lines where they are."""
    history = {"val_dice": [0.2, 0.5, 0.4, 0.6, 0.7, 0.65]}
    from_one, from_zero = plot_curves(history), plot_curves(history, first=0)
    differ = np.flatnonzero((from_one != from_zero).any(axis=(1, 2)))
    assert differ.size and differ.min() > 0.8 * from_one.shape[0]  # the tick labels only


def test_tick_labels_show_the_tick_values() -> None:
    """Each tick's label is its value: steps such as 0.025 or 2.5 need a decimal more than
    their order of magnitude (they were labelled 0.83 for 0.825, 8 for 7.5)."""
    from medseg_core.viz import _tick_label, _ticks

    for lo, hi in ((0.80, 0.92), (0.0, 13.0), (0.0, 1.3), (-0.3, 0.3), (0.0, 0.5), (3, 47)):
        ticks = _ticks(lo, hi)
        step = ticks[1] - ticks[0]
        labels = [_tick_label(v, step) for v in ticks]
        assert all(abs(float(lab) - v) < 1e-9 for lab, v in zip(labels, ticks)), labels
        assert len(set(labels)) == len(labels)


def test_plot_curves_handles_degenerate_input() -> None:
    empty = plot_curves({})
    assert empty.shape == (400, 640, 3)
    for history in ({"a": []}, {"a": [math.nan]}, {"a": [0.5]}, {"a": [2.0, 2.0, 2.0]},
                    {"a": [math.inf, 1.0, -math.inf, 3.0]}, {"a": [1e-7, 2e-7]}, {"a": [1e6, 3e6]}):
        img = plot_curves(history, size=(300, 200))
        assert img.shape == (200, 300, 3)
    one = plot_curves({"a": [0.5]}, size=(300, 200))
    marker = colour_mask(one[30:150, 100:200], PALETTE[0], tol=30)  # centred point, not legend
    assert 10 < marker.sum() < 100


def test_confusion_matrix_image() -> None:
    names = ["normal", "benign", "malignant"]
    matrix = np.array([[50, 0, 0], [4, 30, 6], [0, 0, 0]])
    out = confusion_matrix_image(matrix, names, cell=60)
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
    assert out.shape[0] > 3 * 60 and out.shape[1] > 3 * 60
    bigger = confusion_matrix_image(np.eye(4), names + ["other"], cell=60)
    assert bigger.shape[0] > out.shape[0] and bigger.shape[1] > out.shape[1]
    # The fully-confident row's diagonal cell is the darkest blue; an empty row stays white.
    blue = colour_mask(out, (8, 69, 148), tol=2)
    assert blue.sum() > 60 * 60 * 0.5
    assert not colour_mask(out, (8, 69, 148), tol=60)[-65:].any()
    with pytest.raises(ValueError):
        confusion_matrix_image(matrix, names[:2])


def test_save_png_local_and_url(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    target = tmp_path / "a" / "b" / "x.png"
    assert save_png(rgb, str(target)) == str(target)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), rgb)
    grey = rgb[:, :, 0]
    save_png(grey, f"file://{tmp_path}/grey.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grey.png")), grey)
    save_png(np.eye(4, dtype=bool), "memory://viz-test/mask.png")
    with fsspec.open("memory://viz-test/mask.png", "rb") as f:
        decoded = np.asarray(Image.open(io.BytesIO(f.read())))
    np.testing.assert_array_equal(decoded[..., 0], np.eye(4, dtype=np.uint8) * 255)
