import math

import numpy as np
import pytest
import torch

from medseg_core.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    accuracy,
    confusion_counts,
    dice,
    hausdorff95,
    iou,
    precision,
    recall,
    sensitivity,
    specificity,
    thresholded_jaccard,
)

ALL = (dice, iou, thresholded_jaccard, sensitivity, recall, specificity, precision, accuracy)


def _random_masks(n, h, w, seed, p=0.3):
    rng = np.random.default_rng(seed)
    return (rng.random((n, h, w)) < p).astype(np.uint8)


def test_confusion_counts_hand_computed():
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], np.uint8)
    target = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], np.uint8)
    counts = confusion_counts(pred, target)
    assert counts.tolist() == [[2, 1, 1, 5]]
    c = counts[0]
    assert dice(c) == pytest.approx(4 / 6)
    assert iou(c) == pytest.approx(2 / 4)
    assert sensitivity(c) == recall(c) == pytest.approx(2 / 3)
    assert precision(c) == pytest.approx(2 / 3)
    assert specificity(c) == pytest.approx(5 / 6)
    assert accuracy(c) == pytest.approx(7 / 9)
    assert thresholded_jaccard(c) == 0.0  # iou 0.5 < 0.65
    assert thresholded_jaccard(np.array([7, 2, 1, 0])) == pytest.approx(0.7)


def test_counts_accept_numpy_torch_and_channel_axis():
    pred, target = _random_masks(3, 9, 11, 0), _random_masks(3, 9, 11, 1)
    ref = confusion_counts(pred, target)
    assert ref.shape == (3, 4) and (ref.sum(1) == 99).all()
    assert np.array_equal(confusion_counts(torch.from_numpy(pred), torch.from_numpy(target)), ref)
    assert np.array_equal(confusion_counts(pred[:, None], target[:, None]), ref)
    assert np.array_equal(confusion_counts(pred.astype(bool), target.astype(np.float32)), ref)
    with pytest.raises(ValueError, match="binary"):
        confusion_counts(pred * 0.5, target)
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(pred, target[:2])


def test_identical_and_disjoint():
    a = np.zeros((6, 6), np.uint8)
    a[1:4, 1:4] = 1
    same = confusion_counts(a, a)[0]
    for f in ALL:
        assert f(same) == 1.0
    b = np.zeros_like(a)
    b[4:, 4:] = 1
    apart = confusion_counts(a, b)[0]
    for f in (dice, iou, thresholded_jaccard, sensitivity, precision):
        assert f(apart) == 0.0


def test_dice_and_iou_symmetric_and_related():
    pred, target = _random_masks(5, 16, 16, 2), _random_masks(5, 16, 16, 3)
    c1, c2 = confusion_counts(pred, target), confusion_counts(target, pred)
    assert np.allclose(dice(c1), dice(c2)) and np.allclose(iou(c1), iou(c2))
    assert np.allclose(sensitivity(c1), precision(c2))
    d, j = dice(c1), iou(c1)
    assert np.allclose(d, 2 * j / (1 + j))
    assert dice(c1).shape == (5,)


def test_empty_mask_conventions():
    empty = np.zeros((4, 4), np.uint8)
    some = empty.copy()
    some[0, 0] = 1
    both = confusion_counts(empty, empty)[0]
    for f in (dice, iou, precision, sensitivity, specificity, accuracy, thresholded_jaccard):
        assert f(both) == 1.0
    false_alarm = confusion_counts(some, empty)[0]  # prediction on an empty truth
    for f in (dice, iou, precision, sensitivity):
        assert f(false_alarm) == 0.0
    assert specificity(false_alarm) == pytest.approx(15 / 16)
    missed = confusion_counts(empty, some)[0]
    for f in (dice, iou, precision, sensitivity):
        assert f(missed) == 0.0
    full = np.ones((2, 2), np.uint8)
    assert specificity(confusion_counts(full, full)[0]) == 1.0


