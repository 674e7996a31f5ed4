"""Ray Data batch prediction with the segment-then-classify `Chain` (shared by the bulk job and
evaluation).

    records --records_dataset--> rows {id, image_uri, mask_uris, label}
            --map_batches(ChainPredictor, actor pool)--> result rows (+ mask_png)

`ChainPredictor` is a callable class: each actor of the pool loads both bundles once, and for
every batch reads the image (and ground-truth mask) bytes with a thread pool, decodes them with
medseg_core, runs `Chain.predict` on the whole batch and turns each item into a row with
`medseg_core.results.prediction_row`. A file that cannot be read or decoded becomes an
`error_row` naming the file; a batch never raises for bad input. Output batches are Arrow
tables with the fixed schema `result_schema(with_masks)`, so blocks always concatenate.

`predict_records` builds the lazy, streaming Dataset: nothing runs until it is consumed
(`iter_batches`, `write_parquet`, ...), and Ray Data's backpressure bounds the images in flight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa

from medseg_core.io import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    encode_mask_png,
    object_fs,
    read_limited,
)
from medseg_core.layouts import Record, decode_record
from medseg_core.results import COUNT_KEYS, METRIC_KEYS, error_row, prediction_row
from pipelines.cluster import task_slots
from pipelines.data import EnvCredentials, is_s3

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = [
    "ChainPredictor",
    "RESULT_FIELDS",
    "predict_records",
    "records_dataset",
    "result_schema",
    "rows_to_table",
]

RESULT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("true_label", pa.int64()),
    pa.field("label", pa.int64()),
    pa.field("label_name", pa.string()),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("lesion_area_fraction", pa.float64()),
    pa.field("bbox", pa.list_(pa.int64())),
    pa.field("height", pa.int64()),
    pa.field("width", pa.int64()),
    pa.field("seconds", pa.float64()),
    pa.field("segmenter_version", pa.string()),
    pa.field("classifier_version", pa.string()),
    pa.field("error", pa.string()),
    *(pa.field(k, pa.int64()) for k in COUNT_KEYS),
    *(pa.field(k, pa.float64()) for k in METRIC_KEYS),
)
MASK_FIELD = pa.field("mask_png", pa.binary())


def result_schema(with_masks: bool = True) -> pa.Schema:
    """Arrow schema of `ChainPredictor` output: the `medseg_core.results` keys (+ mask_png)."""
    return pa.schema([*RESULT_FIELDS, *([MASK_FIELD] if with_masks else [])])


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Result rows -> an Arrow table of exactly `schema` (missing keys are null)."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


# ----------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Reads whole files by URI with fsspec (one filesystem object per protocol)."""

    def __init__(self, storage_options: dict | None, credentials: EnvCredentials | None,
                 max_bytes: int | None = DEFAULT_MAX_BYTES):
        self.storage_options = storage_options
        self.credentials = credentials
        self.max_bytes = max_bytes
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def options(self, uri: str) -> dict:
        so = self.storage_options
        if self.credentials is not None and is_s3(uri):
            so = self.credentials.apply(so)
        return dict(so or {})

    def read(self, uri: str) -> bytes:
        protocol = uri.partition("://")[0] if "://" in uri else "file"
        if protocol not in self._fs:
            self._fs[protocol] = object_fs(uri, self.options(uri))[0]
        fs = self._fs[protocol]
        return read_limited(fs, fs._strip_protocol(uri), self.max_bytes, uri)


