"""Evaluation of prediction rows: aggregates with bootstrap confidence intervals, the classifier's
confusion matrix and per-class scores, best/median/worst case selection, test-time augmentation.

Everything here works on *rows*, the flat per-image dicts of `medseg_core.results.prediction_row`
/ `error_row` (keys used: ``id``, ``source``, ``true_label``, ``label``, ``label_name``,
``probabilities``, ``tp``, ``fp``, ``fn``, ``tn``, ``hd95``, ``error``, ...). The per-image metric
values are recomputed from the counts with `medseg_core.metrics`, so aggregates and the table can
never disagree. No model, no Ray: a report can be built and tested from hand-made rows.

Bootstrap (percentile method): ``samples`` resamples of the images with replacement, drawn with a
seeded ``numpy.random.Generator`` and applied as a weight matrix ``W`` (resamples x images, how
often each image was drawn), so that every statistic of a resample is one matrix product:
``W @ counts`` are the summed confusion counts (-> the global, nnU-Net-style Dice of each
resample) and ``W @ values / n`` the per-image means. Resamples are processed in chunks of at
most ``max_elements`` weights, so memory stays bounded for large archives. The interval of a
statistic that is the same for every resample (e.g. a perfect predictor) has zero width.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medseg_core import metrics as M
from medseg_core.results import SEG_METRICS

__all__ = [
    "SEG_METRICS",
    "TABLE_METRICS",
    "FLIPS",
    "BootstrapConfig",
    "FlipTTA",
    "bootstrap",
    "bootstrap_weights",
    "percentile_interval",
    "mean_ci",
    "global_metric_ci",
    "split_errors",
    "segmentation_group",
    "segmentation_summary",
    "classification_summary",
    "select_cases",
    "compare_variants",
    "summarize",
    "table_records",
    "predicted_class",
    "to_jsonable",
    "class_name",
]

# Columns of the per-image table, in order (after id/source/classes).
TABLE_METRICS = (*SEG_METRICS, "hd95")
_FUNCS: dict[str, Callable[[Any], Any]] = {
    "dice": M.dice,
    "iou": M.iou,
    "thresholded_jaccard": M.thresholded_jaccard,
    "sensitivity": M.sensitivity,
    "specificity": M.specificity,
    "precision": M.precision,
    "recall": M.recall,
}
FLIPS = ("identity", "hflip", "vflip")
_CASE_ORDER = ("best", "median", "worst")


# ---------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class BootstrapConfig:
    """Percentile bootstrap settings: resamples, seed, confidence level, chunk size."""

    samples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    max_elements: int = 2_000_000  # weights per chunk (resamples x images)

    def __post_init__(self) -> None:
        for name in ("samples", "seed", "max_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    value < (0 if name == "seed" else 1):
                raise ValueError(f"bootstrap {name} must be a whole number >= "
                                 f"{0 if name == 'seed' else 1}, got {value!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BootstrapConfig:
        d = dict(d or {})
        known = {k: d[k] for k in ("samples", "seed", "confidence", "max_elements") if k in d}
        return cls(**known)


def bootstrap_weights(
    n: int, samples: int, seed: int = 0, max_elements: int = 2_000_000
) -> Iterator[np.ndarray]:
    """Chunks of bootstrap weights, float64 (b, n): how often each of the n items was drawn in
    each resample (every row sums to n). Deterministic for a seed, whatever the chunking."""
    if n < 1:
        raise ValueError("bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, int(max_elements) // n)
    done = 0
    while done < samples:
        b = min(per_chunk, samples - done)
        idx = rng.integers(0, n, size=(b, n), dtype=np.int64)  # 64-bit draws: chunking-invariant
        flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def bootstrap(
    n: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    config: BootstrapConfig = BootstrapConfig(),
) -> np.ndarray:
    """Bootstrap distribution of a statistic: ``statistic(W)`` maps weights (b, n) to values
    (b, ...); returns the values of all ``config.samples`` resamples, (samples, ...)."""
    parts = [
        np.asarray(statistic(w), dtype=np.float64)
        for w in bootstrap_weights(n, config.samples, config.seed, config.max_elements)
    ]
    return np.concatenate(parts, axis=0)


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Percentile interval along axis 0 (NaN resamples ignored): array (2, ...) of lo, hi."""
    alpha = 100.0 * (1.0 - confidence) / 2.0
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN
        return np.nanpercentile(v, [alpha, 100.0 - alpha], axis=0)