def test_meter_global_and_mean_aggregates():
    meter = SegmentationMeter()
    # image 0: tp 2, fp 0, fn 2 -> dice 2/3; image 1: tp 0, fp 1, fn 0 -> dice 0
    pred = np.zeros((2, 2, 4), np.uint8)
    target = np.zeros((2, 2, 4), np.uint8)
    target[0, 0] = 1
    pred[0, 0, :2] = 1
    pred[1, 1, 3] = 1
    meter.update(pred, target, ids=["a", "b"])
    agg = meter.aggregate()
    assert agg["n_images"] == 2
    assert agg["dice"] == pytest.approx(4 / (4 + 1 + 2))  # from summed counts (2, 1, 2, 11)
    assert agg["dice_mean"] == pytest.approx((2 / 3 + 0) / 2)
    assert agg["iou"] == pytest.approx(2 / 5)
    assert agg["iou_mean"] == pytest.approx((0.5 + 0) / 2)
    assert agg["sensitivity"] == agg["recall"] == pytest.approx(0.5)
    rows = meter.per_image()
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["tp"] == 2 and rows[0]["fn"] == 2 and rows[1]["fp"] == 1
    assert rows[0]["dice"] == pytest.approx(2 / 3) and rows[1]["dice"] == 0.0
    meter.reset()
    assert len(meter) == 0 and meter.aggregate() == {"n_images": 0.0}


def test_meter_merge_of_halves_equals_all():
    pred, target = _random_masks(8, 12, 10, 4), _random_masks(8, 12, 10, 5)
    whole = SegmentationMeter(hausdorff=True)
    whole.update(pred, target)
    first, second = SegmentationMeter(hausdorff=True), SegmentationMeter(hausdorff=True)
    first.update(torch.from_numpy(pred[:3]), torch.from_numpy(target[:3]))
    second.update(pred[3:], target[3:])
    state = second.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    merged = SegmentationMeter.from_state(first.state_dict()).merge(state)
    assert np.array_equal(merged.counts, whole.counts)
    a, b = merged.aggregate(), whole.aggregate()
    assert a.keys() == b.keys() and "hd95_mean" in a
    for key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True)
    plain = SegmentationMeter()
    plain.update(pred[:1], target[:1])
    merged.merge(plain)  # no hd95 for that image: the merged meter stops reporting it
    assert "hd95_mean" not in merged.aggregate()


def test_a_restored_meter_keeps_its_hd95_spacing():
    """A meter rebuilt from its state measures later images in the same units (it fell back
    to 1 pixel: 0.5 mm then 1.0 'mm' for the same pair); meters of other spacings do not mix."""
    p = np.zeros((8, 8), np.uint8)
    p[2:5, 2:5] = 1
    t = np.zeros((8, 8), np.uint8)
    t[2:5, 3:6] = 1
    for spacing in (0.5, (0.5, 2.0)):
        meter = SegmentationMeter(hausdorff=True, spacing=spacing)
        meter.update(p, t)
        restored = SegmentationMeter.from_state(meter.state_dict())
        restored.update(p, t)
        hd = restored.state_dict()["hd95"]
        assert hd[0] == hd[1] == meter.state_dict()["hd95"][0]
    with pytest.raises(ValueError, match="spacing"):
        SegmentationMeter(hausdorff=True, spacing=0.5).merge(meter)
    legacy = {k: v for k, v in meter.state_dict().items() if k != "spacing"}
    assert SegmentationMeter.from_state(legacy).spacing == 1.0  # states from before


