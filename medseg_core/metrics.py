"""Segmentation and classification metrics built on counts that merge exactly across workers.

Segmentation metrics are computed from per-image confusion counts `(tp, fp, fn, tn)` (an array
whose last axis has length 4). Conventions for empty masks (no positive pixel):

- truth and prediction both empty: dice, iou, thresholded_jaccard, sensitivity (recall),
  precision are 1.0 (a perfect answer to "is there a lesion");
- exactly one of them empty: dice, iou, thresholded_jaccard are 0.0, and so is whichever of
  sensitivity/precision has a zero denominator (prediction on an empty truth -> sensitivity 0;
  empty prediction on a non-empty truth -> precision 0);
- specificity with no negative pixels in the truth is 1.0; accuracy of zero pixels is 1.0.

Aggregates are reported two ways: `<metric>` from the counts summed over all images ("global",
as nnU-Net does) and `<metric>_mean`, the mean of the per-image values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ISIC_JACCARD_THRESHOLD = 0.65
SEGMENTATION_METRICS = (
    "dice",
    "iou",
    "thresholded_jaccard",
    "sensitivity",
    "recall",
    "specificity",
    "precision",
    "accuracy",
)


# --------------------------------------------------------------------------- counts
def _to_bool_numpy(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point() and bool(((x != 0) & (x != 1)).any()):
            raise ValueError(f"{name} must be a binary mask (0/1); threshold probabilities first")
        return x != 0
    x = np.asarray(x)
    if x.dtype.kind == "f" and bool(((x != 0) & (x != 1)).any()):
        raise ValueError(f"{name} must be a binary mask (0/1); threshold probabilities first")
    return x != 0


def confusion_counts(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Per-image (tp, fp, fn, tn) as an int64 array (N, 4).

    `pred` and `target` are binary masks (nonzero = foreground; float inputs must be exactly
    0/1) of equal shape: (H, W) for one image, or (N, ...) for a batch where every axis after
    the first is counted (so (N, H, W) and (N, 1, H, W) both work). numpy or torch.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p = _to_bool_numpy(pred, "pred")
    t = _to_bool_numpy(target, "target")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim < 2:
        raise ValueError(f"masks need at least 2 dimensions, got shape {tuple(pred.shape)}")
    n = p.shape[0]
    total = int(np.prod(p.shape[1:]))
    if isinstance(p, torch.Tensor) or isinstance(t, torch.Tensor):
        p = torch.as_tensor(p).reshape(n, -1)
        t = torch.as_tensor(t, device=p.device).reshape(n, -1)
        tp = (p & t).sum(1)
        sp = p.sum(1)
        st = t.sum(1)
        tp, sp, st = (v.cpu().numpy().astype(np.int64) for v in (tp, sp, st))
    else:
        p = p.reshape(n, -1)
        t = t.reshape(n, -1)
        tp = np.count_nonzero(p & t, axis=1).astype(np.int64)
        sp = np.count_nonzero(p, axis=1).astype(np.int64)
        st = np.count_nonzero(t, axis=1).astype(np.int64)
    fp = sp - tp
    fn = st - tp
    tn = total - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1)


def _split(counts: Any) -> tuple[np.ndarray, ...]:
    c = np.asarray(counts, dtype=np.float64)
    if c.shape[-1:] != (4,):
        raise ValueError(
            f"counts must have a last axis of length 4 (tp, fp, fn, tn), got {c.shape}"
        )
    return c[..., 0], c[..., 1], c[..., 2], c[..., 3]


def _ratio(num: np.ndarray, den: np.ndarray, when_zero: np.ndarray | float) -> np.ndarray | float:
    num, den = np.broadcast_arrays(num, den)
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), when_zero)
    return float(out) if out.ndim == 0 else out


def _both_empty(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return ((tp + fp + fn) == 0).astype(np.float64)


def dice(counts: Any) -> np.ndarray | float:
    """2tp / (2tp + fp + fn); 1.0 when truth and prediction are both empty.

    `counts` is (4,) -> float, or (..., 4) -> array of shape (...)."""
    tp, fp, fn, _ = _split(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn, _both_empty(tp, fp, fn))


def iou(counts: Any) -> np.ndarray | float:
    """Jaccard index tp / (tp + fp + fn); 1.0 when both are empty."""
    tp, fp, fn, _ = _split(counts)
    return _ratio(tp, tp + fp + fn, _both_empty(tp, fp, fn))


jaccard = iou


def thresholded_jaccard(
    counts: Any, threshold: float = ISIC_JACCARD_THRESHOLD
) -> np.ndarray | float:
    """ISIC 2018 score of each image: its IoU, set to 0 where below `threshold` (0.65).

    The challenge's score is the mean of this over images (`SegmentationMeter.aggregate()`'s
    `thresholded_jaccard_mean`); of summed counts it is just 0 or the global IoU."""
    j = np.asarray(iou(counts))
    out = np.where(j >= threshold, j, 0.0)
    return float(out) if out.ndim == 0 else out


def sensitivity(counts: Any) -> np.ndarray | float:
    """Recall tp / (tp + fn). Empty truth: 1.0 if the prediction is empty too, else 0.0."""
    tp, fp, fn, _ = _split(counts)
    return _ratio(tp, tp + fn, _both_empty(tp, fp, fn))


recall = sensitivity


def precision(counts: Any) -> np.ndarray | float:
    """tp / (tp + fp). Empty prediction: 1.0 if the truth is empty too, else 0.0."""
    tp, fp, fn, _ = _split(counts)
    return _ratio(tp, tp + fp, _both_empty(tp, fp, fn))


def specificity(counts: Any) -> np.ndarray | float:
    """tn / (tn + fp); 1.0 when the truth has no negative pixel (then fp is 0 too)."""
    _, fp, _, tn = _split(counts)
    return _ratio(tn, tn + fp, 1.0)


def accuracy(counts: Any) -> np.ndarray | float:
    """(tp + tn) / all pixels; 1.0 for zero pixels."""
    tp, fp, fn, tn = _split(counts)
    return _ratio(tp + tn, tp + fp + fn + tn, 1.0)


_METRIC_FUNCS = {
    "dice": dice,
    "iou": iou,
    "thresholded_jaccard": thresholded_jaccard,
    "sensitivity": sensitivity,
    "recall": recall,
    "specificity": specificity,
    "precision": precision,
    "accuracy": accuracy,
}


def metrics_from_counts(counts: Any) -> dict[str, float]:
    """All segmentation metrics of one (4,) count vector (e.g. summed counts)."""
    c = np.asarray(counts)
    if c.shape != (4,):
        raise ValueError(f"expected one (tp, fp, fn, tn) vector, got shape {c.shape}")
    return {name: float(f(c)) for name, f in _METRIC_FUNCS.items()}


# --------------------------------------------------------------------------- Hausdorff 95
def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (pixels outside the image count
    as background, so a mask touching the border has a surface there)."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~eroded


def _distances_to(points: np.ndarray, feature: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """Euclidean distance from each (row, col) in `points` to the nearest True of `feature`.

    Exact: first the distance along each column to the nearest feature row (two cumulative
    scans), then for each point the minimum over all columns of dx^2 + dy^2, in chunks.
    """
    h, w = feature.shape
    rows = np.arange(h, dtype=np.float64)[:, None]
    above = np.where(feature, rows, -np.inf)
    above = np.maximum.accumulate(above, axis=0)
    below = np.where(feature, rows, np.inf)
    below = np.minimum.accumulate(below[::-1], axis=0)[::-1]
    dy = np.minimum(rows - above, below - rows) * sy  # (h, w), inf in columns with no feature
    dy2 = dy**2
    cols = np.arange(w, dtype=np.float64) * sx
    out = np.empty(len(points), dtype=np.float64)
    chunk = max(1, 4_000_000 // max(w, 1))
    for start in range(0, len(points), chunk):
        r = points[start : start + chunk, 0]
        c = points[start : start + chunk, 1] * sx
        d2 = dy2[r] + (c[:, None] - cols[None, :]) ** 2
        out[start : start + chunk] = np.sqrt(d2.min(axis=1))
    return out


def _drop_channel(m: np.ndarray) -> np.ndarray:
    """(1x...)HxW or HxWx1 -> HxW, unlike `squeeze`, which makes a 1xW image 1-D."""
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[:, :, 0]
    return m


def hausdorff95(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    spacing: float | Sequence[float] = 1.0,
) -> float:
    """95th-percentile symmetric Hausdorff distance between two 2D binary masks.

    Surfaces are the masks minus their 4-connected erosion. The distances from every surface
    pixel of each mask to the nearest surface pixel of the other are pooled (both directions)
    and their 95th percentile returned, in units of `spacing` (one value, or (row, col)).
    Both masks empty -> 0.0; exactly one empty -> inf.
    """
    p, t = (_drop_channel(np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m))
            for m in (pred, target))
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(
            f"hausdorff95 needs two 2D masks of equal shape, got {p.shape} and {t.shape}"
        )
    p, t = p != 0, t != 0
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    sy, sx = (float(spacing), float(spacing)) if np.isscalar(spacing) else map(float, spacing)
    sp, st = _surface(p), _surface(t)
    d_pt = _distances_to(np.argwhere(sp), st, sy, sx)
    d_tp = _distances_to(np.argwhere(st), sp, sy, sx)
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


# --------------------------------------------------------------------------- meters
def _spacing_pair(spacing: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Pixel spacing as (row, col) float64, from one value or two."""
    pair = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if pair.size == 1:
        pair = np.repeat(pair, 2)
    if pair.size != 2:
        raise ValueError(f"spacing must be one value or (row, col), got {spacing!r}")
    return pair


