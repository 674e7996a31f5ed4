"""Result rows of batch inference: one flat, JSON/Parquet-friendly dict per image.

Shared by the bulk segmentation job (``pipelines/segment_batch.py``) and evaluation
(``pipelines/evaluate.py``): both turn one item of :meth:`medseg_core.inference.Chain.predict`
into a row with :func:`prediction_row`, and a record that could not be read or decoded into a
row with :func:`error_row`. Every row has exactly the keys of :data:`RESULT_KEYS`, in that
order, whatever happened to the image, so a batch of rows is always one table.

Missing values: float fields are NaN, everything else None (``label`` -1). Segmentation
metrics come from :mod:`medseg_core.metrics` (``confusion_counts`` -> ``metrics_from_counts``,
``hausdorff95``), with its conventions for empty masks; they are filled only when a
ground-truth mask is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from medseg_core.metrics import confusion_counts, hausdorff95, metrics_from_counts

COUNT_KEYS = ("tp", "fp", "fn", "tn")
# Count-based segmentation metrics reported per image and in aggregates.
SEG_METRICS = (
    "dice",
    "iou",
    "thresholded_jaccard",
    "sensitivity",
    "specificity",
    "precision",
    "recall",
)
METRIC_KEYS = (*SEG_METRICS, "accuracy", "hd95")
RESULT_KEYS = (
    "id",
    "source",
    "true_label",
    "label",
    "label_name",
    "probabilities",
    "lesion_area_fraction",
    "bbox",
    "height",
    "width",
    "seconds",
    "segmenter_version",
    "classifier_version",
    "error",
    *COUNT_KEYS,
    *METRIC_KEYS,
)
NAN = float("nan")


def _versions(versions: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    v = dict(versions or {})
    seg, clf = v.get("segmenter"), v.get("classifier")
    return (None if seg is None else str(seg)), (None if clf is None else str(clf))


def _empty_truth() -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(COUNT_KEYS)
    out.update(dict.fromkeys(METRIC_KEYS, NAN))
    return out


def truth_metrics(mask: np.ndarray, truth: np.ndarray, *, hausdorff: bool = True) -> dict[str, Any]:
    """tp, fp, fn, tn and every metric of one predicted mask against its ground truth."""
    mask, truth = np.asarray(mask), np.asarray(truth)
    if truth.ndim == 3 and truth.shape[2] == 1:
        truth = truth[:, :, 0]
    if mask.shape != truth.shape:
        raise ValueError(f"predicted mask is {mask.shape} but the ground truth is {truth.shape}")
    counts = confusion_counts(mask, truth)[0]
    out: dict[str, Any] = {k: int(c) for k, c in zip(COUNT_KEYS, counts)}
    metrics = metrics_from_counts(counts)
    for key in METRIC_KEYS:
        if key != "hd95":
            out[key] = float(metrics[key])
    out["hd95"] = float(hausdorff95(mask, truth)) if hausdorff else NAN
    return out


def prediction_row(
    id: str,
    source: str,
    output: Mapping[str, Any],
    *,
    truth: np.ndarray | None = None,
    true_label: int = -1,
    seconds: float = 0.0,
    versions: Mapping[str, Any] | None = None,
    hausdorff: bool = True,
) -> dict[str, Any]:
    """The result row of one image from one item of ``Chain.predict``.

    Args:
        id: the record id (any string; it is data here, never a path).
        source: where the image came from (its URI).
        output: ``{"mask", "label", "label_name", "probabilities" (name -> p, in the bundle's
            class order), "lesion_area_fraction", "bbox"}``.
        truth: ground-truth mask (HxW, nonzero = lesion) at the image's size; fills the counts
            and metrics (``hd95`` only with ``hausdorff``).
        true_label: the record's label (-1 unknown).
        seconds: processing time attributed to this image.
        versions: ``{"segmenter": ..., "classifier": ...}`` (``Chain.versions``).
    """
    mask = np.asarray(output["mask"])
    seg_version, clf_version = _versions(versions)
    probabilities = output.get("probabilities") or {}
    bbox = output.get("bbox")
    row: dict[str, Any] = {
        "id": str(id),
        "source": str(source),
        "true_label": int(true_label),
        "label": int(output.get("label", -1)),
        "label_name": None if output.get("label_name") is None else str(output["label_name"]),
        "probabilities": [float(p) for p in probabilities.values()],
        "lesion_area_fraction": float(output.get("lesion_area_fraction", NAN)),
        "bbox": None if bbox is None else [int(v) for v in bbox],
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "seconds": float(seconds),
        "segmenter_version": seg_version,
        "classifier_version": clf_version,
        "error": None,
    }
    row.update(_empty_truth() if truth is None else truth_metrics(mask, truth, hausdorff=hausdorff))
    return {k: row[k] for k in RESULT_KEYS}


def error_row(
    id: str,
    source: str,
    error: str,
    *,
    true_label: int = -1,
    seconds: float = 0.0,
    versions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The row of an image that could not be processed: the keys of :func:`prediction_row`,
    with ``error`` set, ``label`` -1, NaN floats and None elsewhere."""
    seg_version, clf_version = _versions(versions)
    row: dict[str, Any] = {
        "id": str(id),
        "source": str(source),
        "true_label": int(true_label),
        "label": -1,
        "label_name": None,
        "probabilities": None,
        "lesion_area_fraction": NAN,
        "bbox": None,
        "height": None,
        "width": None,
        "seconds": float(seconds),
        "segmenter_version": seg_version,
        "classifier_version": clf_version,
        "error": str(error) or "error",
    }
    row.update(_empty_truth())
    return {k: row[k] for k in RESULT_KEYS}


def is_missing(value: Any) -> bool:
    """True for None and NaN (how rows mark a value that does not exist)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