def error_text(exc: BaseException, uri: str) -> str:
    """One line naming the file; medseg_core errors already start with the file name."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: file not found"
    if uri in text:
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {uri}: {text or 'cannot read'}"


def _column(batch: Mapping[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    if name not in batch:
        return [default] * n
    values = batch[name]
    return list(values) if not isinstance(values, list) else values


# ----------------------------------------------------------------------------------------------
# The actor


class ChainPredictor:
    """Callable class for `Dataset.map_batches` over an actor pool: one `Chain` per actor.

    Args:
        seg_uri, cls_uri: model bundles (any fsspec URL; ``cls_uri`` None segments only).
        device: torch device of the models (``cuda`` in GPU actors).
        storage_options: fsspec options for bundles and images (no credentials: those come from
            the environment, or from ``credentials``).
        threshold: mask threshold (default: the segmentation bundle's).
        with_masks: add a ``mask_png`` column (0/255 grey PNG at the image's original size;
            null for error rows).
        max_pixels: decompression-bomb guard for images and masks.
        max_bytes: files larger than this become error rows before they are read whole.
        io_threads: concurrent file reads (and decodes) per batch.
        torch_threads: ``torch.set_num_threads`` in this actor (None: leave Ray's default, one
            thread per reserved CPU).
        hausdorff: per-image Hausdorff-95 when ground truth exists.
        with_truth: read the records' mask files as ground truth (per-image metrics).
        channels: channels images are decoded to before the models convert them.
        mask_threshold: ground-truth mask pixels above this (8-bit) are foreground.
        model_batch_size: images per forward pass inside `Chain` (default: 1 on CPU, where
            one image at a time is fastest, 16 on GPU).
        amp: bf16 autocast (`medseg_core.inference.Segmenter`'s ``amp``): None, on for cuda only;
            True also on a CPU with native bf16.
        credentials: AWS_* values captured on the driver (`EnvCredentials`), applied to
            ``s3://`` reads; kept in memory only, never in configs or logs.
        bundle_storage_options: fsspec options for the bundles where they differ from the
            images' (another store, other access); None: ``storage_options``.
    """

    def __init__(
        self,
        seg_uri: str,
        cls_uri: str | None,
        device: str = "cpu",
        storage_options: dict | None = None,
        threshold: float | None = None,
        with_masks: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        io_threads: int = 8,
        torch_threads: int | None = None,
        hausdorff: bool = True,
        with_truth: bool = True,
        channels: int = 3,
        mask_threshold: int = 127,
        model_batch_size: int | None = None,
        amp: bool | None = None,
        credentials: EnvCredentials | None = None,
        bundle_storage_options: dict | None = None,
    ) -> None:
        import torch

        from medseg_core.checkpoint import load_bundle
        from medseg_core.inference import Chain, Classifier, Segmenter

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.reader = _Reader(storage_options, credentials, max_bytes)
        bs = int(model_batch_size or (1 if str(device).startswith("cpu") else 16))
        bundles = (self.reader if bundle_storage_options is None
                   else _Reader(bundle_storage_options, credentials, max_bytes))
        segmenter = Segmenter(
            load_bundle(seg_uri, storage_options=bundles.options(seg_uri) or None), device, bs,
            amp=amp,
        )
        classifier = None
        if cls_uri is not None:
            bundle = load_bundle(cls_uri, storage_options=bundles.options(cls_uri) or None)
            classifier = Classifier(bundle, device, bs, amp=amp)
        self.chain = Chain(segmenter, classifier)
        self.versions = self.chain.versions
        self.threshold = threshold
        self.with_masks = bool(with_masks)
        self.max_pixels = max_pixels
        self.hausdorff = bool(hausdorff)
        self.with_truth = bool(with_truth)
        self.channels = int(channels)
        self.mask_threshold = int(mask_threshold)
        self.io_threads = max(1, int(io_threads))
        self.schema = result_schema(self.with_masks)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classifier bundle's class names (empty without a classifier)."""
        clf = self.chain.classifier
        return tuple(clf.class_names or ()) if clf is not None else ()

    def _load(self, record: Record) -> tuple[dict | None, str | None, float]:
        """(decoded sample, None) or (None, error text); and the seconds it took."""
        start = time.perf_counter()
        uri = record.image_uri
        try:
            image = self.reader.read(uri)
            masks = []
            for mask_uri in record.mask_uris:
                uri = mask_uri
                masks.append(self.reader.read(mask_uri))
            uri = record.image_uri
            sample = decode_record(
                record,
                image,
                masks,
                channels=self.channels,
                max_pixels=self.max_pixels,
                threshold=self.mask_threshold,
                keep_grey=True,  # the models repeat a grey plane after resizing it
            )
            # tile mode: a thin image is a row of whole tiles; an error row here, before it
            # joins (and fails) a batch
            self.chain.segmenter.check_work(sample["image"].shape)
            return sample, None, time.perf_counter() - start
        except Exception as exc:  # any unreadable or undecodable file is a row, not a crash
            return None, error_text(exc, uri), time.perf_counter() - start

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if self.io_threads <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="medseg-read")
        return list(self._pool.map(fn, items))

    def _predict(self, images: list[np.ndarray]) -> list[dict[str, Any] | BaseException]:
        """Chain outputs for the batch; if the batch fails, image by image (the bad one errs)."""
        try:
            return list(self.chain.predict(images, self.threshold))
        except Exception:
            out: list[dict[str, Any] | BaseException] = []
            for image in images:
                try:
                    out.append(self.chain.predict([image], self.threshold)[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def records(self, batch: Mapping[str, Any]) -> list[Record]:
        """The batch's rows as Records (``id``, ``image_uri``, ``mask_uris``, ``label``)."""
        ids = _column(batch, "id", 0)
        n = len(ids)
        uris = _column(batch, "image_uri", n)
        masks = _column(batch, "mask_uris", n, ())
        labels = _column(batch, "label", n, -1)
        out = []
        for i in range(n):
            m = masks[i]
            mask_uris = tuple(str(u) for u in m) if (m is not None and self.with_truth) else ()
            label = labels[i]
            label = -1 if label is None or (isinstance(label, float) and math.isnan(label)) else label
            out.append(Record(str(ids[i]), str(uris[i]), mask_uris, int(label)))
        return out

    def predict_rows(self, records: Sequence[Record]) -> list[dict[str, Any]]:
        """Result rows (with ``mask_png`` when ``with_masks``) for records, in their order."""
        loaded = self._map(self._load, list(records))
        ok = [i for i, (sample, _, _) in enumerate(loaded) if sample is not None]
        start = time.perf_counter()
        outputs = self._predict([loaded[i][0]["image"] for i in ok]) if ok else []
        share = (time.perf_counter() - start) / max(len(ok), 1)
        by_index = dict(zip(ok, outputs))

        def row(i: int) -> dict[str, Any]:
            rec = records[i]
            sample, error, seconds = loaded[i]
            t0 = time.perf_counter()
            out = by_index.get(i)
            if sample is None or isinstance(out, BaseException) or out is None:
                if error is None:
                    error = error_text(out, rec.image_uri) if out is not None else "no output"
                r = error_row(rec.id, rec.image_uri, error, true_label=rec.label,
                              seconds=seconds, versions=self.versions)
                r["mask_png"] = None
                return r
            truth = sample["mask"] if rec.mask_uris else None
            try:
                r = prediction_row(rec.id, rec.image_uri, out, truth=truth, true_label=rec.label,
                                   versions=self.versions, hausdorff=self.hausdorff)
                r["mask_png"] = encode_mask_png(out["mask"]) if self.with_masks else None
            except Exception as exc:
                r = error_row(rec.id, rec.image_uri, error_text(exc, rec.image_uri),
                              true_label=rec.label, seconds=seconds, versions=self.versions)
                r["mask_png"] = None
            r["seconds"] = seconds + share + (time.perf_counter() - t0)
            return r

        return self._map(row, list(range(len(records))))

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        return rows_to_table(self.predict_rows(self.records(batch)), self.schema)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


# ----------------------------------------------------------------------------------------------
# Datasets


MAX_BLOCKS = 2000


def rows_per_block(n: int, batch_size: int) -> int:
    """Records per input block: one batch, or a multiple of it once that would exceed
    `MAX_BLOCKS` blocks (small blocks spread work evenly over the actors)."""
    batch_size = max(1, int(batch_size))
    return batch_size * max(1, math.ceil(n / (batch_size * MAX_BLOCKS)))


def records_dataset(records: Sequence[Record], rows_per_block: int | None = None) -> Dataset:
    """Records -> a Dataset with rows ``{id, image_uri, mask_uris (list[str]), label}``.

    Only URIs travel (no pixels). ``rows_per_block`` (default: enough to keep at most
    `MAX_BLOCKS` blocks, at least 8 rows each) sets the unit Ray Data hands to a map task.
    """
    import ray.data

    items = [r.to_dict() for r in records]
    per_block = rows_per_block or max(8, math.ceil(len(items) / MAX_BLOCKS))
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_block)))