class SegmentationMeter:
    """Accumulates per-image confusion counts (and optionally Hausdorff-95) over batches.

    The state is a dict of numpy arrays (`state_dict()`), so meters from several workers can be
    sent to one place and merged exactly: `SegmentationMeter.from_state(s)` and `merge(other)`.
    """

    def __init__(self, hausdorff: bool = False, spacing: float | Sequence[float] = 1.0) -> None:
        self.hausdorff = hausdorff
        self.spacing = spacing
        self.reset()

    def reset(self) -> None:
        """Forget all images."""
        self._counts: list[np.ndarray] = []
        self._hd95: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        target: np.ndarray | torch.Tensor,
        ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Add a batch of binary masks ((N, H, W), (N, 1, H, W) or one (H, W)); returns its
        (N, 4) counts. `ids` optionally names the images for `per_image()`."""
        counts = confusion_counts(pred, target)
        n = len(counts)
        if ids is None:
            ids = [""] * n
        elif len(ids) != n:
            raise ValueError(f"{len(ids)} ids for a batch of {n} images")
        self._counts.append(counts)
        self._ids.append(np.asarray([str(i) for i in ids], dtype=np.str_).reshape(n))
        if self.hausdorff:
            p = _as_numpy(pred).reshape(n, *pred.shape[-2:])
            t = _as_numpy(target).reshape(n, *target.shape[-2:])
            self._hd95.append(
                np.array([hausdorff95(a, b, self.spacing) for a, b in zip(p, t)], dtype=np.float64)
            )
        return counts

    @property
    def counts(self) -> np.ndarray:
        """All per-image counts, (N, 4) int64."""
        return np.concatenate(self._counts) if self._counts else np.zeros((0, 4), np.int64)

    def __len__(self) -> int:
        return sum(len(c) for c in self._counts)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy state: counts (N, 4) int64, ids (N,) str, hd95 (N,) float64 (empty when
        not tracked), hausdorff (0-d bool) and spacing ((row, col) float64, HD95's unit)."""
        hd = np.concatenate(self._hd95) if self._hd95 else np.zeros((0,), np.float64)
        ids = np.concatenate(self._ids) if self._ids else np.zeros((0,), np.str_)
        return {
            "counts": self.counts.copy(),
            "ids": ids,
            "hd95": hd,
            "hausdorff": np.array(self.hausdorff),
            "spacing": _spacing_pair(self.spacing),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> SegmentationMeter:
        """Rebuild a meter from `state_dict()` output."""
        counts = np.asarray(state["counts"], dtype=np.int64).reshape(-1, 4)
        hd = np.asarray(state.get("hd95", np.zeros(0)), dtype=np.float64)
        tracked = bool(state.get("hausdorff", len(hd) > 0))
        if tracked and len(hd) != len(counts):
            raise ValueError(f"state has {len(hd)} hd95 values for {len(counts)} images")
        spacing = state.get("spacing")
        meter = cls(hausdorff=tracked, spacing=1.0 if spacing is None
                    else tuple(float(v) for v in _spacing_pair(spacing)))
        meter._counts = [counts]
        ids = state.get("ids")
        meter._ids = [np.asarray(ids if ids is not None else [""] * len(counts), dtype=np.str_)]
        meter._hd95 = [hd] if meter.hausdorff else []
        return meter

    def merge(self, other: SegmentationMeter | dict[str, np.ndarray]) -> SegmentationMeter:
        """Append another meter's (or state dict's) images to this one; returns self."""
        if isinstance(other, dict):
            other = SegmentationMeter.from_state(other)
        if (self.hausdorff and other.hausdorff and len(other)
                and not np.array_equal(_spacing_pair(self.spacing), _spacing_pair(other.spacing))):
            raise ValueError(f"cannot merge HD95 measured with spacing {other.spacing} into a "
                             f"meter with spacing {self.spacing}: the distances are in other units")
        self._counts.append(other.counts)
        self._ids.append(other.state_dict()["ids"])
        if self.hausdorff and other.hausdorff:
            self._hd95.append(other.state_dict()["hd95"])
        elif self.hausdorff and len(other):
            self.hausdorff = False  # the merged set no longer has HD95 for every image
            self._hd95 = []
        return self

    def per_image(self) -> list[dict[str, Any]]:
        """One dict per image: id, tp, fp, fn, tn and every metric (and hd95 if tracked)."""
        state = self.state_dict()
        counts = state["counts"]
        values = {name: np.atleast_1d(f(counts)) for name, f in _METRIC_FUNCS.items()}
        rows = []
        for i, c in enumerate(counts):
            row: dict[str, Any] = {"id": str(state["ids"][i])}
            row.update(tp=int(c[0]), fp=int(c[1]), fn=int(c[2]), tn=int(c[3]))
            row.update({name: float(v[i]) for name, v in values.items()})
            if self.hausdorff:
                row["hd95"] = float(state["hd95"][i])
            rows.append(row)
        return rows

    def aggregate(self) -> dict[str, float]:
        """Global metrics from summed counts (`dice`, ...) and per-image means (`dice_mean`,
        ...), plus `n_images` (the ISIC 2018 score is `thresholded_jaccard_mean`); with Hausdorff, `hd95_mean` / `hd95_median` over images with a
        finite distance and `hd95_inf` (how many had exactly one empty mask)."""
        counts = self.counts
        out: dict[str, float] = {"n_images": float(len(counts))}
        if len(counts) == 0:
            return out
        out.update(metrics_from_counts(counts.sum(axis=0)))
        for name, f in _METRIC_FUNCS.items():
            out[f"{name}_mean"] = float(np.mean(f(counts)))
        if self.hausdorff:
            hd = self.state_dict()["hd95"]
            finite = hd[np.isfinite(hd)]
            out["hd95_mean"] = float(finite.mean()) if len(finite) else float("nan")
            out["hd95_median"] = float(np.median(finite)) if len(finite) else float("nan")
            out["hd95_inf"] = float(np.count_nonzero(~np.isfinite(hd)))
        return out


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ClassificationMeter:
    """Confusion matrix accumulator: rows are true classes, columns predicted classes.

    Targets equal to `ignore_index` (-1, unknown label) are skipped. Precision/recall/F1 of a
    class with a zero denominator are 0.0.
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add predictions: class ids (N,) or scores/logits (N, num_classes) (argmax taken)."""
        p = _as_numpy(pred)
        t = _as_numpy(target).astype(np.int64).reshape(-1)
        if p.ndim == 2:
            p = p.argmax(axis=1)
        p = p.astype(np.int64).reshape(-1)
        if len(p) != len(t):
            raise ValueError(f"{len(p)} predictions for {len(t)} targets")
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        for name, v in (("pred", p), ("target", t)):
            if len(v) and (v.min() < 0 or v.max() >= self.num_classes):
                raise ValueError(
                    f"{name} class ids must be in [0, {self.num_classes}), got {v.min()}..{v.max()}"
                )
        np.add.at(self.confusion, (t, p), 1)

    def merge(self, other: ClassificationMeter | dict[str, np.ndarray]) -> ClassificationMeter:
        """Add another meter's (or state dict's) confusion matrix; returns self."""
        conf = other["confusion"] if isinstance(other, dict) else other.confusion
        if np.shape(conf) != self.confusion.shape:
            raise ValueError(f"cannot merge confusion {np.shape(conf)} into {self.confusion.shape}")
        self.confusion += np.asarray(conf, dtype=np.int64)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"confusion": (K, K) int64}."""
        return {"confusion": self.confusion.copy()}

    @classmethod
    def from_state(
        cls, state: dict[str, np.ndarray], ignore_index: int = -1
    ) -> ClassificationMeter:
        """Rebuild a meter from `state_dict()` output."""
        conf = np.asarray(state["confusion"], dtype=np.int64)
        meter = cls(conf.shape[0], ignore_index)
        meter.confusion = conf.copy()
        return meter

    def accuracy(self) -> float:
        """Fraction of correct predictions (0.0 when empty)."""
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else 0.0

    def precision(self) -> np.ndarray:
        """Per-class precision (K,)."""
        return np.asarray(_ratio(np.diag(self.confusion), self.confusion.sum(axis=0), 0.0))

    def recall(self) -> np.ndarray:
        """Per-class recall (K,)."""
        return np.asarray(_ratio(np.diag(self.confusion), self.confusion.sum(axis=1), 0.0))

    def f1(self) -> np.ndarray:
        """Per-class F1 (K,)."""
        p, r = self.precision(), self.recall()
        return np.asarray(_ratio(2 * p * r, p + r, 0.0))

    def macro_f1(self) -> float:
        """Unweighted mean of the per-class F1."""
        return float(self.f1().mean())

    def aggregate(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """accuracy, macro_f1, n, and precision_/recall_/f1_<class name or index>."""
        names = (
            list(class_names)
            if class_names is not None
            else [str(i) for i in range(self.num_classes)]
        )
        out = {
            "accuracy": self.accuracy(),
            "macro_f1": self.macro_f1(),
            "n": float(self.confusion.sum()),
        }
        for name, p, r, f in zip(names, self.precision(), self.recall(), self.f1()):
            out[f"precision_{name}"] = float(p)
            out[f"recall_{name}"] = float(r)
            out[f"f1_{name}"] = float(f)
        return out