def _interval(point: float, lo: float, hi: float) -> dict[str, Any]:
    return {"value": _num(point), "ci": [_num(lo), _num(hi)]}


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _weighted_mean(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-resample mean of `values` (n, ...) ignoring non-finite entries: (b, ...)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    num = w @ np.where(ok, v, 0.0).reshape(len(v), -1)
    den = w @ ok.reshape(len(v), -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out.reshape(len(w), *v.shape[1:])


def mean_ci(values: Sequence[float] | np.ndarray,
            config: BootstrapConfig = BootstrapConfig()) -> dict[str, Any]:
    """Mean of the finite values with its bootstrap interval: {"value", "ci": [lo, hi]}
    (None where there is no finite value)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = v[np.isfinite(v)]
    if len(v) == 0 or len(finite) == 0:
        return {"value": None, "ci": [None, None]}
    point = float(finite.mean())
    dist = bootstrap(len(v), lambda w: _weighted_mean(w, v), config)
    lo, hi = percentile_interval(dist, config.confidence)
    return _interval(point, lo, hi)


def global_metric_ci(counts: np.ndarray, metric: str = "dice",
                     config: BootstrapConfig = BootstrapConfig()) -> dict[str, Any]:
    """A metric of the counts summed over images (the global Dice, ...) with its interval."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1, 4)
    if len(c) == 0:
        return {"value": None, "ci": [None, None]}
    f = _FUNCS[metric]
    dist = bootstrap(len(c), lambda w: np.atleast_1d(f(w @ c)), config)
    lo, hi = percentile_interval(dist, config.confidence)
    return _interval(f(c.sum(axis=0)), lo, hi)


# ---------------------------------------------------------------------------------- rows
def _is_error(row: Mapping[str, Any]) -> bool:
    err = row.get("error")
    return bool(err) and str(err).strip() not in ("", "None", "nan")


def split_errors(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]],
                                                             list[Mapping[str, Any]]]:
    """(rows with metrics, rows whose image failed): a row fails when its `error` is set or it
    has no confusion counts (no truth)."""
    ok, bad = [], []
    for r in rows:
        has_counts = all(r.get(k) is not None and _finite_or_int(r.get(k))
                         for k in ("tp", "fp", "fn", "tn"))
        (bad if _is_error(r) or not has_counts else ok).append(r)
    return ok, bad