def actor_pool(concurrency: int | Sequence[int] | None, num_cpus: float = 1, num_gpus: float = 0,
               max_tasks_in_flight_per_actor: int | None = None) -> Any:
    """`ActorPoolStrategy` for an int (fixed size), (min, max) or None ((1, what fits))."""
    from ray.data import ActorPoolStrategy

    kw: dict[str, Any] = {}
    if max_tasks_in_flight_per_actor:
        kw["max_tasks_in_flight_per_actor"] = int(max_tasks_in_flight_per_actor)
    if concurrency is None:
        return ActorPoolStrategy(min_size=1, max_size=task_slots(num_cpus, num_gpus), **kw)
    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency, **kw)
    lo, hi = (int(c) for c in concurrency)
    return ActorPoolStrategy(min_size=lo, max_size=hi, **kw)


def predict_records(
    records: Sequence[Record],
    *,
    seg_uri: str,
    cls_uri: str | None,
    storage_options: dict | None = None,
    batch_size: int = 8,
    concurrency: int | Sequence[int] | None = None,
    num_gpus: float = 0,
    threshold: float | None = None,
    with_masks: bool = True,
    num_cpus: float = 1,
    predictor: type[ChainPredictor] = ChainPredictor,
    predictor_kwargs: Mapping[str, Any] | None = None,
    forward_credentials: bool = True,
    max_tasks_in_flight_per_actor: int | None = None,
    extra_uris: Sequence[str] = (),
) -> Dataset:
    """Lazy, streaming Dataset of result rows (`result_schema`) for ``records``.

    ``concurrency``: actors, an int (fixed pool) or (min, max); None autoscales from 1 to as
    many as the cluster's CPUs (GPUs when ``num_gpus`` > 0) allow. Actors get ``num_cpus``
    (and ``num_gpus``; the models then run on ``cuda``). ``predictor`` may be a subclass of
    `ChainPredictor` (the bulk job's commits its outputs); ``predictor_kwargs`` go to its
    constructor. With ``forward_credentials`` the driver's AWS_* environment is handed to the
    actors in memory, for clusters whose workers were started without it, when a bundle, an
    image or one of ``extra_uris`` (the bulk job's output) is on ``s3://``.
    """
    kwargs: dict[str, Any] = {
        "device": "cuda" if num_gpus and num_gpus > 0 else "cpu",
        "storage_options": storage_options,
        "threshold": threshold,
        "with_masks": with_masks,
        "torch_threads": None,
    }
    uris = [seg_uri, cls_uri or "", *extra_uris, *(r.image_uri for r in records)]
    if forward_credentials and any(is_s3(u) for u in uris):
        kwargs["credentials"] = EnvCredentials.capture()
    kwargs.update(predictor_kwargs or {})
    ds = records_dataset(records, rows_per_block(len(records), batch_size))
    return ds.map_batches(
        predictor,
        batch_size=int(batch_size),
        batch_format="numpy",
        compute=actor_pool(concurrency, num_cpus, num_gpus, max_tasks_in_flight_per_actor),
        fn_constructor_args=(seg_uri, cls_uri),
        fn_constructor_kwargs=kwargs,
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
    )
