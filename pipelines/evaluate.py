"""Evaluate a segmenter bundle, and optionally the classifier through the chain, on one split of
an archive; write a self-contained HTML report, summary.json, per-image tables and figures.

    python pipelines/evaluate.py                                   # the demo run, test split
    python pipelines/evaluate.py evaluate.tta.enabled=true         # + flip TTA, with its effect
    python pipelines/evaluate.py data=busi run_name=busi evaluate.split=all evaluate.backend=ray
    python pipelines/evaluate.py evaluate.segmenter=s3://models/seg/best evaluate.classifier=null

Settings: pipelines/conf/evaluate.yaml (Hydra; the data group is the training one, so
``split=test`` is exactly the near-duplicate-grouped test split training held out).

Output under ``evaluate.out``: ``report.html`` (open it in a browser; every figure embedded),
``summary.json`` (the numbers of the report), ``per_image.parquet`` / ``per_image.csv`` (one row
per image: Dice, IoU, thresholded Jaccard, sensitivity, specificity, precision, recall,
Hausdorff-95, true and predicted class, ...; with TTA also ``per_image_no_tta.*``) and
``figures/*.png``.

Backends: ``local`` predicts in this process (small archives); ``ray`` streams the archive
through the shared Ray Data prediction step (`pipelines.predict.predict_records`, an actor pool
of `Chain`s, GPUs when asked); ``auto`` picks by image count. Both produce identical rows
(`medseg_core.results.prediction_row`); aggregation and the report are Ray-free
(`medseg_core.evaluation`, `medseg_core.report`).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and (_ROOT / "medseg_core").is_dir():  # `python pipelines/evaluate.py`
    sys.path.insert(0, str(_ROOT))

import fsspec
import hydra
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from omegaconf import DictConfig

from medseg_core.checkpoint import BundleNotFoundError, check_bundle_task, load_bundle
from medseg_core.evaluation import (
    FLIPS,
    BootstrapConfig,
    check_case_metric,
    check_group_names,
    flip_tta,
    summarize,
    table_records,
)
from medseg_core.inference import Chain, Classifier, Segmenter, check_threshold
from medseg_core.io import decode_mask, remove_path
from medseg_core.layouts import Record
from medseg_core.precision import check_device, resolve_device
from medseg_core.report import case_montage, write_report
from medseg_core.results import error_row, prediction_row
from medseg_core.viz import confusion_matrix_image, plot_curves
from pipelines import CONF_DIR
from pipelines.cluster import check_fits, check_shared_paths, connect, disconnect
from pipelines.config import (
    check_actor_pool,
    check_whole,
    explained_storage_errors,
    reported_refusals,
    resolve,
)
from pipelines.data import (
    REPORT_NAME,
    _max_bytes,
    _max_pixels,
    blamed_path,
    check_decode_settings,
    check_split,
    is_packed,
    load_any_record,
    load_records,
    load_splits,
    read_settings,
    report_options,
    report_path,
    storage_options,
)
from pipelines.predict import ChainPredictor, error_text, predict_records, rows_to_table
from pipelines.runlog import CURVE_KEYS, SPLITS_FILE, join, read_splits, split_digest

SPLITS = ("test", "val", "train", "all")
BACKENDS = ("local", "ray", "auto")
_STRING_COLUMNS = {"id", "source", "true_class", "pred_class", "segmenter_version",
                   "classifier_version", "error"}
_INT_COLUMNS = {"true_label", "label", "tp", "fp", "fn", "tn", "bbox_x0", "bbox_y0", "bbox_x1",
                "bbox_y1", "height", "width"}


# ----------------------------------------------------------------------------------------------
# What to evaluate


def select_records(cfg: dict[str, Any]) -> list[Record]:
    """The records of ``evaluate.split`` (the training split, or every listed record), cut to
    ``evaluate.limit``."""
    ev = cfg["evaluate"]
    check_decode_settings(cfg["data"])
    if ev.get("backend", "local") == "local":  # this process's GPUs (Ray's are its nodes')
        resolve_device(ev.get("device", "auto"), "evaluate.device")
    else:
        check_device(ev.get("device", "auto"), "evaluate.device")
    # the Ray backend reads image files by URI; `auto` chooses it for raw archives only
    if ev.get("backend") == "ray" and is_packed(cfg["data"]):
        raise ValueError("evaluate.backend=ray reads image files by URI (pipelines/predict.py) "
                         "and cannot read packed archives yet; use evaluate.backend=local "
                         "(or auto)")
    split = str(ev.get("split", "test"))
    if split not in SPLITS:
        raise ValueError(f"evaluate.split must be one of {SPLITS}, got {split!r}")
    if split == "all":  # no split, so no check: a bad record becomes an error row
        records = list(load_records(cfg, check=False)[0])
    else:
        splits = load_splits(cfg)
        if split not in splits:
            raise ValueError(f"split {split!r} does not exist with data.split.mode="
                             f"{cfg['data']['split'].get('mode')!r} (have {sorted(splits)})")
        records = list(splits[split])
        check_held_out(cfg, split, records)
    limit = ev.get("limit")
    check_whole(limit, "evaluate.limit", 1, none=True)  # null: all
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"split {split!r} of {cfg['data']['url']} has no images")
    return records


def check_held_out(cfg: Mapping[str, Any], split: str, records: Sequence[Record]) -> None:
    """Refuse to score a split other than the one the segmenter's run held out. A bundle at
    ``<run>/<stage>/best`` (or ``latest``) has its run's `splits.json` two levels up; where the
    split computed now holds other records (the archive or the split settings changed, or
    medseg's split did), its images may be ones the model was trained or selected on."""
    uri = str(cfg["evaluate"]["segmenter"]).rstrip("/")
    parts = uri.rsplit("/", 2)
    if len(parts) != 3 or parts[2] not in ("best", "latest"):
        return
    recorded = (read_splits(parts[0], _bundle_so(cfg, uri)) or {}).get(split)
    now = split_digest([r.id for r in records])
    if recorded is not None and recorded != now:
        # an in-process trainer checks every record and leaves bad ones out of its splits
        checked = load_splits(dict(cfg), check=True)[split]
        if split_digest([r.id for r in checked]) == recorded:
            return
        raise ValueError(
            f"the {split} split of {cfg['data']['url']} is not the one run {parts[0]} held out "
            f"({now['count']} images now, {recorded['count']} then, other ids; its "
            f"{SPLITS_FILE}): the archive, "
            "the split settings or medseg's split changed since training, so it may hold images "
            "the model was trained or selected on. Evaluate with the run's own data and "
            "data.split settings, or evaluate.split=all")


def choose_backend(backend: str, n_images: int, auto_min_images: int = 2000,
                   packed: bool = False) -> str:
    """local or ray; ``auto`` is ray from ``auto_min_images`` images on, local for a packed
    archive (which the Ray backend does not read)."""
    if backend not in BACKENDS:
        raise ValueError(f"evaluate.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "ray" if n_images >= int(auto_min_images) and not packed else "local"
    return backend


def tta_flips(ev: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The TTA flips, or None when TTA is off."""
    tta = ev.get("tta") or {}
    if isinstance(tta, bool):
        return FLIPS if tta else None
    flips = tta.get("flips")
    flips = FLIPS if flips is None else tuple(str(f) for f in flips)
    # checked with TTA off too: switching it on later must not be the first to find the typo
    if not flips or any(f not in FLIPS for f in flips):
        raise ValueError(f"evaluate.tta.flips must name at least one of {list(FLIPS)}, got "
                         f"{list(flips)}")
    return flips if tta.get("enabled") else None


def bundle_version(uri: str, so: dict | None = None) -> str | None:
    """The `version` of a bundle (None where it cannot be read)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri.rstrip("/"), **(so or {}))
        return fs.cat_file(f"{path}/version").decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return None


def _bundle_so(cfg: Mapping[str, Any], uri: str) -> dict | None:
    return storage_options(cfg["data"], uri)


# ----------------------------------------------------------------------------------------------
# In-process prediction


class LocalPredictor:
    """Chains in this process: the plain one and, with TTA, the same models under `FlipTTA`."""

    def __init__(self, cfg: Mapping[str, Any], flips: Sequence[str] | None,
                 device: str | None = None):
        ev = cfg["evaluate"]
        device = resolve_device(device or ev.get("device", "auto"), "evaluate.device")
        bs = int(ev.get("batch_size", 8))
        seg_uri, cls_uri = ev["segmenter"], ev.get("classifier")
        segmenter = Segmenter(load_bundle(seg_uri, storage_options=_bundle_so(cfg, seg_uri)),
                              device, bs)
        classifier = None
        if cls_uri:
            classifier = Classifier(load_bundle(cls_uri, storage_options=_bundle_so(cfg, cls_uri)),
                                    device, bs)
        self.chains: dict[str, Chain] = {"plain": Chain(segmenter, classifier)}
        if flips:
            self.chains["tta"] = Chain(flip_tta(segmenter, flips), classifier)
        self.threshold = ev.get("threshold")
        self.hausdorff = bool(ev.get("hausdorff", True))
        self.cfg = cfg

    @property
    def versions(self) -> dict[str, str | None]:
        return self.chains["plain"].versions

    def _predict(self, chain: Chain, images: list[np.ndarray]) -> list[Any]:
        try:
            return list(chain.predict(images, self.threshold))
        except Exception:  # find the image that fails; the others still get rows
            out: list[Any] = []
            for image in images:
                try:
                    out.append(chain.predict([image], self.threshold)[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def predict(self, records: Sequence[Record]) -> dict[str, tuple[list[dict], list[Any]]]:
        """variant -> (rows, outputs) for a batch of records (outputs: Chain items or None)."""
        loaded = []
        for rec in records:
            t0 = time.perf_counter()
            try:
                sample = load_any_record(rec, self.cfg, keep_grey=True)
                loaded.append((sample, None, time.perf_counter() - t0))
            except Exception as exc:  # a bad file is an error row, not a crash
                # a missing file is named (a mask, not its image), as the Ray backend does
                uri = blamed_path(exc, rec) if isinstance(exc, FileNotFoundError) else \
                    rec.image_uri
                loaded.append((None, error_text(exc, uri), time.perf_counter() - t0))
        ok = [i for i, (s, _, _) in enumerate(loaded) if s is not None]
        result = {}
        for variant, chain in self.chains.items():
            t0 = time.perf_counter()
            outs = self._predict(chain, [loaded[i][0]["image"] for i in ok]) if ok else []
            share = (time.perf_counter() - t0) / max(len(ok), 1)
            by_index = dict(zip(ok, outs))
            rows, outputs = [], []
            for i, rec in enumerate(records):
                sample, error, seconds = loaded[i]
                out = by_index.get(i)
                versions = chain.versions
                if sample is None or out is None or isinstance(out, BaseException):
                    if error is None:
                        error = error_text(out, rec.image_uri) if out is not None else "no output"
                    rows.append(error_row(rec.id, rec.image_uri, error, true_label=rec.label,
                                          seconds=seconds, versions=versions))
                    outputs.append(None)
                    continue
                truth = sample["mask"] if rec.mask_uris else None  # packed: the row's own
                try:
                    row = prediction_row(rec.id, rec.image_uri, out, truth=truth,
                                         true_label=rec.label, seconds=seconds + share,
                                         versions=versions, hausdorff=self.hausdorff)
                except Exception as exc:
                    row = error_row(rec.id, rec.image_uri, error_text(exc, rec.image_uri),
                                    true_label=rec.label, seconds=seconds, versions=versions)
                rows.append(row)
                outputs.append(out)
            result[variant] = (rows, outputs)
        return result


def predict_local(records: Sequence[Record], cfg: Mapping[str, Any],
                  flips: Sequence[str] | None) -> dict[str, list[dict]]:
    """variant ("plain", and "tta" when flips) -> result rows, predicted in this process."""
    predictor = LocalPredictor(cfg, flips)
    bs = int(cfg["evaluate"].get("batch_size", 8))
    rows: dict[str, list[dict]] = {v: [] for v in predictor.chains}
    start, last = time.perf_counter(), 0.0
    for i in range(0, len(records), bs):
        for variant, (part, _) in predictor.predict(records[i:i + bs]).items():
            rows[variant].extend(part)
        done = min(i + bs, len(records))
        now = time.perf_counter()
        if now - last > 5 or done == len(records):
            last = now
            print(f"[evaluate] {done}/{len(records)} images, "
                  f"{done / max(now - start, 1e-9):.1f} images/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Ray Data prediction (the shared step of pipelines/predict.py)


class EvalPredictor(ChainPredictor):
    """`ChainPredictor` that also predicts with flip TTA (``tta_flips``): each batch gives one
    row per image and variant, marked in a ``variant`` column ("plain" and, with TTA, "tta";
    ``variants`` picks which), so one pass over the archive serves both sides of the TTA
    comparison."""

    def __init__(self, *args: Any, tta_flips: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        plain = self.chain
        chains = {"plain": plain}
        if tta_flips:
            chains["tta"] = Chain(flip_tta(plain.segmenter, tta_flips), plain.classifier)
        wanted = list(variants or chains)
        unknown = [v for v in wanted if v not in chains]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; have {sorted(chains)}")
        self.variant_chains = {v: chains[v] for v in wanted}
        self.variant_schema = self.schema.append(pa.field("variant", pa.string()))

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        records = self.records(batch)
        tables = []
        for variant, chain in self.variant_chains.items():
            self.chain, self.versions = chain, chain.versions
            rows = self.predict_rows(records)
            for r in rows:
                r["variant"] = variant
            tables.append(rows_to_table(rows, self.variant_schema))
        return pa.concat_tables(tables)


def predict_ray(records: Sequence[Record], cfg: Mapping[str, Any], flips: Sequence[str] | None,
                *, with_masks: bool = False,
                variants: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """variant ("plain", and "tta" with flips; or ``variants``) -> result rows, from the shared
    Ray Data step `pipelines.predict.predict_records` (streamed, collected here). `records`
    are raw files: `select_records` refuses the Ray backend for a packed archive."""
    ev, data = cfg["evaluate"], cfg["data"]
    rc = ev.get("ray") or {}
    connect(rc.get("address"), rc.get("local_num_cpus"))
    concurrency = rc.get("concurrency")
    if isinstance(concurrency, (list, tuple)):
        concurrency = tuple(int(c) for c in concurrency)
    elif concurrency is not None:
        concurrency = int(concurrency)
    read = {"data.url": str(data["url"]), "evaluate.segmenter": str(ev["segmenter"])}
    if ev.get("classifier"):
        read["evaluate.classifier"] = str(ev["classifier"])
    actors = concurrency[-1] if isinstance(concurrency, tuple) else concurrency
    shape = {"CPU": float(rc.get("num_cpus") or 1), "GPU": float(rc.get("num_gpus") or 0)}
    check_fits(shape, "one actor of evaluation's pool",
               "Set evaluate.ray.num_gpus=0 (and evaluate.ray.num_cpus to what this machine "
               "has) or evaluate.backend=local, or join a cluster that has the resources "
               "(evaluate.ray.address or RAY_ADDRESS).")
    check_shared_paths({}, read, shape, int(actors or 1), "evaluation's actors")
    ds = predict_records(
        list(records),
        seg_uri=ev["segmenter"],
        cls_uri=ev.get("classifier") or None,
        storage_options=storage_options(data),
        batch_size=int(ev.get("batch_size", 8)),
        concurrency=concurrency,
        num_gpus=float(rc.get("num_gpus") or 0),
        num_cpus=float(rc.get("num_cpus") or 1),
        threshold=ev.get("threshold"),
        with_masks=with_masks,
        predictor=EvalPredictor,
        predictor_kwargs={
            "tta_flips": tuple(flips) if flips else None,
            "variants": tuple(variants) if variants else None,
            "hausdorff": bool(ev.get("hausdorff", True)),
            "channels": int(data.get("channels", 3)),
            "mask_threshold": int(data.get("mask_threshold", 127)),
            "max_pixels": _max_pixels(data),
            "max_bytes": _max_bytes(data),
            "io_threads": int(read_settings(data)["io_threads"]),
            "model_batch_size": int(ev.get("batch_size", 8)),
            # as the driver checked them (the archive's options are for the images)
            "bundle_storage_options": _bundle_so(cfg, next(
                (u for u in (ev["segmenter"], ev.get("classifier")) if u and "://" in str(u)),
                ev["segmenter"])) or {},
        },
        forward_credentials=bool(data.get("forward_credentials", True)),
    )
    rows: dict[str, list[dict]] = {}
    start, last, n = time.perf_counter(), 0.0, 0
    n_variants = len(variants) if variants else (2 if flips else 1)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            rows.setdefault(row.pop("variant"), []).append(row)
        n += table.num_rows // n_variants
        now = time.perf_counter()
        if now - last > 5:
            last = now
            print(f"[evaluate] {n}/{len(records)} images, "
                  f"{n / max(now - start, 1e-9):.1f} images/s", flush=True)
    print(f"[evaluate] {n}/{len(records)} images (Ray Data)", flush=True)
    # Ray Data yields rows in completion order; the records' order makes the summary (its
    # bootstrap resamples by position) identical to the in-process backend's
    position = {r.id: i for i, r in enumerate(records)}
    return {k: sorted(v, key=lambda row: position[str(row["id"])]) for k, v in rows.items()}


# ----------------------------------------------------------------------------------------------
# Pictures


def case_pictures(cases: Sequence[Mapping[str, Any]], records: Sequence[Record],
                  cfg: Mapping[str, Any], backend: str, flips: Sequence[str] | None) -> list[dict]:
    """Image, truth and the evaluated prediction of each selected case.

    The prediction is recomputed for these few images with the same Chain (TTA included): in
    this process when the rows were predicted on CPUs (the same computation), by the Ray Data
    step on GPU actors otherwise, so the pictures show what was scored."""
    by_id = {r.id: r for r in records}
    ids = list(dict.fromkeys(c["id"] for c in cases if c["id"] in by_id))
    if not ids:
        return []
    recs = [by_id[i] for i in ids]
    masks: dict[str, np.ndarray] = {}
    on_gpus = float((cfg["evaluate"].get("ray") or {}).get("num_gpus") or 0) > 0
    if backend == "ray" and on_gpus:
        variant = "tta" if flips else "plain"
        for row in predict_ray(recs, cfg, flips, with_masks=True, variants=[variant])[variant]:
            if row.get("mask_png"):
                masks[str(row["id"])] = decode_mask(row["mask_png"])
    else:
        predictor = LocalPredictor(cfg, flips, device="cpu" if backend == "ray" else None)
        variant = "tta" if flips else "plain"
        _, outputs = predictor.predict(recs)[variant]
        masks = {r.id: o["mask"] for r, o in zip(recs, outputs) if o is not None}
    out = []
    for c in cases:
        if c["id"] not in masks:
            continue
        sample = load_any_record(by_id[c["id"]], cfg, keep_grey=True)
        out.append({**c, "image": sample["image"], "truth": sample["mask"],
                    "pred": masks[c["id"]]})
    return out


def _read_url(url: str, so: dict | None) -> bytes | None:
    try:
        fs, path = fsspec.core.url_to_fs(url, **(so or {}))
        return fs.cat_file(path) if fs.exists(path) else None
    except (OSError, ValueError):
        return None


def find_training_log(bundle_uri: str, so: dict | None = None) -> tuple[Any, str] | None:
    """The training curves of the run a bundle came from, and a one-line note.

    A bundle at ``<run>/<stage>/best`` (or ``latest``) has its stage's log next to it
    (`pipelines.runlog`): ``metrics.csv`` (plotted here) or, failing that, ``curves.png``.
    None when neither is there.
    """
    stage_dir = bundle_uri.rstrip("/").rsplit("/", 1)[0]
    stage = stage_dir.rsplit("/", 1)[-1]
    text = _read_url(join(stage_dir, "metrics.csv"), so)
    if text:
        rows = list(csv.DictReader(io.StringIO(text.decode("utf-8", "replace"))))

        def value(row: Mapping[str, str], key: str) -> float:
            try:
                return float(row.get(key) or "nan")
            except ValueError:
                return float("nan")

        series = {k: [value(r, k) for r in rows] for k in CURVE_KEYS
                  if any(r.get(k) not in (None, "") for r in rows)}
        if series and rows:
            note = f"{stage}: {len(rows)} epochs (from {join(stage_dir, 'metrics.csv')})"
            for key in ("val_dice", "val_macro_f1", "val_accuracy"):
                vals = np.array(series.get(key, []), dtype=np.float64)
                if vals.size and np.isfinite(vals).any():
                    best = int(np.nanargmax(vals))
                    # numbered as metrics.csv and the training log number them, from 0
                    note += f"; best {key} {vals[best]:.4f} at epoch {rows[best].get('epoch', best)}"
                    break
            return plot_curves(series, title=f"{stage} training curves", first=0), note
    png = _read_url(join(stage_dir, "curves.png"), so)
    if png and png[:8] == b"\x89PNG\r\n\x1a\n":
        return png, f"{stage}: {join(stage_dir, 'curves.png')}"
    return None


# ----------------------------------------------------------------------------------------------
# Outputs


def _arrow_type(name: str) -> pa.DataType:
    if name in _STRING_COLUMNS:
        return pa.string()
    if name in _INT_COLUMNS:
        return pa.int64()
    return pa.float64()


def write_tables(records: Sequence[Mapping[str, Any]], base_url: str,
                 so: dict | None = None) -> dict[str, str]:
    """``<base>.parquet`` and ``<base>.csv`` of the per-image records; returns their URLs."""
    names = list(records[0]) if records else ["id"]
    schema = pa.schema([pa.field(n, _arrow_type(n)) for n in names])
    table = pa.Table.from_pylist(list(records), schema=schema)
    fs, path = fsspec.core.url_to_fs(base_url, **(so or {}))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    fs.pipe_file(f"{path}.parquet", buf.getvalue().to_pybytes())
    out = io.BytesIO()
    pacsv.write_csv(table, out)
    fs.pipe_file(f"{path}.csv", out.getvalue())
    return {"parquet": f"{base_url}.parquet", "csv": f"{base_url}.csv"}


def _out_so(cfg: Mapping[str, Any], url: str) -> dict | None:
    return storage_options(cfg["data"], url) if "://" in url else None


# what an evaluation may write under evaluate.out besides report.html, summary.json and
# per_image.*: a rerun into the same folder removes those it does not write again
FIGURES = ("cases", "confusion_matrix", "curves_segmenter", "curves_classifier")
NO_TTA_TABLES = ("per_image_no_tta.csv", "per_image_no_tta.parquet")


def remove_outputs(out: str, so: dict | None, names: Sequence[str]) -> None:
    """Delete the files `names` (relative to `out`) that exist: an earlier evaluation's."""
    fs, root = fsspec.core.url_to_fs(out, **(so or {}))
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            remove_path(fs, path)


# ----------------------------------------------------------------------------------------------
# The job


def checked_class_names(cfg: Mapping[str, Any]) -> list[str]:
    """`data.class_names`, which index the true labels; the classifier bundle's predictions
    are indexed by its own names, so the two lists must be the same, in the same order."""
    names = [str(c) for c in (cfg["data"].get("class_names") or [])]
    try:  # refused after every image was predicted
        check_group_names(names)
    except ValueError as exc:
        raise ValueError(f"data.class_names: {exc}") from None
    uri = cfg["evaluate"].get("classifier")
    if uri:
        try:
            _, config = check_bundle_task(uri, "classification", "evaluate.classifier",
                                          _bundle_so(cfg, uri))
        except BundleNotFoundError as exc:
            raise BundleNotFoundError(f"{exc} (evaluate.classifier=null evaluates the "
                                      "segmenter alone)") from None
        own = [str(c) for c in (config.get("class_names") or [])]
        if own and names and own != names:
            raise ValueError(f"classifier bundle {uri} predicts classes {own}, but "
                             f"data.class_names is {names}: set data.class_names to the "
                             "bundle's (same order) so that labels and predictions agree")
    return names


def evaluate(cfg: dict[str, Any], release: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the evaluation of the composed config; returns the summary (with ``run.outputs``).
    `release` runs before the closing lines are printed (the entry point leaves Ray there:
    `pipelines.cluster.disconnect`)."""
    started = time.time()
    ev, data = cfg["evaluate"], cfg["data"]
    check_threshold(ev.get("threshold"))
    check_whole(ev.get("batch_size", 8), "evaluate.batch_size", 1)
    check_whole(ev.get("auto_ray_min_images", 2000), "evaluate.auto_ray_min_images", 0)
    report_cfg = ev.get("report") or {}
    check_whole(report_cfg.get("cell", 176), "evaluate.report.cell", 1)
    check_whole(report_cfg.get("max_rows", 300), "evaluate.report.max_rows", 0)
    rc = ev.get("ray") or {}
    check_whole(rc.get("local_num_cpus"), "evaluate.ray.local_num_cpus", 1, none=True)
    check_actor_pool(rc, "evaluate.ray")
    check_case_metric(str((ev.get("cases") or {}).get("metric", "dice")))
    try:  # all checked before any prediction
        boot = BootstrapConfig.from_dict(ev.get("bootstrap"))
    except ValueError as exc:
        raise ValueError(f"evaluate.bootstrap: {exc}") from None
    if str(ev.get("split", "test")) != "all":
        check_split(data.get("split"))
    flips = tta_flips(ev)
    check_bundle_task(ev["segmenter"], "segmentation", "evaluate.segmenter",
                      _bundle_so(cfg, ev["segmenter"]))
    class_names = checked_class_names(cfg)
    out = str(ev["out"]).rstrip("/")
    so = _out_so(cfg, out)
    # an earlier evaluation's report goes whether or not this one writes it there (it does only
    # where it drops files); this one's is written as the other outputs are
    remove_outputs(out, so, [REPORT_NAME])
    if report_path(cfg) and not report_options(cfg):
        data = {**data, "report_storage_options": _out_so(cfg, str(report_path(cfg)))}
        cfg = {**cfg, "data": data}
    records = select_records(cfg)
    backend = choose_backend(str(ev.get("backend", "local")), len(records),
                             int(ev.get("auto_ray_min_images", 2000)), is_packed(data))
    print(f"[evaluate] {len(records)} images of split {ev['split']!r} of {data['url']} "
          f"({backend}{', TTA ' + '/'.join(flips) if flips else ''})", flush=True)

    if backend == "ray":
        variants = predict_ray(records, cfg, flips)
    else:
        variants = predict_local(records, cfg, flips)
    main = variants["tta" if flips else "plain"]
    cases_cfg = ev.get("cases") or {}
    summary = summarize(main, class_names, baseline_rows=variants["plain"] if flips else None,
                        bootstrap_config=boot, case_metric=str(cases_cfg.get("metric", "dice")),
                        per_class_cases=bool(cases_cfg.get("per_class", False)))

    figures: dict[str, Any] = {}
    notes: dict[str, str] = {}
    pictures = case_pictures(summary["cases"], records, cfg, backend, flips)
    if pictures:
        figures["cases"] = case_montage(pictures, cell=int(report_cfg.get("cell", 176)))
    if summary.get("classification"):
        cls = summary["classification"]
        figures["confusion_matrix"] = confusion_matrix_image(np.array(cls["confusion"]),
                                                             cls["class_names"])
    for stage, key in (("segmenter", "segmenter"), ("classifier", "classifier")):
        uri = ev.get(key)
        found = find_training_log(uri, _bundle_so(cfg, uri)) if uri else None
        if found is not None:
            figures[f"curves_{stage}"], notes[f"curves_{stage}"] = found

    table = table_records(main, class_names)
    remove_outputs(out, so, [*([] if flips else NO_TTA_TABLES),
                             *(f"figures/{f}.png" for f in FIGURES if f not in figures)])
    outputs: dict[str, Any] = {"report": join(out, "report.html"),
                               "summary": join(out, "summary.json"),
                               "per_image": write_tables(table, join(out, "per_image"), so)}
    if flips:
        outputs["per_image_no_tta"] = write_tables(
            table_records(variants["plain"], class_names), join(out, "per_image_no_tta"), so)
    bundles = {}
    for key in ("segmenter", "classifier"):
        uri = ev.get(key)
        bundles[key] = ({"uri": uri, "version": bundle_version(uri, _bundle_so(cfg, uri))}
                        if uri else None)
    summary["run"] = {
        "dataset": data.get("name"),
        "archive": str(data["url"]),
        "layout": data.get("layout"),
        "split": ev["split"],
        "limit": ev.get("limit"),
        "backend": backend,
        "tta": list(flips) if flips else None,
        "threshold": ev.get("threshold"),
        "bundles": bundles,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "seconds": round(time.time() - started, 3),
        "outputs": outputs,
    }
    title = report_cfg.get("title") or f"{data.get('name')} {ev['split']}: medseg evaluation"
    written = write_report(out, summary, figures, table, title=title,
                           max_rows=int(report_cfg.get("max_rows", 300)), figure_notes=notes,
                           storage_options=so)
    if release is not None:
        release()
    print_summary(summary)
    print(f"\nreport: {written['report']}\nsummary: {written['summary']}", flush=True)
    return summary


def _f(v: Any, sign: bool = False) -> str:
    return "n/a" if v is None else (f"{v:+.4f}" if sign else f"{v:.4f}")


def print_summary(summary: Mapping[str, Any]) -> None:
    """A few lines for the terminal."""
    groups = summary["segmentation"]["groups"]
    print(f"\n{summary['n_evaluated']} images evaluated, {summary['n_errors']} failed")
    for name, g in groups.items():
        if not g.get("n") or "dice" not in g:
            continue
        d = g["dice"]
        lo, hi = d["mean_ci"]
        print(f"  {name:12s} n={g['n']:4d}  Dice mean {_f(d['mean'])} [{_f(lo)}, {_f(hi)}]"
              f"  global {_f(d['global'])}")
    cls = summary.get("classification")
    if cls:
        print(f"  classifier   accuracy {_f(cls['accuracy']['value'])}  "
              f"macro-F1 {_f(cls['macro_f1']['value'])}")
    tta = summary.get("tta")
    if tta and tta.get("metrics"):
        d = tta["metrics"]["dice"]["delta_mean"]
        print(f"  TTA          Dice mean {_f(d['value'], True)} "
              f"[{_f(d['ci'][0], True)}, {_f(d['ci'][1], True)}]")


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    with reported_refusals(), explained_storage_errors():
        evaluate(resolve(cfg), release=disconnect)


if __name__ == "__main__":
    main()