def _brute_hd95(a, b):
    def surface(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner)

    sa, sb = surface(a.astype(bool)), surface(b.astype(bool))
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hausdorff95_known_distances():
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[1, 1] = 1
    b[4, 5] = 1
    assert hausdorff95(a, b) == pytest.approx(5.0)
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, b, spacing=(2.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0))
    square = np.zeros((20, 20), np.uint8)
    square[5:10, 5:10] = 1
    shifted = np.roll(square, 3, axis=1)
    # every surface pixel of one square is at most 3 columns from the other's surface,
    # and the left/right edges (10 of 32 points) are exactly 3 away
    assert hausdorff95(square, shifted) == pytest.approx(3.0)
    line = np.zeros((10, 20), np.uint8)
    line[5, 2:18] = 1
    dot = np.zeros_like(line)
    dot[2, 10] = 1
    dists = np.concatenate([[3.0], np.hypot(3.0, np.arange(2, 18) - 10)])
    assert hausdorff95(dot, line) == pytest.approx(np.percentile(dists, 95))


def test_hausdorff95_empty_and_random_against_brute_force():
    empty = np.zeros((8, 8), np.uint8)
    some = empty.copy()
    some[2:4, 2:4] = 1
    assert hausdorff95(empty, empty) == 0.0
    assert hausdorff95(empty, some) == math.inf and hausdorff95(some, empty) == math.inf
    a, b = _random_masks(2, 40, 53, 6, p=0.1)
    assert hausdorff95(a, b) == pytest.approx(_brute_hd95(a, b))
    assert hausdorff95(torch.from_numpy(a)[None], torch.from_numpy(b)[None]) == pytest.approx(
        _brute_hd95(a, b)
    )


def test_hausdorff95_of_images_one_pixel_high_or_wide():
    a, b = np.zeros((1, 30), np.uint8), np.zeros((1, 30), np.uint8)
    a[0, 2:6], b[0, 12:15] = 1, 1
    assert hausdorff95(a, b) == pytest.approx(_brute_hd95(a, b))
    assert hausdorff95(a.T, b.T) == pytest.approx(_brute_hd95(a.T, b.T))
    assert hausdorff95(a.T[:, :, None], b.T[None]) == pytest.approx(_brute_hd95(a.T, b.T))
    assert hausdorff95(a[None], b[None, None]) == pytest.approx(_brute_hd95(a, b))


def test_hausdorff95_large_masks_fast_enough():
    yy, xx = np.mgrid[:512, :512]
    disk = ((yy - 256) ** 2 + (xx - 256) ** 2 < 150**2).astype(np.uint8)
    noisy = disk ^ (np.random.default_rng(7).random((512, 512)) < 0.01)
    assert 0 < hausdorff95(disk, noisy) < 150
    bigger = ((yy - 256) ** 2 + (xx - 256) ** 2 < 160**2).astype(np.uint8)
    assert hausdorff95(disk, bigger) == pytest.approx(10.0, abs=1.0)


def test_classification_meter():
    meter = ClassificationMeter(3)
    meter.update(np.array([0, 1, 1, 2, 2]), np.array([0, 1, 2, 2, -1]))
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    meter.update(logits, torch.tensor([1, 2]))
    # true->pred: 0->0, 1->1, 2->1, 2->2, 1->0, 2->2 (the -1 label is skipped)
    expected = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 2]])
    assert np.array_equal(meter.confusion, expected)
    assert meter.accuracy() == pytest.approx(4 / 6)
    assert np.allclose(meter.precision(), [1 / 2, 1 / 2, 1.0])
    assert np.allclose(meter.recall(), [1.0, 1 / 2, 2 / 3])
    f1 = [2 / 3, 1 / 2, 0.8]
    assert np.allclose(meter.f1(), f1)
    assert meter.macro_f1() == pytest.approx(np.mean(f1))
    agg = meter.aggregate(class_names=["normal", "benign", "malignant"])
    assert agg["f1_malignant"] == pytest.approx(0.8) and agg["n"] == 6
    other = ClassificationMeter.from_state(meter.state_dict())
    meter.merge(other)
    assert np.array_equal(meter.confusion, 2 * expected)
    assert meter.accuracy() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="class ids"):
        meter.update(np.array([3]), np.array([0]))
    empty = ClassificationMeter(2)
    assert empty.accuracy() == 0.0 and np.array_equal(empty.f1(), [0.0, 0.0])
