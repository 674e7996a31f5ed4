"""Nightly bulk segmentation: archive -> Segmenter -> Classifier -> masks + Parquet + manifest.

    python pipelines/segment_batch.py input=s3://pacs-export/2026-11-22 layout=images \\
        bundles.segmenter=s3://models/seg/best bundles.classifier=s3://models/cls/best \\
        output=s3://results/nightly
    python pipelines/segment_batch.py ... batch=gpu          # one GPU per actor
    ray job submit --working-dir . -- python pipelines/segment_batch.py input=... output=...

Settings: pipelines/conf/segment_batch.yaml and pipelines/conf/batch/ (Hydra).

Output (any local path or s3:// URL)::

    <output>/masks/<predicted class>/<safe id>.png          one mask per image, original size
    <output>/results/predicted_class=<class>/part-<h>.parquet   result rows (Hive partitions;
                                                            class "error" holds unreadable images)
    <output>/manifest.json                                  the latest run's manifest
    <output>/runs/<run id>.json                             every run's manifest

How a run makes every image appear exactly once (idempotent, resumable):

1. Commit unit = one batch. An actor of the pool predicts a batch, writes its masks first, then
   one Parquet part per predicted class under a name derived from the batch's ids (a hash), each
   part written atomically (local: temp file + rename; S3: one PUT). A row exists only once its
   mask does, and a retried batch rewrites the same names.
2. A run starts by listing the committed parts once (ids, mask paths) and the mask files once;
   ids already in a part are skipped (``overwrite=true`` deletes results/ and masks/ first;
   ``retry_errors=true`` also processes the images whose row is an error; an error row stays
   until its image is committed again, and repair then keeps the new row).
3. Repair, at start and end: should an id ever sit in two parts (a straggler actor of a killed
   run committing after the rerun listed, overlapping runs), the parts holding it are rewritten
   with one row per id (non-error first, then the newest), new parts before old ones are deleted,
   so a crash during repair converges on the next run. A row whose mask file vanished is dropped
   (and that image processed again). At the end, mask files no committed row points to (left by
   a killed batch) are deleted.

A file that cannot be read or decoded becomes a row with its error (class "error", no mask).
Output names never come from input names directly: `safe_id` is a readable ASCII slug plus a
hash of the id, so ``../../x``, absolute paths or odd characters cannot leave the output prefix.
A local file name that is not UTF-8 gets an id with ``\\xNN`` escapes (`medseg_core.layouts`);
``source`` and ``error`` are stored the same way, and a row that still cannot be stored becomes
an error row rather than failing its batch. ``threshold`` must lie in (0, 1) (or be null).
Credentials come only from the environment (AWS_*); the driver hands them to the actors in
memory. Run one job per output prefix at a time (e.g. ``flock`` in cron).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and (_ROOT / "medseg_core").is_dir():  # `python pipelines/X.py`
    sys.path.insert(0, str(_ROOT))

import copy
import hashlib
import io
import json
import math
import os
import posixpath
import re
import time
import unicodedata
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import fsspec
import hydra
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig

from medseg_core.checkpoint import check_bundle_task
from medseg_core.inference import check_threshold
from medseg_core.io import is_local, move_file, remove_path
from medseg_core.layouts import Listing, Record, files_digest, list_records, valid_text
from medseg_core.metrics import metrics_from_counts
from medseg_core.precision import check_device
from medseg_core.results import error_row
from pipelines import CONF_DIR
from pipelines.cluster import check_fits, check_runtime_env, check_shared_paths, connect, disconnect
from pipelines.config import (
    check_actor_pool,
    check_flag,
    check_number,
    check_whole,
    explained_storage_errors,
    reported_refusals,
    resolve,
)
from pipelines.data import _check_no_credentials, is_s3
from pipelines.data import storage_options as _storage_options
from pipelines.predict import RESULT_FIELDS, ChainPredictor, predict_records, rows_to_table

FORMAT = "medseg-segment-batch/1"
RESULTS_DIR = "results"
MASKS_DIR = "masks"
QUARANTINE_DIR = "quarantine"  # unreadable result parts, moved out of results/
RUNS_DIR = "runs"
MANIFEST = "manifest.json"
SOURCES = "sources.parquet"  # id -> the input files and threshold each committed row came from
PARTITION = "predicted_class"
ERROR_CLASS = "error"
UNCLASSIFIED = "unclassified"
LIST_CAP = 1000  # error / problem entries listed in a manifest (all are counted)

PART_SCHEMA = pa.schema([
    *RESULT_FIELDS,
    pa.field("safe_id", pa.string()),
    pa.field("mask_path", pa.string()),  # relative to the output URL; null for error rows
    pa.field("processed_at", pa.timestamp("ms", tz="UTC")),
    pa.field("run_id", pa.string()),
])
SUMMARY_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field(PARTITION, pa.string()),
    pa.field("error", pa.string()),
    pa.field("seconds", pa.float64()),
])
RESULT_SCHEMA = pa.schema(RESULT_FIELDS)
INDEX_COLUMNS = ("id", "mask_path", "error", "processed_at")
VERSION_COLUMNS = ("segmenter_version", "classifier_version")
SUMMARY_COLUMNS = (*INDEX_COLUMNS, *VERSION_COLUMNS, "tp", "fp", "fn", "tn", "dice", "iou",
                   "hd95")


# ----------------------------------------------------------------------------------------------
# Names


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CLASS_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def safe_id(id: str, max_len: int = 80) -> str:
    """A file-name-safe, unique stand-in for a record id: ASCII slug + 16 hex of its sha256.

    ``benign/benign (1)`` -> ``benign_benign_1-<hash>``. The result has no ``/``, never starts
    with ``.`` and is never ``..``, so it cannot point outside the directory it is put in.
    """
    text = unicodedata.normalize("NFKD", str(id)).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"_+", "_", _UNSAFE.sub("_", text)).strip("._-")[:max_len].strip("._-")
    digest = hashlib.sha256(str(id).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{slug or 'image'}-{digest}"


def class_dir(label_name: str | None, error: str | None = None) -> str:
    """Directory / partition value of a row: its class name when that is a safe plain name,
    else a `safe_id` of it; ``error`` for error rows, ``unclassified`` without a classifier."""
    if error is not None:
        return ERROR_CLASS
    if label_name is None:
        return UNCLASSIFIED
    name = str(label_name)
    if _CLASS_OK.fullmatch(name) and name not in (ERROR_CLASS, UNCLASSIFIED):
        return name
    return safe_id(name, max_len=40)


def part_name(ids: Iterable[str]) -> str:
    """Deterministic file name of the part holding exactly these ids."""
    # JSON, not a joined string: ids may hold any character (["x\ny"] is not ["x", "y"])
    digest = hashlib.sha256(json.dumps(sorted(ids)).encode("ascii"))
    return f"part-{digest.hexdigest()[:24]}.parquet"


def mask_path(cls: str, sid: str) -> str:
    return f"{MASKS_DIR}/{cls}/{sid}.png"


def part_path(cls: str, ids: Iterable[str]) -> str:
    return f"{RESULTS_DIR}/{PARTITION}={cls}/{part_name(ids)}"


# ----------------------------------------------------------------------------------------------
# The output prefix


class Output:
    """Files under the output URL, addressed by relative paths built from safe names only."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.local = is_local(self.fs)
        self._dirs: set[str] = set()
        self.quarantined: list[dict[str, str]] = []

    def path(self, rel: str) -> str:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"refusing to write {rel!r}: not a plain relative path")
        return f"{self.root}/{rel}"

    def write(self, rel: str, data: bytes, atomic: bool = False) -> None:
        """Write one file; ``atomic``: readers see all of it or nothing."""
        path = self.path(rel)
        if not self.local:
            self.fs.pipe_file(path, data)  # one S3 object: appears whole or not at all
            return
        folder = posixpath.dirname(path)
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        target = f"{folder}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}" if atomic else path
        with open(target, "wb") as f:
            f.write(data)
            if atomic:  # on disk before the rename: a power cut must not commit an empty part
                f.flush()
                os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)

    def quarantine(self, rel: str, reason: str) -> None:
        """Move an unreadable result part out of ``results/`` (kept for inspection, named in
        the manifest), so its images are processed again instead of every run failing on it."""
        dst = f"{QUARANTINE_DIR}/{rel.replace('/', '__')}"
        if self.local:
            os.makedirs(posixpath.dirname(self.path(dst)), exist_ok=True)
            os.replace(self.path(rel), self.path(dst))
        else:
            move_file(self.fs, self.path(rel), self.path(dst))
        self.quarantined.append({"part": rel, "moved_to": dst, "reason": reason})

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def _forget_listings(self) -> None:
        """Drop every cached listing: other processes (the actors) wrote here. Forgetting only
        the folder listed kept its sub-folders' listings from the run's start, and s3fs
        answers a file missing from a cached listing with FileNotFoundError unasked: the
        parts committed since then were left out, and their masks deleted as orphans."""
        self.fs.invalidate_cache()

    def list(self, sub: str) -> list[str]:
        """Relative paths of the files under ``sub`` (hidden and temporary files left out)."""
        base = self.path(sub)
        self._forget_listings()
        try:
            found = self.fs.find(base, withdirs=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for p in found:
            p = self.fs._strip_protocol(p) if "://" in p else p
            if not p.startswith(self.root + "/"):
                continue
            rel = p[len(self.root) + 1:]
            # hidden and temporary files, and "folder" placeholders (empty objects named
            # `x/` that S3 consoles and sync tools create)
            if not any(part.startswith(".") or not part for part in rel.split("/")):
                out.append(rel)
        return sorted(out)

    def hidden(self, sub: str) -> list[str]:
        """Leftover temporary files (``.tmp-*``) under ``sub``."""
        self._forget_listings()
        try:
            found = self.fs.find(self.path(sub), withdirs=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [p[len(self.root) + 1:] for p in found
                if p.startswith(self.root + "/") and posixpath.basename(p).startswith(".tmp-")]

    def delete(self, rels: Sequence[str]) -> None:
        if not rels:
            return
        paths = [self.path(r) for r in rels]
        if self.local:
            for p in paths:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
        else:
            remove_path(self.fs, paths)

    def delete_tree(self, sub: str) -> None:
        path = self.path(sub)
        self._forget_listings()
        if self.fs.exists(path):
            remove_path(self.fs, path, recursive=True)
        self._dirs.clear()


# ----------------------------------------------------------------------------------------------
# The actor: predict a batch, commit masks then rows


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _unstorable(row: Mapping[str, Any], exc: BaseException) -> dict[str, Any]:
    """The error row standing in for a result row Arrow cannot store."""
    rid = valid_text(str(row.get("id")))
    text = valid_text(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    r = error_row(rid, valid_text(str(row.get("source") or "")),
                  f"result row of {rid!r} cannot be stored: {type(exc).__name__}: {text}")
    r["mask_png"] = None
    return r


def storable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` ready for Parquet: ``source`` and ``error`` (real paths, which need not be valid
    Unicode) as `valid_text`; any row that still fails to convert becomes an error row (no mask)
    instead of failing the whole batch, and every rerun of it."""
    for r in rows:
        for key in ("source", "error"):
            if isinstance(r.get(key), str):
                r[key] = valid_text(r[key])
    try:
        rows_to_table(rows, RESULT_SCHEMA)
        return rows
    except (UnicodeError, pa.ArrowException, TypeError, ValueError):
        pass
    out = []
    for r in rows:
        try:
            rows_to_table([r], RESULT_SCHEMA)
            out.append(r)
        except (UnicodeError, pa.ArrowException, TypeError, ValueError) as exc:
            out.append(_unstorable(r, exc))
    return out


def commit_rows(out: Output, rows: list[dict[str, Any]], run_id: str,
                write: Any = None) -> pa.Table:
    """Write the masks of ``rows`` (with ``mask_png``), then their Parquet parts (one per
    predicted class, the commit); returns the summary rows (id, predicted_class, error, seconds).
    Rows go through `storable_rows` first. ``write`` maps a function over items (a thread
    pool's map), default sequential."""
    mapper = write or (lambda fn, items: [fn(i) for i in items])
    now = datetime.now(timezone.utc)
    rows = storable_rows(rows)
    for r in rows:
        cls = class_dir(r.get("label_name"), r.get("error"))
        r[PARTITION] = cls
        r["safe_id"] = safe_id(r["id"])
        has_mask = r.get("error") is None and r.get("mask_png") is not None
        r["mask_path"] = mask_path(cls, r["safe_id"]) if has_mask else None
        r["processed_at"] = now
        r["run_id"] = run_id
    masked = [r for r in rows if r["mask_path"] is not None]
    mapper(lambda r: out.write(r["mask_path"], r["mask_png"]), masked)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[PARTITION], []).append(r)
    parts = [(part_path(cls, [r["id"] for r in group]), rows_to_table(group, PART_SCHEMA))
             for cls, group in sorted(groups.items())]
    mapper(lambda item: out.write(item[0], _table_bytes(item[1]), atomic=True), parts)
    return rows_to_table(rows, SUMMARY_SCHEMA)


class CommittingPredictor(ChainPredictor):
    """`ChainPredictor` that commits each batch to the output and returns only a summary."""

    def __init__(self, seg_uri: str, cls_uri: str | None, *, output: str,
                 output_options: dict | None, run_id: str, **kwargs: Any) -> None:
        kwargs["with_masks"] = True
        super().__init__(seg_uri, cls_uri, **kwargs)
        creds = kwargs.get("credentials")
        options = output_options
        if creds is not None and is_s3(output):
            options = creds.apply(output_options)
        self.out = Output(output, options)
        self.run_id = run_id

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        rows = self.predict_rows(self.records(batch))
        return commit_rows(self.out, rows, self.run_id, write=self._map)


# ----------------------------------------------------------------------------------------------
# What is committed: scan, repair, sweep


def _partition_of(rel: str) -> str:
    folder = posixpath.basename(posixpath.dirname(rel))
    return folder.split("=", 1)[1] if "=" in folder else ""


def _is_part(rel: str) -> bool:
    name = posixpath.basename(rel)
    return name.startswith("part-") and name.endswith(".parquet")


def _read_parts(out: Output, parts: Sequence[str], columns: Sequence[str] | None,
                threads: int = 16, unreadable: list[tuple[str, str | None]] | None = None
                ) -> pa.Table:
    """Rows of the given parts (all or some columns) + ``_part`` and the partition column.
    With ``unreadable``, a part that cannot be read as a results part (truncated, empty, of
    another schema) is left out and added there with the reason, instead of raising (one gone
    meanwhile, with None)."""

    def one(rel: str) -> pa.Table | None:
        try:
            blob = out.read(rel)  # a failed read (timeout, 503) raises: the part is not bad
        except FileNotFoundError:
            if unreadable is None:
                raise
            unreadable.append((rel, None))
            return None
        try:  # the bytes are in memory: whatever fails now is in them
            table = pq.read_table(pa.BufferReader(blob), columns=list(columns)
                                  if columns else None)
            if columns is None:
                table = table.cast(PART_SCHEMA)
        except (pa.ArrowException, OSError, ValueError) as e:
            if unreadable is None:
                raise
            unreadable.append((rel, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
            return None
        n = table.num_rows
        table = table.append_column("_part", pa.array([rel] * n, pa.string()))
        return table.append_column(PARTITION, pa.array([_partition_of(rel)] * n, pa.string()))

    if not parts:
        schema = PART_SCHEMA if columns is None else pa.schema(
            [PART_SCHEMA.field(c) for c in columns])
        empty = schema.empty_table()
        empty = empty.append_column("_part", pa.array([], pa.string()))
        return empty.append_column(PARTITION, pa.array([], pa.string()))
    with ThreadPoolExecutor(min(threads, len(parts))) as pool:
        tables = [t for t in pool.map(one, parts) if t is not None]
    if not tables:
        return _read_parts(out, [], columns)
    return pa.concat_tables(tables)


class State:
    """The committed results (some columns of every row) and the mask files present."""

    def __init__(self, out: Output, columns: Sequence[str] = INDEX_COLUMNS) -> None:
        self.columns = tuple(columns)
        parts = [p for p in out.list(RESULTS_DIR) if _is_part(p)]
        unreadable: list[tuple[str, str | None]] = []
        self.rows = _read_parts(out, parts, self.columns, unreadable=unreadable)
        for rel, reason in unreadable:
            if reason is not None:
                print(f"[segment_batch] result part {rel} is unreadable ({reason}): moved to "
                      f"{QUARANTINE_DIR}/, its images will be processed again", flush=True)
                out.quarantine(rel, reason)
        left_out = {rel for rel, _ in unreadable}
        self.parts = [p for p in parts if p not in left_out]
        self.masks = set(out.list(MASKS_DIR))

    def rescan(self, out: Output) -> State:
        return State(out, self.columns)

    @property
    def ids(self) -> list[str]:
        return self.rows.column("id").to_pylist()

    def duplicates(self) -> set[str]:
        return {i for i, n in Counter(self.ids).items() if n > 1}

    def missing_masks(self) -> list[int]:
        """Rows without error whose mask file is absent."""
        paths = self.rows.column("mask_path").to_pylist()
        errors = self.rows.column("error").to_pylist()
        return [i for i, (p, e) in enumerate(zip(paths, errors))
                if e is None and (p is None or p not in self.masks)]

    def referenced(self) -> set[str]:
        return {p for p in self.rows.column("mask_path").to_pylist() if p is not None}

    def part_rows(self) -> Counter[str]:
        return Counter(self.rows.column("_part").to_pylist())


def repair(out: Output, state: State, retried: Iterable[str] = (), renewed: Iterable[str] = ()
           ) -> tuple[State, dict[str, int]]:
    """Rewrite the parts that hold a duplicated id or a row whose mask is missing, so that every
    id is in exactly one part and every row's mask exists. Returns the new state and counts
    (the error rows of ``retried`` ids that a new row replaced are not duplicates). Of the rows
    of an id in ``renewed`` (its input changed since) the newest wins, an error included: the
    older ones are of a file that is no longer there."""
    dups = state.duplicates()
    missing = state.missing_masks()
    stats = {"duplicate_rows_removed": 0, "rows_without_mask_removed": len(missing)}
    if not dups and not missing:
        return state, stats
    part_col = state.rows.column("_part").to_pylist()
    ids = state.ids
    dirty = sorted({part_col[i] for i in missing}
                   | {p for p, i in zip(part_col, ids) if i in dups})
    table = _read_parts(out, dirty, None)
    drop = {(part_col[i], ids[i]) for i in missing}
    rows = [r for r in table.to_pylist() if (r["_part"], r["id"]) not in drop]
    # one row per id: a result beats an error, then the newest, then the later part name
    renewed = set(renewed)
    rows.sort(key=lambda r: (r["id"], r["id"] in renewed or r["error"] is None,
                             r["processed_at"], r["_part"]))
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        best[r["id"]] = r
    retried = set(retried)
    kept = {id(r) for r in best.values()}
    replaced = sum(1 for r in rows if id(r) not in kept and (
        r["id"] in renewed or r["error"] is not None and r["id"] in retried))
    stats["duplicate_rows_removed"] = len(rows) - len(best) - replaced
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in best.values():  # the partition follows from the row, wherever the copy was
        groups.setdefault(class_dir(r["label_name"], r["error"]), []).append(r)
    written = set()
    for cls, group in sorted(groups.items()):
        rel = part_path(cls, [r["id"] for r in group])
        out.write(rel, _table_bytes(rows_to_table(group, PART_SCHEMA)), atomic=True)
        written.add(rel)
    out.delete([p for p in dirty if p not in written])  # only after the new parts exist
    return state.rescan(out), stats


def compact(out: Output, state: State, target_rows: int, min_parts: int) -> tuple[State, int]:
    """Merge small parts: in a partition holding at least ``min_parts`` parts of fewer than
    ``target_rows`` rows, pack those into parts of up to ``target_rows`` rows (named from their
    ids, written before the sources are deleted: a crash in between leaves duplicates that
    `repair` resolves). Returns the new state and the number of parts merged away."""
    if target_rows <= 0 or min_parts <= 0:
        return state, 0
    sizes = state.part_rows()
    small: dict[str, list[str]] = {}
    for part in state.parts:
        if sizes.get(part, 0) < target_rows:
            small.setdefault(_partition_of(part), []).append(part)
    merged = 0
    for cls, parts in sorted(small.items()):
        if len(parts) < max(2, min_parts):
            continue
        groups: list[list[str]] = [[]]
        rows = 0
        for part in sorted(parts):
            if groups[-1] and rows + sizes[part] > target_rows:
                groups.append([])
                rows = 0
            groups[-1].append(part)
            rows += sizes[part]
        for group in (g for g in groups if len(g) > 1):
            table = _read_parts(out, group, None)
            rel = part_path(cls, table.column("id").to_pylist())
            out.write(rel, _table_bytes(table.select(PART_SCHEMA.names)), atomic=True)
            out.delete([p for p in group if p != rel])
            merged += len(group) - 1
    return (state.rescan(out) if merged else state), merged


# ----------------------------------------------------------------------------------------------
# The job


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _nested(a: str, b: str, so_a: dict | None, so_b: dict | None) -> bool:
    """Whether URL ``a`` equals or lies inside ``b`` (same filesystem: protocol and, on object
    storage, endpoint); ``so_a``, ``so_b``: their storage options."""
    def proto(url: str) -> str:
        p = fsspec.utils.get_protocol(url)
        return {"s3a": "s3", "local": "file"}.get(p, p)

    def endpoint(so: dict | None) -> Any:
        return ((so or {}).get("client_kwargs") or {}).get("endpoint_url")

    def path(url: str, so: dict | None) -> str:
        fs, p = fsspec.core.url_to_fs(url, **(so or {}))
        # a symlink must not hide that one folder is inside the other
        return os.path.realpath(p) if "file" in fs.protocol else p.rstrip("/")

    if proto(a) != proto(b) or endpoint(so_a) != endpoint(so_b):
        return False
    path_a, path_b = path(a, so_a), path(b, so_b)
    return path_a == path_b or path_a.startswith(path_b + "/")


STORAGE_ROLES = ("input", "output", "bundles")
_STORAGE_KEYS = ("endpoint_url", "region", "anonymous", "storage_options")


def storage_options(cfg: Mapping[str, Any], role: str, url: str) -> dict | None:
    """fsspec options for one of the job's URLs (`role`: input, output or bundles):
    ``cfg.storage`` (endpoint, region, anonymous, storage_options) with the non-null values of
    ``cfg.storage.<role>`` over it, for a URL on another store or with other access (a public
    archive read unsigned, results written with the environment's credentials); credential
    keys are refused (environment only)."""
    storage = dict(cfg.get("storage") or {})
    own = {k: v for k, v in dict(storage.get(role) or {}).items() if v is not None}
    shared = copy.deepcopy(dict(storage.get("storage_options") or {}))
    # the role's endpoint, region and access also beat the shared options' spelling of them
    client = dict(shared.pop("client_kwargs", None) or {})
    for key, option in (("endpoint_url", "endpoint_url"), ("region", "region_name")):
        if key in own:
            client.pop(option, None)
    if client:
        shared["client_kwargs"] = client
    if "anonymous" in own:
        shared.pop("anon", None)
    merged = {**{k: storage.get(k) for k in _STORAGE_KEYS}, "storage_options": shared, **own}
    return _storage_options(merged, url)


def check_storage(cfg: Mapping[str, Any]) -> None:
    """`storage.<role>`: a mapping of the shared storage keys only."""
    storage = dict(cfg.get("storage") or {})
    for role in STORAGE_ROLES:
        over = storage.get(role)
        if over is None:
            continue
        if not isinstance(over, Mapping):
            raise ValueError(f"storage.{role} must be a mapping of {', '.join(_STORAGE_KEYS)}, "
                             f"got {over!r}")
        unknown = sorted(set(over) - set(_STORAGE_KEYS))
        if unknown:
            raise ValueError(f"storage.{role}: unknown setting(s) {', '.join(unknown)} "
                             f"(known: {', '.join(_STORAGE_KEYS)})")
        _check_no_credentials(over.get("storage_options") or {},
                              f"storage.{role}.storage_options")
    _check_no_credentials(storage.get("storage_options") or {}, "storage.storage_options")


def bundle_info(uri: str | None, so: dict | None, task: str, setting: str
                ) -> dict[str, Any] | None:
    """URI, version and class names of a bundle, from its small text files; a missing bundle,
    or one of another task than `task`, is refused naming `setting`."""
    if uri is None:
        return None
    version, config = check_bundle_task(uri, task, setting, so)
    return {"uri": uri, "version": version, "class_names": list(config.get("class_names") or [])}


def _pool_size(batch: Mapping[str, Any], n_images: int) -> int | list[int]:
    """``batch.concurrency``, or one actor per CPU (GPU) of the cluster, never more actors than
    batches to run."""
    from pipelines.cluster import task_slots

    batches = max(1, math.ceil(n_images / max(1, int(batch["batch_size"]))))
    if batch.get("concurrency") is not None:
        c = batch["concurrency"]
        if isinstance(c, int):
            return min(int(c), batches)
        lo, hi = (int(v) for v in c)
        return [min(lo, batches), min(hi, batches)]
    fits = task_slots(float(batch.get("num_cpus") or 1), float(batch.get("num_gpus") or 0))
    return min(fits, batches)


def _segmentation_summary(state: State) -> dict[str, Any]:
    """Aggregate metrics over every committed row with ground truth (summed counts)."""
    table = state.rows.filter(pc.is_valid(state.rows.column("tp")))
    if table.num_rows == 0:
        return {"images": 0}
    counts = np.stack([table.column(k).to_numpy().astype(np.int64)
                       for k in ("tp", "fp", "fn", "tn")], axis=1)
    summary: dict[str, Any] = {"images": int(table.num_rows),
                               "counts": [int(v) for v in counts.sum(axis=0)]}
    summary.update(metrics_from_counts(counts.sum(axis=0)))
    for key in ("dice", "iou"):
        summary[f"{key}_mean"] = float(np.mean(table.column(key).to_numpy()))
    hd = table.column("hd95").to_numpy(zero_copy_only=False).astype(np.float64)
    finite = hd[np.isfinite(hd)]
    summary["hd95_mean"] = float(finite.mean()) if finite.size else None
    summary["hd95_inf"] = int(np.count_nonzero(np.isinf(hd)))
    return summary


def _totals(state: State, class_names: Sequence[str]) -> dict[str, Any]:
    classes = state.rows.column(PARTITION).to_pylist()
    by_class = {class_dir(c): 0 for c in class_names}
    by_class.update(Counter(classes))
    errors = [
        {"id": i, "error": e}
        for i, e in zip(state.ids, state.rows.column("error").to_pylist()) if e is not None
    ]
    versions = Counter(zip(state.rows.column("segmenter_version").to_pylist(),
                           state.rows.column("classifier_version").to_pylist()))
    return {
        "images": state.rows.num_rows,
        "counts_by_class": dict(sorted(by_class.items())),
        "errors": len(errors),
        "error_list": sorted(errors, key=lambda e: e["id"])[:LIST_CAP],
        "masks": len(state.masks),
        "parts": len(state.parts),
        "bundle_versions": _version_rows(versions),
    }


def done_by_other_bundles(state: State, ids: set[str], seg_info: Mapping[str, Any] | None,
                          cls_info: Mapping[str, Any] | None) -> Counter[tuple[Any, Any]]:
    """(segmenter version, classifier version) -> count of the committed result rows of `ids`
    that bundles other than this run's made (error rows made none)."""
    want = (seg_info["version"] if seg_info else None, cls_info["version"] if cls_info else None)
    rows = zip(state.ids, state.rows.column("error").to_pylist(),
               *(state.rows.column(c).to_pylist() for c in VERSION_COLUMNS))
    return Counter((sv, cv) for i, e, sv, cv in rows
                   if i in ids and e is None and (sv, cv) != want)


def _version_rows(versions: Counter[tuple[Any, Any]]) -> list[dict[str, Any]]:
    return [{"segmenter": sv, "classifier": cv, "images": n}
            for (sv, cv), n in sorted(versions.items(), key=str)]


def _version_list(versions: Counter[tuple[Any, Any]]) -> str:
    return "; ".join(f"segmenter {r['segmenter']}, classifier {r['classifier']}: {r['images']}"
                     for r in _version_rows(versions))


def _write_json(out: Output, rel: str, obj: Any) -> None:
    out.write(rel, (json.dumps(obj, indent=1, allow_nan=False, default=str) + "\n").encode(),
              atomic=True)


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the manifest is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def list_input(cfg: Mapping[str, Any], so: dict | None) -> Listing:
    """The input's records (bad files skipped), with the stamps of their files. LayoutError
    naming the URL for an input that does not exist or where the layout found no record among
    its files; an existing empty folder (nothing arrived) lists empty."""
    return list_records(str(cfg["input"]), str(cfg["layout"]), storage_options=so, strict=False,
                        allow_empty=True, stamps=True, **dict(cfg.get("layout_options") or {}))


def read_sources(out: Output) -> dict[str, tuple[str, float | None]]:
    """id -> (source stamp, threshold) of the rows committed so far (`SOURCES`; empty for an
    output written before it existed, or an unreadable one)."""
    try:
        table = pq.read_table(io.BytesIO(out.read(SOURCES)))
    except FileNotFoundError:
        return {}
    except Exception as exc:  # a damaged file: its rows are taken as they are
        warnings.warn(f"{SOURCES} of the output could not be read ({exc}): images changed "
                      "since they were processed are not looked for this run", stacklevel=2)
        return {}
    return {i: (st, t) for i, st, t in zip(*(table.column(c).to_pylist()
                                              for c in ("id", "stamp", "threshold")))}


def write_sources(out: Output, sources: Mapping[str, tuple[str, float | None]]) -> None:
    # ids as their rows store them (a name that is not Unicode: `valid_text`)
    sources = {valid_text(i): v for i, v in sources.items()}
    ids = sorted(sources)
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "stamp": pa.array([sources[i][0] for i in ids], pa.string()),
                      "threshold": pa.array([sources[i][1] for i in ids], pa.float64())})
    out.write(SOURCES, _table_bytes(table), atomic=True)


def check_settings(cfg: Mapping[str, Any]) -> None:
    """Refuse bad settings before anything is read or deleted (`overwrite=true` would otherwise
    empty the output before Ray refused a bad batch setting)."""
    batch, storage = cfg["batch"], cfg.get("storage") or {}
    check_storage(cfg)
    check_runtime_env(cfg.get("ray_runtime_env"), "ray_runtime_env")
    for name, value in (("overwrite", cfg.get("overwrite")),
                        ("retry_errors", cfg.get("retry_errors")),
                        ("ground_truth", cfg.get("ground_truth")),
                        ("batch.hausdorff", batch.get("hausdorff")),
                        ("batch.amp", batch.get("amp")),
                        ("storage.anonymous", storage.get("anonymous")),
                        ("storage.forward_credentials", storage.get("forward_credentials")),
                        *((f"storage.{role}.anonymous", (storage.get(role) or {}).get("anonymous"))
                          for role in STORAGE_ROLES)):
        check_flag(value, name, none=True)  # null: the default
    check_whole(cfg.get("limit"), "limit", 0, none=True)
    check_whole(cfg.get("compact_rows"), "compact_rows", 0, none=True)
    check_whole(cfg.get("compact_min_parts"), "compact_min_parts", 0, none=True)
    check_whole(batch.get("batch_size"), "batch.batch_size", 1)
    for key in ("io_threads", "torch_threads", "model_batch_size", "max_pixels", "max_bytes",
                "max_tasks_in_flight_per_actor"):
        check_whole(batch.get(key), f"batch.{key}", 1, none=True)
    # pixels above it are foreground: at 255 none would be
    check_whole(batch.get("mask_threshold", 127), "batch.mask_threshold", 0, 254)
    check_actor_pool(batch, "batch")
    device = check_device(batch.get("device") or "auto", "batch.device")
    if device.startswith("cuda") and not float(batch.get("num_gpus") or 0) > 0:
        raise ValueError(f"batch.device={device} needs batch.num_gpus > 0: Ray gives the actors "
                         "no GPU otherwise (batch=gpu sets both)")
    if cfg.get("ray_num_cpus") is not None:
        check_number(cfg["ray_num_cpus"], "ray_num_cpus", 0, strict=True)


def run(cfg: Mapping[str, Any], release: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the job on a plain config dict (as composed from pipelines/conf/segment_batch.yaml);
    returns the manifest. `release` runs before the closing line is printed (the entry point
    leaves Ray there: `pipelines.cluster.disconnect`)."""
    check_settings(cfg)
    threshold = check_threshold(cfg.get("threshold"))
    started = time.time()
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    input_url, output_url = str(cfg["input"]), str(cfg["output"]).rstrip("/")
    bundles = dict(cfg["bundles"])
    seg_uri, cls_uri = str(bundles["segmenter"]), bundles.get("classifier")
    cls_uri = str(cls_uri) if cls_uri else None
    batch = dict(cfg["batch"])
    so_in = storage_options(cfg, "input", input_url)
    so_out = storage_options(cfg, "output", output_url)
    # one set for both bundles: that of the one on object storage, if any
    so_bundles = storage_options(cfg, "bundles", next(
        (u for u in (seg_uri, cls_uri) if u and is_s3(u)), seg_uri))
    if _nested(output_url, input_url, so_out, so_in) or _nested(input_url, output_url, so_in,
                                                                 so_out):
        raise ValueError(f"output {output_url} and input {input_url} must not contain each other "
                         "(the job would read its own masks as input)")
    out = Output(output_url, so_out)
    seg_info = bundle_info(seg_uri, so_bundles, "segmentation", "bundles.segmenter")
    cls_info = bundle_info(cls_uri, so_bundles, "classification", "bundles.classifier")
    class_names = cls_info["class_names"] if cls_info else []

    # listed before anything in the output is deleted: a mistyped input (none, or nothing in
    # its layout) raises naming it
    listing = list_input(cfg, so_in)
    if not listing.records:
        print(f"[segment_batch] the input folder {valid_text(input_url)} is empty: no images "
              "arrived, nothing to process", flush=True)
    if cfg.get("overwrite"):
        print(f"[segment_batch] overwrite=true: deleting {RESULTS_DIR}/ and {MASKS_DIR}/ under "
              f"{valid_text(output_url)}", flush=True)
        out.delete_tree(RESULTS_DIR)
        out.delete_tree(MASKS_DIR)

    state, repaired = repair(out, State(out, (*INDEX_COLUMNS, *VERSION_COLUMNS)))
    # retried errors: their rows stay until the image is committed again (`repair` then keeps
    # the new row)
    retried = {i for i, e in zip(state.ids, state.rows.column("error").to_pylist())
               if e is not None} if cfg.get("retry_errors") else set()
    # an image replaced under its name (or a name now read from another file) since its row
    # was made is processed again: its old mask kept the old image's size for ever
    sources = read_sources(out)
    # what each row is made from: its files' names, sizes and modification times (ETags)
    stamps = {r.id: files_digest(r, listing.stamps)[:32] for r in listing.records}
    changed = {i for i in set(state.ids) & set(stamps)
               if i in sources and sources[i][0] != stamps[i]}
    retried |= changed
    done = set(state.ids) - retried
    # new images first: with a limit, retried errors (often files that stay corrupt) must not
    # take every night's whole share
    pending = [r for r in listing.records if r.id not in done and r.id not in retried] + \
        [r for r in listing.records if r.id in retried]
    limit = cfg.get("limit")
    todo = pending if limit is None else pending[:limit]
    print(f"[segment_batch] {len(listing.records)} images in {valid_text(input_url)} "
          f"({len(listing.skipped)} files skipped by the layout), "
          f"{len(listing.records) - len(pending)} already done, "
          f"{len(todo)} to process", flush=True)
    for skip in listing.skipped[:5]:  # the reasons too, not only in manifest.json
        print(f"  skipped {valid_text(skip.path)}: {valid_text(skip.reason)}", flush=True)
    if len(listing.skipped) > 5:
        print(f"  ... and {len(listing.skipped) - 5} more, every one in the manifest's "
              "input.skipped", flush=True)

    if changed:
        print(f"[segment_batch] {len(changed)} of the images already done changed since (a "
              "file replaced under its name, or the name now read from another file): "
              "processed again", flush=True)
    stale = done_by_other_bundles(state, {r.id for r in listing.records} & done,
                                  seg_info, cls_info)
    if stale:
        print(f"[segment_batch] {sum(stale.values())} of the images already done were "
              f"segmented by other bundles ({_version_list(stale)}); their rows are kept "
              "(overwrite=true processes every image again with these bundles)", flush=True)
    other_threshold = Counter(sources[i][1] for i in done & set(stamps)
                              if i in sources and sources[i][1] != threshold)
    if other_threshold:
        print(f"[segment_batch] {sum(other_threshold.values())} of the images already done "
              "were segmented at another threshold ("
              + ", ".join(f"{n} at {'the bundle' + chr(39) + 's' if t is None else t}"
                          for t, n in sorted(other_threshold.items(), key=str))
              + "); their rows are kept (overwrite=true processes every image again)",
              flush=True)

    progress = Progress()
    if todo:
        # before any row is committed: a row always has the stamp of the files it was made of
        write_sources(out, {**({} if cfg.get("overwrite") else sources),
                            **{r.id: (stamps[r.id], threshold) for r in todo}})
        _process(cfg, batch, todo, seg_uri, cls_uri, so_in, so_bundles, out, run_id,
                 progress, threshold)
    processed, run_errors, seconds = progress.counts, progress.errors, progress.seconds

    state, repaired_end = repair(out, State(out, SUMMARY_COLUMNS), retried,
                                 {r.id for r in todo if r.id in changed})
    state, merged = compact(out, state, int(cfg.get("compact_rows") or 0),
                            int(cfg.get("compact_min_parts") or 0))
    referenced = state.referenced()
    orphans = sorted(state.masks - referenced)
    out.delete(orphans)
    leftovers = out.hidden(RESULTS_DIR) + out.hidden(MASKS_DIR)
    out.delete(leftovers)
    state.masks -= set(orphans)

    committed = set(state.ids)
    remaining = sum(1 for r in listing.records if r.id not in committed)
    n_processed = sum(processed.values())
    finished = time.time()
    manifest = {
        "format": FORMAT,
        "run_id": run_id,
        "started_at": _utc(started),
        "finished_at": _utc(finished),
        "seconds": round(finished - started, 3),
        "input": {"url": valid_text(input_url), "layout": cfg["layout"],
                  "layout_options": dict(cfg.get("layout_options") or {}),
                  "images": len(listing.records), "skipped_files": len(listing.skipped),
                  "skipped": [{"path": s.path, "reason": s.reason}
                              for s in listing.skipped[:LIST_CAP]]},
        "output": valid_text(output_url),
        "bundles": {"segmenter": seg_info, "classifier": cls_info},
        "class_names": class_names,
        "run": {
            "processed": n_processed,
            "already_done": len(listing.records) - len(pending),
            "done_by_other_bundles": _version_rows(stale),
            "limit": limit,
            "remaining": remaining,
            "complete": remaining == 0,
            "counts_by_class": dict(sorted(processed.items())),
            "errors": len(run_errors),
            "processing_seconds": round(seconds, 3),
            "images_per_s": round(n_processed / seconds, 3) if n_processed and seconds else 0.0,
            "first_commit_seconds": round(progress.first_seconds, 3),
            "steady_images_per_s": round(progress.steady_rate(), 3),
            "overwrite": bool(cfg.get("overwrite")),
            "retry_errors": bool(cfg.get("retry_errors")),
            "errors_retried": sum(1 for r in todo if r.id in retried - changed),
            "inputs_changed": sum(1 for r in todo if r.id in changed),
            "done_at_other_thresholds": [{"threshold": t, "images": n}
                                         for t, n in sorted(other_threshold.items(), key=str)],
            "batch": {k: batch.get(k) for k in ("batch_size", "num_cpus", "num_gpus",
                                                 "torch_threads", "io_threads")},
        },
        "repair": {
            "duplicate_rows_removed": repaired["duplicate_rows_removed"]
            + repaired_end["duplicate_rows_removed"],
            "rows_without_mask_removed": repaired["rows_without_mask_removed"]
            + repaired_end["rows_without_mask_removed"],
            "orphan_masks_removed": len(orphans),
            "temporary_files_removed": len(leftovers),
            "parts_merged": merged,
            "unreadable_parts_quarantined": out.quarantined[:LIST_CAP],
        },
        "totals": _totals(state, class_names),
        "segmentation": _segmentation_summary(state),
    }
    manifest = _clean(manifest)
    _write_json(out, f"{RUNS_DIR}/{run_id}.json", manifest)
    _write_json(out, MANIFEST, manifest)
    totals, seg = manifest["totals"], manifest["segmentation"]
    if release is not None:
        release()
    print(f"[segment_batch] processed {n_processed} images in {seconds:.1f} s "
          f"({manifest['run']['images_per_s']} images/s), {len(run_errors)} errors; output now "
          f"holds {totals['images']} results {totals['counts_by_class']}"
          + (f", Dice {seg['dice']:.4f} IoU {seg['iou']:.4f} over {seg['images']} images with "
             "ground truth" if seg.get("images") else "")
          + f"; manifest {valid_text(output_url)}/{MANIFEST}", flush=True)
    return manifest


class Progress:
    """This run's committed images, as the summaries stream back to the driver."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.errors: list[dict[str, str]] = []
        self.start = time.time()
        self.first: float | None = None  # when the first committed batch came back
        self.first_rows = 0
        self.end = self.start

    def add(self, summary: pa.Table) -> None:
        now = time.time()
        if self.first is None:
            self.first, self.first_rows = now, summary.num_rows
        self.end = now
        self.counts.update(summary.column(PARTITION).to_pylist())
        for i, e in zip(summary.column("id").to_pylist(), summary.column("error").to_pylist()):
            if e is not None:
                self.errors.append({"id": i, "error": e})

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def first_seconds(self) -> float:
        return (self.first - self.start) if self.first is not None else 0.0

    def steady_rate(self) -> float:
        """Images/s after the first batch came back (actor start-up excluded)."""
        n = sum(self.counts.values()) - self.first_rows
        span = self.end - (self.first or self.end)
        return n / span if n > 0 and span > 0 else 0.0


def _process(cfg: Mapping[str, Any], batch: Mapping[str, Any], todo: list[Record], seg_uri: str,
             cls_uri: str | None, so_in: dict | None, so_bundles: dict | None, out: Output,
             run_id: str, progress: Progress, threshold: float | None) -> None:
    """Predict and commit ``todo`` on the actor pool, streaming into ``progress``."""
    connect(cfg.get("ray_address"), cfg.get("ray_num_cpus"), cfg.get("ray_runtime_env") or None)
    num_gpus = float(batch.get("num_gpus") or 0)
    num_cpus = 1.0 if batch.get("num_cpus") is None else float(batch["num_cpus"])
    check_fits({"CPU": num_cpus, "GPU": num_gpus}, "one actor of the bulk job's pool",
               "Use batch=cpu (or smaller batch.num_cpus / ray_num_cpus that fit) on this "
               "machine, or join a cluster that has the resources (ray_address or RAY_ADDRESS).")
    bundles = {"bundles.segmenter": seg_uri, **({"bundles.classifier": cls_uri} if cls_uri else {})}
    check_shared_paths({"output": out.url}, {"input": str(cfg["input"]), **bundles},
                       {"CPU": num_cpus, "GPU": num_gpus}, _pool_size(batch, len(todo)),
                       "the bulk job's actors")
    device = str(batch.get("device") or "auto")
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    ds = predict_records(
        todo,
        seg_uri=seg_uri,
        cls_uri=cls_uri,
        storage_options=so_in,
        batch_size=int(batch["batch_size"]),
        concurrency=_pool_size(batch, len(todo)),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        threshold=threshold,
        predictor=CommittingPredictor,
        predictor_kwargs={
            "device": device,
            "output": out.url,
            "output_options": out.storage_options,
            # {} rather than None, which would read them with the input's options
            "bundle_storage_options": so_bundles or {},
            "run_id": run_id,
            "io_threads": 8 if batch.get("io_threads") is None else int(batch["io_threads"]),
            "torch_threads": batch.get("torch_threads"),
            "hausdorff": bool(batch.get("hausdorff", True)),
            "with_truth": bool(cfg.get("ground_truth", True)),
            "max_pixels": batch.get("max_pixels"),
            "max_bytes": batch.get("max_bytes"),
            "mask_threshold": int(batch.get("mask_threshold", 127)),
            "model_batch_size": batch.get("model_batch_size"),
            "amp": batch.get("amp"),
        },
        forward_credentials=bool((cfg.get("storage") or {}).get("forward_credentials", True)),
        max_tasks_in_flight_per_actor=batch.get("max_tasks_in_flight_per_actor"),
        extra_uris=[out.url],
    )
    progress.start = time.time()
    for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(summary)


@hydra.main(config_path=CONF_DIR, config_name="segment_batch", version_base=None)
def main(cfg: DictConfig) -> None:
    with reported_refusals(), explained_storage_errors():
        run(resolve(cfg), release=disconnect)


if __name__ == "__main__":
    main()