def _finite_or_int(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _counts(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([[int(r["tp"]), int(r["fp"]), int(r["fn"]), int(r["tn"])] for r in rows],
                    dtype=np.int64).reshape(-1, 4)


def _hd95(rows: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
    """Per-image Hausdorff-95 (inf: exactly one mask empty; NaN: not computed), or None when
    no row has one."""
    vals = np.array([np.nan if r.get("hd95") is None else float(r["hd95"]) for r in rows],
                    dtype=np.float64)
    return None if len(vals) == 0 or np.isnan(vals).all() else vals


def _label(v: Any) -> int:
    try:
        return int(v) if v is not None and math.isfinite(float(v)) else -1
    except (TypeError, ValueError):
        return -1


def class_name(label: int, class_names: Sequence[str]) -> str | None:
    """Name of a class id (None for -1 / unknown, ``class_<i>`` beyond the names)."""
    if label < 0:
        return None
    return str(class_names[label]) if label < len(class_names) else f"class_{label}"


def per_image_values(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every count-based metric per image, recomputed with medseg_core.metrics: name -> (n,)."""
    c = np.asarray(counts).reshape(-1, 4)
    return {m: np.atleast_1d(np.asarray(_FUNCS[m](c), dtype=np.float64)) for m in SEG_METRICS}


# ---------------------------------------------------------------------------------- segmentation
def segmentation_group(counts: np.ndarray, hd95: np.ndarray | None = None,
                       config: BootstrapConfig = BootstrapConfig()) -> dict[str, Any]:
    """Aggregates of one group of images, each with its bootstrap interval.

    For every count metric: ``global`` (from the summed counts), ``mean`` (of the per-image
    values) and their ``global_ci`` / ``mean_ci``. With Hausdorff distances: ``hd95`` with
    ``mean`` / ``mean_ci`` / ``median`` over the images with a finite distance and ``n_inf``
    (images where exactly one of truth and prediction is empty). One bootstrap pass (the same
    resamples) serves all metrics.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
    n = len(c)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    values = per_image_values(c)
    columns = [values[m] for m in SEG_METRICS]
    hd = None if hd95 is None else np.asarray(hd95, dtype=np.float64).reshape(-1)
    cf = c.astype(np.float64)
    k = len(SEG_METRICS)

    def stat(w: np.ndarray) -> np.ndarray:
        summed = w @ cf  # (b, 4)
        glob = [np.atleast_1d(_FUNCS[m](summed)) for m in SEG_METRICS]
        means = _weighted_mean(w, np.stack(columns, axis=1))  # (b, k)
        parts = [np.stack(glob, axis=1), means]
        if hd is not None:
            parts.append(_weighted_mean(w, hd)[:, None])
        return np.concatenate(parts, axis=1)

    dist = bootstrap(n, stat, config)
    lo, hi = percentile_interval(dist, config.confidence)
    total = c.sum(axis=0)
    for i, m in enumerate(SEG_METRICS):
        g = _interval(_FUNCS[m](total), lo[i], hi[i])
        a = _interval(values[m].mean(), lo[k + i], hi[k + i])
        out[m] = {"global": g["value"], "global_ci": g["ci"], "mean": a["value"], "mean_ci": a["ci"]}
    if hd is not None:
        finite = hd[np.isfinite(hd)]
        h = _interval(finite.mean() if len(finite) else np.nan, lo[2 * k], hi[2 * k])
        out["hd95"] = {
            "mean": h["value"],
            "mean_ci": h["ci"] if len(finite) else [None, None],
            "median": _num(np.median(finite)) if len(finite) else None,
            "n_inf": int(np.count_nonzero(np.isinf(hd))),
            "n_missing": int(np.count_nonzero(np.isnan(hd))),
        }
    return out


REPORT_GROUPS = ("all", "unlabelled")


def check_group_names(class_names: Sequence[str]) -> None:
    """Refuse class names that are the report's own group names."""
    clash = set(REPORT_GROUPS) & {str(c) for c in class_names}
    if clash:
        raise ValueError(f"class names {sorted(clash)} are reserved for the report's groups")


def _groups(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, list[int]]:
    """"all" plus one group per true class present (and "unlabelled" for label -1 when some
    images have a label): group name -> row indices."""
    check_group_names(class_names)
    groups: dict[str, list[int]] = {"all": list(range(len(rows)))}
    labels = [_label(r.get("true_label")) for r in rows]
    known = sorted({lab for lab in labels if lab >= 0})
    for lab in known:
        groups[class_name(lab, class_names) or str(lab)] = [
            i for i, v in enumerate(labels) if v == lab]
    if known and any(v < 0 for v in labels):
        groups["unlabelled"] = [i for i, v in enumerate(labels) if v < 0]
    return groups


def segmentation_summary(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                         config: BootstrapConfig = BootstrapConfig()) -> dict[str, Any]:
    """Aggregates with intervals per group (overall "all" and per true class)."""
    ok, _ = split_errors(rows)
    counts = _counts(ok)
    hd = _hd95(ok)
    groups = {}
    for name, idx in _groups(ok, class_names).items():
        groups[name] = segmentation_group(counts[idx], None if hd is None else hd[idx], config)
    return {"groups": groups, "metrics": list(SEG_METRICS) + (["hd95"] if hd is not None else [])}


# ---------------------------------------------------------------------------------- classification
def _scores_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised over leading axes: confusion (..., K, K) (rows true) -> accuracy (...),
    precision/recall/f1 (..., K), macro_f1 (...).

    A class occurs when it is in the truth or the predictions; zero denominators of an occurring
    class give 0 (as `ClassificationMeter`), a class that does not occur gives NaN, and macro-F1
    averages the occurring classes (as scikit-learn does; with every class occurring it is
    `ClassificationMeter.macro_f1`). So a bootstrap resample that happens to miss a rare class
    does not count it as F1 = 0.
    """
    conf = np.asarray(conf, dtype=np.float64)
    diag = np.diagonal(conf, axis1=-2, axis2=-1)
    total = conf.sum(axis=(-2, -1))
    col, row = conf.sum(axis=-2), conf.sum(axis=-1)
    occurs = (row + col) > 0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of no class
        acc = np.where(total > 0, diag.sum(-1) / np.where(total > 0, total, 1), np.nan)
        prec = np.where(col > 0, diag / np.where(col > 0, col, 1), 0.0)
        rec = np.where(row > 0, diag / np.where(row > 0, row, 1), 0.0)
        s = prec + rec
        f1 = np.where(s > 0, 2 * prec * rec / np.where(s > 0, s, 1), 0.0)
        prec, rec, f1 = (np.where(occurs, v, np.nan) for v in (prec, rec, f1))
        macro = np.nanmean(f1, axis=-1)
    return {"accuracy": acc, "precision": prec, "recall": rec, "f1": f1, "macro_f1": macro}


def classification_summary(true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray,
                           class_names: Sequence[str],
                           config: BootstrapConfig = BootstrapConfig()) -> dict[str, Any] | None:
    """Confusion matrix (rows true, columns predicted), accuracy, macro-F1 and per-class
    precision/recall/F1/support, each score with its bootstrap interval.

    Pairs with an unknown true or predicted class (-1) are left out; None when none is left.
    Scores follow `_scores_from_confusion`: with every class occurring they equal
    `medseg_core.metrics.ClassificationMeter`; a class that never occurs has no scores (None)
    and is not averaged into macro-F1.
    """
    t = np.asarray(true, dtype=np.int64).reshape(-1)
    p = np.asarray(pred, dtype=np.int64).reshape(-1)
    if len(t) != len(p):
        raise ValueError(f"{len(p)} predictions for {len(t)} true labels")
    keep = (t >= 0) & (p >= 0)
    t, p = t[keep], p[keep]
    if len(t) == 0:
        return None
    k = max(len(class_names), int(t.max()) + 1, int(p.max()) + 1)
    names = [class_name(i, class_names) or str(i) for i in range(k)]
    meter = M.ClassificationMeter(k)
    meter.update(p, t)
    conf = meter.confusion
    onehot = np.zeros((len(t), k * k), dtype=np.float64)
    onehot[np.arange(len(t)), t * k + p] = 1.0

    def stat(w: np.ndarray) -> np.ndarray:
        s = _scores_from_confusion((w @ onehot).reshape(len(w), k, k))
        return np.concatenate([s["accuracy"][:, None], s["macro_f1"][:, None],
                               s["precision"], s["recall"], s["f1"]], axis=1)

    dist = bootstrap(len(t), stat, config)
    lo, hi = percentile_interval(dist, config.confidence)
    point = _scores_from_confusion(conf)
    per_class = {}
    for i, name in enumerate(names):
        per_class[name] = {
            "precision": _interval(point["precision"][i], lo[2 + i], hi[2 + i]),
            "recall": _interval(point["recall"][i], lo[2 + k + i], hi[2 + k + i]),
            "f1": _interval(point["f1"][i], lo[2 + 2 * k + i], hi[2 + 2 * k + i]),
            "support": int(conf[i].sum()),
            "predicted": int(conf[:, i].sum()),
        }
    return {
        "n": int(len(t)),
        "class_names": names,
        "confusion": conf.tolist(),
        "accuracy": _interval(point["accuracy"], lo[0], hi[0]),
        "macro_f1": _interval(point["macro_f1"], lo[1], hi[1]),
        "per_class": per_class,
    }


# ---------------------------------------------------------------------------------- cases
CASE_METRIC_COLUMNS = ("hd95", "lesion_area_fraction", "seconds", "height", "width")


# case metrics where less is better: a distance, a time
LOWER_IS_BETTER = frozenset({"hd95", "seconds"})


def check_case_metric(metric: str) -> str:
    """``metric`` when `select_cases` can rank images by it, else ValueError (checked before
    any prediction, rather than after an hour of it)."""
    if metric not in _FUNCS and metric not in CASE_METRIC_COLUMNS:
        raise ValueError(f"unknown case metric {metric!r}: one of "
                         f"{sorted(_FUNCS) + list(CASE_METRIC_COLUMNS)}")
    return metric


def select_cases(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] = (),
                 metric: str = "dice", per_class: bool = False) -> list[dict[str, Any]]:
    """Best, median and worst image by a per-image metric (recomputed from the counts), overall
    and, with ``per_class``, within each true class.

    Ties are broken deterministically, preferring informative cases: among equal scores the
    "best" is an image with a lesion in its truth (the largest), and ids break remaining ties.
    Returns dicts with which (best/median/worst), group, id, metric, value, true/pred class.
    """
    ok, _ = split_errors(rows)
    if not ok:
        return []
    counts = _counts(ok)
    if metric in _FUNCS:
        values = per_image_values(counts)[metric]
    else:
        if not any(metric in r for r in ok):
            raise ValueError(f"unknown case metric {metric!r}: one of {sorted(_FUNCS)}, hd95, "
                             "or a column of the rows")
        values = np.array([np.nan if _missing(r.get(metric)) else float(r[metric])
                           for r in ok], dtype=np.float64)
    higher_is_better = metric not in LOWER_IS_BETTER
    score = np.where(np.isfinite(values), values, -np.inf if higher_is_better else np.inf)
    if not higher_is_better:
        score = -score
    truth_area = counts[:, 0] + counts[:, 2]
    groups = _groups(ok, class_names) if per_class else {"all": list(range(len(ok)))}
    cases: list[dict[str, Any]] = []
    for group, idx in groups.items():
        if not idx:
            continue
        order = sorted(idx, key=lambda i: (score[i], truth_area[i] > 0, truth_area[i],
                                           str(ok[i].get("id"))))
        picks = {"best": order[-1], "median": order[(len(order) - 1) // 2], "worst": order[0]}
        for which in _CASE_ORDER:
            i = picks[which]
            r = ok[i]
            cases.append({
                "which": which,
                "group": group,
                "id": str(r.get("id")),
                "metric": metric,
                "value": _num(values[i]),
                "true_class": class_name(_label(r.get("true_label")), class_names),
                "pred_class": predicted_class(r, class_names),
            })
    return cases


# ---------------------------------------------------------------------------------- TTA effect
def compare_variants(base: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]],
                     config: BootstrapConfig = BootstrapConfig(),
                     names: tuple[str, str] = ("without", "with")) -> dict[str, Any]:
    """Paired comparison of two predictions of the same images (e.g. without and with TTA).

    Images are matched by id (those failing in either are left out). Per metric: each variant's
    per-image mean and global value, and the differences (other - base) with paired bootstrap
    intervals (the same resamples applied to both), plus how many images' Dice went up/down.
    """
    a_ok, _ = split_errors(base)
    b_ok, _ = split_errors(other)
    b_by_id = {str(r["id"]): r for r in b_ok}
    pairs = [(r, b_by_id[str(r["id"])]) for r in a_ok if str(r["id"]) in b_by_id]
    pairs.sort(key=lambda ab: str(ab[0]["id"]))
    out: dict[str, Any] = {"n": len(pairs), "variants": list(names), "metrics": {}}
    if not pairs:
        return out
    ca = _counts([a for a, _ in pairs]).astype(np.float64)
    cb = _counts([b for _, b in pairs]).astype(np.float64)
    va, vb = per_image_values(ca), per_image_values(cb)
    k = len(SEG_METRICS)
    diff = np.stack([vb[m] - va[m] for m in SEG_METRICS], axis=1)

    def stat(w: np.ndarray) -> np.ndarray:
        sa, sb = w @ ca, w @ cb
        glob = [np.atleast_1d(_FUNCS[m](sb)) - np.atleast_1d(_FUNCS[m](sa)) for m in SEG_METRICS]
        return np.concatenate([np.stack(glob, axis=1), _weighted_mean(w, diff)], axis=1)

    dist = bootstrap(len(pairs), stat, config)
    lo, hi = percentile_interval(dist, config.confidence)
    ta, tb = ca.sum(axis=0), cb.sum(axis=0)
    for i, m in enumerate(SEG_METRICS):
        ga, gb = float(_FUNCS[m](ta)), float(_FUNCS[m](tb))
        out["metrics"][m] = {
            f"{names[0]}_mean": _num(va[m].mean()),
            f"{names[1]}_mean": _num(vb[m].mean()),
            f"{names[0]}_global": _num(ga),
            f"{names[1]}_global": _num(gb),
            "delta_global": _interval(gb - ga, lo[i], hi[i]),
            "delta_mean": _interval(diff[:, i].mean(), lo[k + i], hi[k + i]),
        }
    d = diff[:, 0]
    out["dice_improved"] = int(np.count_nonzero(d > 1e-12))
    out["dice_worsened"] = int(np.count_nonzero(d < -1e-12))
    out["dice_unchanged"] = int(len(d) - out["dice_improved"] - out["dice_worsened"])
    acc = []
    for side in (0, 1):
        t = np.array([_label(ab[side].get("true_label")) for ab in pairs])
        p = np.array([_label(ab[side].get("label")) for ab in pairs])
        keep = (t >= 0) & (p >= 0)
        acc.append(float(np.mean(t[keep] == p[keep])) if keep.any() else None)
    if acc[0] is not None:
        out["accuracy"] = {names[0]: acc[0], names[1]: acc[1]}
    return out


# ---------------------------------------------------------------------------------- summary
def summarize(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], *,
              baseline_rows: Sequence[Mapping[str, Any]] | None = None,
              bootstrap_config: BootstrapConfig = BootstrapConfig(),
              case_metric: str = "dice", per_class_cases: bool = False,
              max_errors: int = 100) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready builtins (non-finite numbers -> None).

    ``rows``: the evaluated predictions; ``baseline_rows``: the same images predicted without
    test-time augmentation (the TTA effect is then reported as ``tta``).
    """
    ok, bad = split_errors(rows)
    true = [_label(r.get("true_label")) for r in ok]
    pred = [_label(r.get("label")) for r in ok]
    predicted: dict[str, int] = {}
    for lab in pred:
        key = class_name(lab, class_names) or "none"
        predicted[key] = predicted.get(key, 0) + 1
    errors = [{"id": str(r.get("id")), "source": r.get("source"), "error": str(r.get("error") or
               "no ground-truth counts")} for r in bad]
    summary: dict[str, Any] = {
        "n_images": len(rows),
        "n_evaluated": len(ok),
        "n_errors": len(bad),
        "errors": errors[:max_errors],
        "class_names": [str(c) for c in class_names],
        "segmentation": segmentation_summary(ok, class_names, bootstrap_config),
        "classification": classification_summary(true, pred, class_names, bootstrap_config)
        if any(p >= 0 for p in pred) else None,
        "predicted_classes": predicted,
        "cases": select_cases(ok, class_names, case_metric, per_class_cases),
        "bootstrap": {**asdict(bootstrap_config), "method": "percentile"},
        "tta": None,
    }
    if baseline_rows is not None:
        summary["tta"] = compare_variants(baseline_rows, rows, bootstrap_config)
    return to_jsonable(summary)


def to_jsonable(obj: Any) -> Any:
    """Builtins only, non-finite floats as None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


# ---------------------------------------------------------------------------------- table
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _probabilities(value: Any, names: Sequence[str]) -> dict[str, float]:
    """Class probabilities of a row (a list in the classifier's class order, or a mapping)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items() if not _missing(v)}
    vals = list(value)
    return {(str(names[i]) if i < len(names) else f"class_{i}"): float(v)
            for i, v in enumerate(vals) if not _missing(v)}


def predicted_class(row: Mapping[str, Any], class_names: Sequence[str]) -> str | None:
    """The row's predicted class name (its ``label_name``, else from ``label``)."""
    name = row.get("label_name")
    if not _missing(name) and str(name):
        return str(name)
    return class_name(_label(row.get("label")), class_names)


def _float(v: Any) -> float | None:
    return None if _missing(v) else float(v)


def _int(v: Any) -> int | None:
    return None if _missing(v) else int(v)


def table_records(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> list[dict]:
    """The per-image table: one flat dict of scalars per row (for Parquet and CSV), by id.

    Columns: id, source, true_label, true_class, label, pred_class, the metrics of
    `TABLE_METRICS` (recomputed from the counts with `medseg_core.metrics`; hd95 as given, inf
    where exactly one mask is empty), tp/fp/fn/tn, lesion_area_fraction, bbox_x0/y0/x1/y1,
    prob_<class> per class, height, width, seconds, segmenter_version, classifier_version,
    error. Missing values are None.
    """
    names = [str(c) for c in class_names]
    prob_names: list[str] = list(names)
    for r in rows:
        for k in _probabilities(r.get("probabilities"), names):
            if k not in prob_names:
                prob_names.append(k)
    out = []
    for r in sorted(rows, key=lambda r: str(r.get("id"))):
        ok = not _is_error(r) and all(_finite_or_int(r.get(k)) for k in ("tp", "fp", "fn", "tn"))
        t, p = _label(r.get("true_label")), _label(r.get("label"))
        rec: dict[str, Any] = {
            "id": str(r.get("id")),
            "source": None if _missing(r.get("source")) else str(r.get("source")),
            "true_label": t,
            "true_class": class_name(t, names),
            "label": p,
            "pred_class": predicted_class(r, names),
        }
        if ok:
            c = _counts([r])
            vals = per_image_values(c)
            rec.update({m: float(vals[m][0]) for m in SEG_METRICS})
            rec["hd95"] = _float(r.get("hd95"))
            rec.update(tp=int(c[0, 0]), fp=int(c[0, 1]), fn=int(c[0, 2]), tn=int(c[0, 3]))
        else:
            rec.update(dict.fromkeys(TABLE_METRICS))
            rec.update(dict.fromkeys(("tp", "fp", "fn", "tn")))
        rec["lesion_area_fraction"] = _float(r.get("lesion_area_fraction"))
        bbox = r.get("bbox")
        bbox = list(bbox) if bbox is not None and len(bbox) == 4 else [None] * 4
        for key, v in zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"), bbox):
            rec[key] = _int(v)
        probs = _probabilities(r.get("probabilities"), names)
        for name in prob_names:
            rec[f"prob_{name}"] = probs.get(name)
        for key in ("height", "width"):
            rec[key] = _int(r.get(key))
        rec["seconds"] = _float(r.get("seconds"))
        for key in ("segmenter_version", "classifier_version"):
            rec[key] = None if _missing(r.get(key)) else str(r[key])
        rec["error"] = str(r["error"]) if _is_error(r) else None
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------- TTA
def _flip(a: np.ndarray, flip: str) -> np.ndarray:
    if flip == "identity":
        return a
    if flip == "hflip":
        return np.ascontiguousarray(a[:, ::-1])
    if flip == "vflip":
        return np.ascontiguousarray(a[::-1])
    if flip == "hvflip":
        return np.ascontiguousarray(a[::-1, ::-1])
    raise ValueError(f"unknown flip {flip!r}; expected identity, hflip, vflip or hvflip")


def flip_tta(segmenter: Any, flips: Sequence[str] = FLIPS) -> FlipTTA:
    """`FlipTTA` over the plain maps of `segmenter` (a `Segmenter`), with the bundle's
    largest-component rule applied to the averaged map: the flip a bundle chose was averaged
    in a second time, and a component kept in each flipped map was not one in their mean."""
    plain = copy.copy(segmenter)  # the same model and settings
    largest = bool(getattr(segmenter, "keep_largest", False))
    for name in ("flip", "keep_largest"):
        if hasattr(plain, name):
            setattr(plain, name, False)
    return FlipTTA(plain, flips, keep_largest=largest)


class FlipTTA:
    """Test-time augmentation around a `medseg_core.inference.Segmenter` (or anything with
    ``predict_proba(images) -> list of HxW maps`` and a ``threshold``).

    The foreground probabilities are averaged over flipped copies of each image (default:
    identity, horizontal and vertical flip), each map flipped back before averaging; masks are
    the averaged probability above the threshold. Drop-in for the segmenter of a
    `medseg_core.inference.Chain`: ``Chain(FlipTTA(segmenter), classifier)``.

    The wrapped segmenter should predict plain maps (``Segmenter(..., flip=False,
    keep_largest=False)``): its own mirror averaging would count the horizontal flip twice.
    ``keep_largest`` then keeps the largest component of the averaged mask at ``threshold``,
    as the bundle's post-processing does for one map (a component cut from each flipped map
    before averaging is not one after it).
    """

    def __init__(self, segmenter: Any, flips: Sequence[str] = FLIPS,
                 keep_largest: bool = False) -> None:
        flips = tuple(str(f) for f in flips)
        if not flips:
            raise ValueError("FlipTTA needs at least one flip")
        for f in flips:
            _flip(np.zeros((1, 1)), f)  # validates the name
        self.segmenter = segmenter
        self.flips = flips
        self.keep_largest = bool(keep_largest)

    @property
    def threshold(self) -> float:
        return float(self.segmenter.threshold)

    @property
    def version(self) -> str | None:
        v = getattr(self.segmenter, "version", None)
        return None if v is None else f"{v}+tta({','.join(self.flips)})"

    @property
    def config(self) -> dict[str, Any]:
        return self.segmenter.config

    def check_work(self, shape: Sequence[int]) -> None:
        """The wrapped segmenter's work limit (`Segmenter.check_work`), where it has one."""
        check = getattr(self.segmenter, "check_work", None)
        if check is not None:
            check(shape)

    def predict_proba(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Mean foreground probability over the flips (float32 HxW per image)."""
        images = list(images)
        total: list[np.ndarray] | None = None
        for flip in self.flips:
            probs = self.segmenter.predict_proba([_flip(np.asarray(im), flip) for im in images])
            back = [_flip(np.asarray(p, dtype=np.float64), flip) for p in probs]
            total = back if total is None else [t + b for t, b in zip(total, back)]
        out = [(t / len(self.flips)).astype(np.float32) for t in (total or [])]
        if self.keep_largest:
            from medseg_core.postprocess import zero_outside_largest

            for p in out:
                zero_outside_largest(p, self.threshold)
        return out

    def predict(self, images: Sequence[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        """Binary masks (uint8 {0,1}): averaged probability > threshold (default the bundle's)."""
        from medseg_core.inference import check_threshold

        checked = check_threshold(threshold)
        t = self.threshold if checked is None else checked
        return [(p > t).astype(np.uint8) for p in self.predict_proba(images)]
