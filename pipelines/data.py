"""Archives -> records -> splits (this part needs no Ray) and -> Ray Datasets.

`load_splits(cfg)` lists an archive once with its layout (or reads the manifest of a packed
archive, see `pipelines/pack.py`), groups near-duplicate images by perceptual hash, and returns
deterministic train/val/test (or fold) record lists.

`build_datasets(cfg, splits)` turns those lists into Ray Datasets whose rows are
``{"image": uint8 (H, W, C), "mask": uint8 (H, W), "label": int64}`` at ``data.image_size``:

    records --RecordsDatasource (ray.data.read_datasource)--> read tasks of data.read.batch_size
            records: read the bytes (fsspec; a thread pool for object storage), decode,
            transform --> one block of rows per task

Reading, decoding and transforming happen in the read task itself, with the same medseg_core
code as in-process training and inference (`decode_record`, `build_transforms`, `sample_rng`),
so a sample is augmented identically wherever it is processed and undecoded bytes never travel
through the object store. Nothing materializes the archive: the record list (URIs) is the only
thing held in full, and backpressure bounds the decoded images in flight: each read operator
keeps at most `data.read.read_ahead` x its task slots in tasks running or queued plus blocks
waiting for the consumer (`pipelines/backpressure.py`; null: Ray Data's own per-operator
budgets). Packed archives (`pipelines/pack.py`) are read the same way, one Parquet row group per
task unit.

Per-epoch augmentation (why it works this way)
----------------------------------------------
Ray Train V2 hands each worker a `DataIterator` (`get_dataset_shard`) and the worker calls
`iter_torch_batches` once per epoch; every call re-executes the Dataset (in the
`SplitCoordinator` actor for `streaming_split`, in the caller otherwise). The decode tasks run
in other processes, so an epoch counter kept by the training loop is not visible to them, and
the loop cannot rebuild a Dataset it only holds an iterator of. But each execution starts by
asking the datasource for its read tasks (`Datasource.get_read_tasks`), in the process that
executes the plan, with the Dataset's `DataContext`, whose `_execution_idx` counts the
executions of that Dataset (Ray's own per-epoch reseeding, `RandomSeedConfig(
reseed_after_execution=True)` for `random_shuffle`, reads the same counter). So there:

    epoch = data.epoch_offset + (number of earlier executions of this Dataset)
    record order = permutation seeded by (cfg.seed, epoch)         (data.shuffle, train only)
    rng of one sample = medseg_core.dataset.sample_rng(cfg.seed, epoch, record id)

and the epoch is handed to every read task as a plain argument. The k-th pass over the train
Dataset (or over its Train shards: all workers share one execution per epoch) is augmentation
epoch k, differs from the other epochs, reshuffles the records without any all-to-all shuffle,
and is reproducible for the same seed whatever order, batching or process decodes the samples
(and equal to `RecordDataset.set_epoch(k)` in-process). Caveats: other executions of the *same*
Dataset object (`count()`, `schema()`, `take()`) advance the counter too, and a new Dataset
counts from `data.epoch_offset` again: Ray Train builds the train Dataset anew at every worker
group start (the first, and each restart by `FailureConfig`), with the resume epoch added to
`data.epoch_offset` (`pipelines/train_ray.resumed_train_dataset`).
Loops that own their epoch number pin it instead with `train_epoch_dataset(ds, epoch, cfg)`. With ``trainer.gpu_augment`` the train rows are only
resized and augmentation happens on the device.

Bad input (error accounting)
----------------------------
Zero-byte, truncated, non-image or oversized (decompression bomb) files, a mask whose size
differs from its image, or a file that vanished after listing: with ``data.strict: false`` (the
default) the record is dropped, a warning naming the file is logged where it happened, and the
problem goes to the run's report (`data.report`, JSON). Raw archives are checked once on the
driver before the splits (every image and mask decoded, mask sizes compared; hashed for the
splits at the same time; cached under ``output_dir/cache``, per record by its files'
sizes and modification times or ETags) when the splits group near-duplicates (the default:
a bad record is dropped before splitting, as packing drops it) or the caller asks
(`load_splits(cfg, check=True)`: the in-process trainer does; with grouping off the split is
then of the listing, and a bad record leaves its split after it, so that Ray's tasks and
evaluation, which find it where they read it, split alike). Evaluation of ``split=all`` does
not check: a bad record becomes an error row there.
Problems found on the driver (listing, checking) are recorded directly; problems found in Ray tasks are sent to one small ledger actor
per report, and the task waits for the acknowledgement before its block is emitted, so once an
epoch has been consumed the report holds every record it dropped (deduplicated by file and
reason, so re-reading a bad file every epoch counts it once). `data_report(cfg)` returns the
report, writes it and warns with the names. ``data.strict: true`` raises on the first bad file
with its name instead.

Object storage: ``data.url`` may be ``s3://bucket/prefix``; ``data.endpoint_url``,
``data.region`` and ``data.anonymous`` configure an S3-compatible endpoint. Credentials come only
from the environment (AWS_ACCESS_KEY_ID, ...); `storage_options` refuses credential keys. With
``data.forward_credentials`` the driver's AWS_* environment is handed to the read tasks in
memory (never in a runtime_env, which Ray logs), for clusters whose workers were started
without it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from medseg_core.dataset import sample_rng
from medseg_core.io import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    image_size,
    is_local,
    object_fs,
    read_limited,
)
from medseg_core.layouts import (
    LayoutError,
    Listing,
    Record,
    decode_masks,
    decode_record,
    files_digest,
    list_records,
    valid_text,
)
from medseg_core.splits import phash
from medseg_core.splits import split_records as core_split_records
from medseg_core.synthetic import generate_dataset
from medseg_core.transforms import build_transforms, to_channels
from pipelines.config import check_number, check_whole

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.data import Dataset

logger = logging.getLogger("medseg.data")

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "data_report.json"  # the bad-input report's name where an entry point places it
PACKED_FORMAT = "medseg-packed"
PACKED_MARK = "#rg="
PROGRESS_EVERY_S = 10.0  # a progress line of work on the driver that the Ray progress bars miss
# Errors that mean "this file is bad": dropped and reported (or fatal in strict). Anything else
# (no permission, wrong credentials, network down, a bug) fails the run: it is not bad input, and
# dropping every record for it would hide the real problem.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ImageDecodeError, LayoutError, FileNotFoundError, IsADirectoryError, NotADirectoryError)

# storage_options keys that would carry a secret; credentials come from the environment only
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "access_key", "secret_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
    "sas_token", "client_secret", "credentials",
})
# environment variables handed to read tasks when `data.forward_credentials` is on
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)


# ----------------------------------------------------------------------------------------------
# Storage


def _protocol(url: str) -> str:
    return fsspec.utils.get_protocol(url)


def is_s3(url: str) -> bool:
    return _protocol(url) in ("s3", "s3a")


def _check_no_credentials(options: Mapping[str, Any],
                          where: str = "data.storage_options") -> None:
    """Refuse credential keys in fsspec options; `where` names the setting."""
    for k, v in options.items():
        if str(k).lower() in CREDENTIAL_KEYS:
            raise ValueError(
                f"{where}.{k}: credentials must not be in the config; set them in the "
                "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)")
        if isinstance(v, Mapping):
            _check_no_credentials(v, f"{where}.{k}")


def storage_options(data_cfg: Mapping[str, Any], url: str | None = None) -> dict | None:
    """fsspec options for the archive: `data.storage_options` plus, for ``s3://`` URLs, the
    endpoint, region and anonymous-access keys. Credentials are refused here (environment only).
    """
    so = copy.deepcopy(dict(data_cfg.get("storage_options") or {}))
    _check_no_credentials(so)
    url = url or str(data_cfg.get("url") or "")
    if is_s3(url):
        client = dict(so.get("client_kwargs") or {})
        if data_cfg.get("endpoint_url"):
            client.setdefault("endpoint_url", str(data_cfg["endpoint_url"]))
        if data_cfg.get("region"):
            client.setdefault("region_name", str(data_cfg["region"]))
        if client:
            so["client_kwargs"] = client
        if data_cfg.get("anonymous"):
            so["anon"] = True
    return so or None


@dataclass(frozen=True)
class EnvCredentials:
    """AWS_* variables captured from the driver's environment, applied to s3fs options in read
    tasks. Kept out of configs, runtime_envs and reprs."""

    values: tuple[tuple[str, str], ...] = ()

    @classmethod
    def capture(cls) -> EnvCredentials:
        return cls(tuple((k, os.environ[k]) for k in CREDENTIAL_ENV if os.environ.get(k)))

    def __repr__(self) -> str:
        return f"EnvCredentials({[k for k, _ in self.values]})"

    def apply(self, so: dict | None) -> dict | None:
        """Options for s3fs: configured values win; the environment fills what is missing."""
        env = dict(self.values)
        if not env:
            return so
        out = copy.deepcopy(dict(so or {}))
        if not out.get("anon"):
            for opt, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                             ("token", "AWS_SESSION_TOKEN"), ("profile", "AWS_PROFILE")):
                if var in env and opt not in out:
                    out[opt] = env[var]
        client = dict(out.get("client_kwargs") or {})
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            client.setdefault("endpoint_url", endpoint)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            client.setdefault("region_name", region)
        if client:
            out["client_kwargs"] = client
        return out


def task_credentials(data_cfg: Mapping[str, Any], url: str) -> EnvCredentials | None:
    """This process's AWS_* environment, to forward to read tasks (an s3:// URL, and
    `data.forward_credentials`)."""
    if is_s3(url) and data_cfg.get("forward_credentials", True):
        return EnvCredentials.capture()
    return None


def _fs(uri: str, so: dict | None, env: EnvCredentials | None = None):
    opts = env.apply(so) if (env is not None and is_s3(uri)) else so
    return object_fs(uri, opts)


def fetch_many(uris: Sequence[str], so: dict | None, env: EnvCredentials | None = None,
               threads: int = 8, max_bytes: int | None = DEFAULT_MAX_BYTES
               ) -> dict[str, bytes | BaseException]:
    """Bytes of every URI (or the exception reading it raised); remote reads run concurrently.
    A file of more than `max_bytes`, or a local one that is not a regular file, is an
    exception unread (`medseg_core.io.read_limited`)."""
    out: dict[str, bytes | BaseException] = {}
    if not uris:
        return out
    by_fs: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
    for uri in dict.fromkeys(uris):
        fs, path = _fs(uri, so, env)
        by_fs.setdefault(id(fs), (fs, []))[1].append((uri, path))

    for fs, items in by_fs.values():
        def one(item: tuple[str, str], fs=fs) -> tuple[str, bytes | BaseException]:
            uri, path = item
            try:
                return uri, read_limited(fs, path, max_bytes, uri)
            except BAD_INPUT_ERRORS as e:
                return uri, e

        if is_local(fs) or threads <= 1 or len(items) == 1:
            out.update(one(i) for i in items)
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
                out.update(pool.map(one, items))
    return out


def record_bytes(rec: Record, fetched: Mapping[str, bytes | BaseException]) -> list[bytes]:
    """The image's and then each mask's bytes from `fetch_many`'s result; a file refused as too
    large or not regular raises its ImageDecodeError, any other failed read FileNotFoundError
    naming the file."""
    blobs = []
    for uri in (rec.image_uri, *rec.mask_uris):
        b = fetched[uri]
        if isinstance(b, ImageDecodeError):
            raise b
        if isinstance(b, BaseException):
            raise FileNotFoundError(f"{uri}: cannot read: {b}") from b
        blobs.append(b)
    return blobs


# ----------------------------------------------------------------------------------------------
# Problems and the report


@dataclass(frozen=True)
class Problem:
    """A dropped record (or file) and why: `stage` is listing, check, pack or decode."""

    stage: str
    path: str
    reason: str
    id: str | None = None
    split: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.stage, self.path, self.reason)

    @classmethod
    def of(cls, stage: str, e: BaseException, rec: Record, split: str | None = None) -> Problem:
        """The problem of a record that raised `e`, blaming the file the error names."""
        path = blamed_path(e, rec)
        return cls(stage, path, _reason(e, path), rec.id, split)


class BadRecordError(ValueError):
    """A bad file in strict mode; the message names it."""


def report_path(cfg: Mapping[str, Any]) -> str | None:
    """Where the bad-input report of this run goes (`data.report`), or None."""
    data = cfg.get("data", cfg)
    path = data.get("report")
    return str(path) if path else None


def report_options(cfg: Mapping[str, Any]) -> dict | None:
    """fsspec options of `data.report`: `data.report_storage_options`, which pack and evaluate
    set to their output's (training's reports, like its bundles, use the environment's)."""
    so = cfg.get("data", cfg).get("report_storage_options") or None
    if so:
        _check_no_credentials(so, "data.report_storage_options")
    return so


def _summarize(problems: Iterable[Problem], strict: bool) -> dict[str, Any]:
    items = sorted(problems, key=lambda p: (p.stage, p.path, p.reason))
    by_stage: dict[str, int] = {}
    by_split: dict[str, int] = {}
    records: set[str] = set()
    for p in items:
        by_stage[p.stage] = by_stage.get(p.stage, 0) + 1
        if p.split:
            by_split[p.split] = by_split.get(p.split, 0) + 1
        records.add(p.id or p.path)
    return {"strict": strict, "dropped": len(records), "problems": len(items),
            "by_stage": by_stage, "by_split": by_split,
            "entries": [asdict(p) for p in items]}


def _write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp" if is_local(fs) else path
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    if tmp != path:
        os.replace(tmp, path)


class ProblemLedger:
    """Collects problems from Ray tasks (one actor per report file) and keeps the JSON current.

    Entries are deduplicated by (stage, file, reason). The file is rewritten when something new
    arrives (at most once a second for large reports; `flush` always writes).
    """

    def __init__(self, path: str | None, strict: bool = False,
                 storage_options: dict | None = None):
        self.path = path
        self.strict = strict
        self.storage_options = storage_options
        self.items: dict[tuple[str, str, str], Problem] = {}
        self.dirty = False
        self.last_write = 0.0

    def add(self, problems: list[Problem]) -> int:
        new = [p for p in problems if p.key not in self.items]
        for p in new:
            self.items[p.key] = p
        if new:
            self.dirty = True
            if len(self.items) < 1000 or time.time() - self.last_write > 1.0:
                self.flush()
        return len(new)

    def report(self) -> dict[str, Any]:
        return _summarize(self.items.values(), self.strict)

    def flush(self) -> dict[str, Any]:
        rep = self.report()
        if self.path and (self.dirty or self.last_write == 0.0):
            _write_json(self.path, rep, self.storage_options)
            self.last_write = time.time()
            self.dirty = False
        return rep


# Driver-side problems (listing, checking) waiting for the run's ledger; by report path.
_DRIVER_PROBLEMS: dict[str | None, dict[tuple[str, str, str], Problem]] = {}
_LOCK = threading.Lock()


def _ledger_name(path: str | None) -> str:
    return "medseg-data-report-" + hashlib.sha1(str(path).encode()).hexdigest()[:16]


_LEDGER_ACTOR: Any = None


def problem_ledger(cfg: Mapping[str, Any]) -> ActorHandle:
    """The run's ledger actor (created on first use; shared by every dataset of the run)."""
    import ray

    global _LEDGER_ACTOR
    if _LEDGER_ACTOR is None:
        _LEDGER_ACTOR = ray.remote(num_cpus=0)(ProblemLedger)
    path = report_path(cfg)
    strict = bool(cfg["data"].get("strict", False))
    ledger = _LEDGER_ACTOR.options(name=_ledger_name(path), get_if_exists=True).remote(
        path, strict, report_options(cfg))
    with _LOCK:
        pending = list(_DRIVER_PROBLEMS.pop(path, {}).values())
    ray.get(ledger.add.remote(pending))
    return ledger


def record_problems(cfg: Mapping[str, Any], problems: Sequence[Problem]) -> None:
    """Driver side: warn with every name, keep for the report, and write the report now."""
    if not problems:
        return
    for p in problems:
        logger.warning("medseg data: dropped %s: %s", p.path, p.reason)
    path = report_path(cfg)
    names = ", ".join(p.path for p in problems[:5]) + (" ..." if len(problems) > 5 else "")
    warnings.warn(f"medseg data: dropped {len(problems)} bad input file(s): {names} "
                  f"(report: {path or 'data_report(cfg)'})", stacklevel=2)
    ledger = _existing_ledger(path)
    if ledger is not None:
        import ray

        ray.get(ledger.add.remote(list(problems)))
        return
    with _LOCK:
        bucket = _DRIVER_PROBLEMS.setdefault(path, {})
        for p in problems:
            bucket[p.key] = p
        items = list(bucket.values())
    if path:
        _write_json(path, _summarize(items, bool(cfg["data"].get("strict", False))),
                    report_options(cfg))


def _existing_ledger(path: str | None) -> ActorHandle | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(_ledger_name(path))
    except (ImportError, ValueError):
        return None


def data_report(cfg: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """The bad-input report of this run: counts and every dropped file with its reason.

    Writes it to `data.report` and warns with the names when something was dropped.
    """
    path = report_path(cfg)
    strict = bool(cfg["data"].get("strict", False))
    ledger = _existing_ledger(path)
    if ledger is not None:
        import ray

        rep = ray.get(ledger.flush.remote())
    else:
        with _LOCK:
            items = list(_DRIVER_PROBLEMS.get(path, {}).values())
        rep = _summarize(items, strict)
        if path:
            _write_json(path, rep, report_options(cfg))
    if warn and rep["problems"]:
        names = ", ".join(e["path"] for e in rep["entries"][:5])
        more = " ..." if rep["problems"] > 5 else ""
        warnings.warn(f"medseg data: {rep['dropped']} record(s) dropped for bad input: "
                      f"{names}{more} (report: {path or 'in memory'})", stacklevel=2)
    return rep


def _settle(problems: list[Problem], strict: bool, ledger: ActorHandle | None) -> None:
    """In a task: strict -> raise naming the file; else warn and wait for the ledger's ack."""
    if not problems:
        return
    if strict:
        p = problems[0]
        raise BadRecordError(f"{p.path}: {p.reason} (data.strict=true)")
    for p in problems:
        logger.warning("medseg data: dropped %s: %s", p.path, p.reason)
    if ledger is not None:
        import ray

        ray.get(ledger.add.remote(problems))


# ----------------------------------------------------------------------------------------------
# Listing, hashing, splitting


GENERATED_STAMP = ".medseg-generate.json"  # hidden: layouts pass it over


def ensure_dataset(data_cfg: dict[str, Any]) -> str:
    """The archive URL; the synthetic default is generated on first use, and its settings
    stamped in the folder last (a folder generated under other `data.generate` settings is
    refused: it was used as it was, silently)."""
    url = data_cfg["url"]
    gen = data_cfg.get("generate")
    if data_cfg.get("name") == "synthetic" and gen:
        so = storage_options(data_cfg)
        fs, path = fsspec.core.url_to_fs(url, **(so or {}))
        asked = {"n_per_class": gen["n_per_class"], "size": gen["size"], "seed": gen["seed"],
                 "class_names": list(data_cfg["class_names"])}
        for key in ("n_per_class", "size"):
            check_whole(asked[key], f"data.generate.{key}", 1)
        check_whole(asked["seed"], "data.generate.seed", 0)
        stamp = f"{path.rstrip('/')}/{GENERATED_STAMP}"
        if not fs.exists(path) or not fs.ls(path):
            generate_dataset(url, n_per_class=int(gen["n_per_class"]), size=int(gen["size"]),
                             seed=int(gen["seed"]), class_names=tuple(data_cfg["class_names"]),
                             storage_options=so)
            with fs.open(stamp, "w") as f:
                json.dump(asked, f)
        elif fs.exists(stamp):
            with fs.open(stamp) as f:
                made = json.load(f)
            if made != asked:
                differ = ", ".join(f"{k} {made.get(k)!r} -> {v!r}" for k, v in asked.items()
                                   if made.get(k) != v)
                raise ValueError(
                    f"{valid_text(url)} holds a synthetic set generated under other "
                    f"data.generate settings ({differ}): set another data.url (or "
                    "output_dir) for the new set, or delete that folder to generate it anew")
    return url


@contextlib.contextmanager
def _still_waiting(what: str | None, every_s: float | None = None) -> Iterator[None]:
    """Print `what` and the seconds waited every `every_s` (default 3 x PROGRESS_EVERY_S)
    until the block ends: a store that accepts connections and never answers kept a run
    silent for 7 minutes before its error."""
    if what is None:
        yield
        return
    done, start = threading.Event(), time.monotonic()
    every = 3 * PROGRESS_EVERY_S if every_s is None else every_s

    def beat() -> None:
        while not done.wait(every):
            print(f"{what}: {time.monotonic() - start:.0f} s without an answer so far",
                  flush=True)

    thread = threading.Thread(target=beat, daemon=True, name="medseg-still-waiting")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def list_archive(data_cfg: dict[str, Any], strict: bool | None = None,
                 stamps: bool = False) -> Listing:
    """List the archive once with its layout (`stamps`: see `list_records`). The layout's
    labels index its class names: `data.class_names` (what training, bundles and reports call
    them) must be those, in that order, or LayoutError (reordered, every label was named
    after another class)."""
    url = ensure_dataset(data_cfg)
    from pipelines.cluster import local_path

    so = storage_options(data_cfg)
    endpoint = (so or {}).get("client_kwargs", {}).get("endpoint_url")
    remote = local_path(url) is None
    if remote:  # minutes where the endpoint is wrong
        print(f"[data] listing {valid_text(url)}{f' at {endpoint}' if endpoint else ''}",
              flush=True)
    try:
        with _still_waiting(f"[data] still listing {valid_text(url)}" if remote else None):
            listing = list_records(
                url, data_cfg["layout"], storage_options=so,
                strict=bool(data_cfg.get("strict", True) if strict is None else strict),
                max_bytes=_max_bytes(data_cfg), stamps=stamps,
                **(data_cfg.get("options") or {}),
            )
    except LayoutError as exc:
        if endpoint and "does not exist" in str(exc):
            # a server's other port (or any HTTP server) answers 404 to every S3 request
            raise LayoutError(f"{exc}; or data.endpoint_url={endpoint} is not the S3 endpoint "
                              "(another port of the server, or another service)") from exc
        raise
    named = [str(c) for c in data_cfg.get("class_names") or []]
    labels = [str(c) for c in listing.class_names]
    if named and labels and named != labels:
        compact = json.dumps(labels).replace(" ", "")
        raise LayoutError(f"{valid_text(url)}: layout {data_cfg['layout']} labels records by "
                          f"class names {labels}, but data.class_names is {named}: set "
                          f"data.class_names={compact}, or +data.options.class_names= the "
                          "same list as data.class_names to label them in that order")
    return listing


def image_phash(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> int:
    """The split hash of one image file (the same for raw and packed archives)."""
    return phash(decode_image(data, 1, max_pixels=max_pixels, name=name, draft=(128, 128)))


def checked_hashes(records: Sequence[Record], so: dict | None, *, strict: bool,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   max_bytes: int | None = DEFAULT_MAX_BYTES, threads: int = 8,
                   cache_dir: str | None = None, cache_name: str = "",
                   stamps: Mapping[str, str] | None = None
                   ) -> tuple[list[int | None], list[Problem]]:
    """Check every record (its image and masks decode, each mask is the image's size) and hash
    its image, in a thread pool (Pillow decodes without the GIL).

    A bad record gives None and a Problem naming the bad file (or raises when `strict`), so it
    is dropped before the splits, as packing drops it. Good records are cached under
    `cache_dir` (one file per `cache_name`, the archive, and limits: a record kept under a
    larger limit is checked again under a smaller one), each under a digest of its files'
    URIs and `stamps` (`Listing.stamps`: size and mtime or ETag), so a file replaced or
    damaged under its name is checked again, and a record added or removed leaves the others
    cached. A record with a file whose stamp is missing or holds at most the size (a
    filesystem whose listing shows no modification time, ETag or checksum, such as an HTTP
    index page) is checked every time: a file replaced under its name would otherwise keep its
    old result. Failures are not cached (a repaired file is retried).
    """
    stamps = stamps or {}

    def digest(rec: Record) -> str | None:
        uris = (rec.image_uri, *rec.mask_uris)
        if not all(stamps.get(u, "").partition(":")[2] for u in uris):
            return None
        return files_digest(rec, stamps)[:20]

    digests = {r.id: digest(r) for r in records}
    cache: dict[str, Any] = {}
    url = None
    if cache_dir:
        name = f"{cache_name}\nmax_pixels={max_pixels} max_bytes={max_bytes}"
        key = hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:16]
        url = f"{cache_dir.rstrip('/')}/phash-v4-{key}.json"
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            with fs.open(path, "r") as f:
                stored = json.load(f)
            cache = {r.id: stored[r.id][1] for r in records if digests[r.id] is not None
                     and isinstance(stored.get(r.id), list) and stored[r.id][0] == digests[r.id]}
    todo = [r for r in records if r.id not in cache]

    def one(rec: Record) -> tuple[str, Any]:
        try:
            image, *masks = record_bytes(
                rec, fetch_many([rec.image_uri, *rec.mask_uris], so, threads=1,
                                max_bytes=max_bytes))
            phash_ = image_phash(image, rec.image_uri, max_pixels)
            if masks:
                w, h = image_size(image, rec.image_uri)
                decode_masks(rec, masks, (h, w), max_pixels=max_pixels)
            return rec.id, str(phash_)
        except BAD_INPUT_ERRORS as e:
            if strict:
                raise
            p = Problem.of("check", e, rec)
            return rec.id, {"path": p.path, "reason": p.reason}

    if todo:
        start = last = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for done, (rid, value) in enumerate(pool.map(one, todo), 1):
                cache[rid] = value
                if time.monotonic() - last >= PROGRESS_EVERY_S and done < len(todo):
                    last = time.monotonic()  # a large archive was checked without a word
                    print(f"[data] checked {done}/{len(todo)} records before splitting "
                          f"({done / (last - start):.0f}/s)", flush=True)
        if url and any(not isinstance(cache[r.id], dict) and digests[r.id] for r in todo):
            fs, path = fsspec.core.url_to_fs(url)
            if is_local(fs):
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with fs.open(path, "w") as f:
                json.dump({r.id: [digests[r.id], cache[r.id]] for r in records
                           if not isinstance(cache[r.id], dict) and digests[r.id]}, f)
    hashes: list[int | None] = []
    problems = []
    for rec in records:
        v = cache[rec.id]
        if isinstance(v, dict):
            if strict:
                raise BadRecordError(f"{v['path']}: {v['reason']} (data.strict=true)")
            hashes.append(None)
            problems.append(Problem("check", v["path"], v["reason"], rec.id))
        else:
            hashes.append(int(v))
    return hashes, problems


def _reason(e: BaseException, name: str) -> str:
    """The error message without a repeated file name prefix, on one printable line (a
    parser's message may echo the file's bytes)."""
    msg = str(e) or type(e).__name__
    msg = msg[len(name) + 2:] if msg.startswith(f"{name}: ") else msg
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in " ".join(msg.split()))


def split_mode(split_cfg: Mapping[str, Any] | None) -> str:
    """`data.split.mode`, checked: ratio or kfold."""
    mode = (split_cfg or {}).get("mode", "ratio")
    if mode not in ("ratio", "kfold"):
        raise ValueError(f"data.split.mode must be ratio or kfold, got {mode!r}")
    return mode


def check_split(split_cfg: Mapping[str, Any] | None) -> None:
    """`data.split`, checked before any listing (a bad fold or ratio failed after it, named
    `fold` or `ratios` alone)."""
    split = dict(split_cfg or {})
    if split_mode(split) == "ratio":
        ratios = split.get("ratios", (0.8, 0.1, 0.1))
        if not isinstance(ratios, (list, tuple)) or len(ratios) != 3 or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                or r < 0 for r in ratios) or not sum(ratios) > 0:
            raise ValueError("data.split.ratios must be three numbers >= 0 (train, val, test "
                             f"proportions) with a sum > 0, got {ratios!r}")
    else:
        check_whole(split.get("n_folds", 5), "data.split.n_folds", 2)
        check_whole(split.get("fold", 0), "data.split.fold", 0, int(split.get("n_folds", 5)) - 1)
    check_whole(split.get("seed", 0), "data.split.seed", 0)
    check_whole(split.get("dedup_distance", 6), "data.split.dedup_distance", -1)


def split_identity(split_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `data.split` settings that decide the split: the other mode's keys (`n_folds` and
    `fold` in ratio mode, `ratios` in kfold mode) are left out, as `split_records` ignores
    them."""
    split = dict(split_cfg or {})
    unused = ("n_folds", "fold") if split_mode(split) == "ratio" else ("ratios",)
    return {k: v for k, v in split.items() if k not in unused}


def split_records(records: list[Record], hashes: list[int] | None,
                  split_cfg: dict[str, Any]) -> dict[str, list[Record]]:
    """`medseg_core.splits.split_records` driven by the `data.split` config."""
    kfold = split_mode(split_cfg) == "kfold"
    return core_split_records(
        records, hashes, ratios=tuple(split_cfg.get("ratios", (0.8, 0.1, 0.1))),
        n_folds=int(split_cfg["n_folds"]) if kfold else None, fold=int(split_cfg.get("fold", 0)),
        seed=int(split_cfg.get("seed", 0)), max_distance=int(split_cfg.get("dedup_distance", 6)))


def _checked_listing(cfg: dict[str, Any], check: bool | None
                     ) -> tuple[list[Record], list[int] | None, set[str]]:
    """Records, split hashes (dedup on) and the ids of records found bad but not dropped
    (checked with dedup off); problems recorded. See `load_records`."""
    data_cfg = cfg["data"]
    strict = bool(data_cfg.get("strict", True))
    dedup = int(data_cfg["split"].get("dedup_distance", 6)) >= 0
    so = storage_options(data_cfg)
    if is_packed(data_cfg):
        records, hashes, problems = list_packed(
            str(data_cfg["url"]), so, strict, data_cfg.get("class_names") or None,
            channels=int(data_cfg.get("channels", 3)), image_size=data_cfg.get("image_size"),
            mask_budget=packed_row_budget(_max_pixels(data_cfg), _max_bytes(data_cfg), 0),
            mask_threshold=int(data_cfg.get("mask_threshold", 127)))
        if strict and problems:  # left out when it was packed: strict means the same as raw
            p = problems[0]
            raise BadRecordError(f"{p.path}: {p.reason} (left out when the archive was packed; "
                                 "data.strict=true)")
        record_problems(cfg, problems)
        return records, (hashes if dedup else None), set()
    checking = dedup if check is None else check
    listing = list_archive(data_cfg, stamps=checking)
    problems = [Problem("listing", s.path, s.reason) for s in listing.skipped]
    records = listing.records
    hashes: list[int] | None = None
    bad_ids: set[str] = set()
    if checking:
        cache = f"{cfg['output_dir'].rstrip('/')}/cache" if cfg.get("output_dir") else None
        maybe, bad = checked_hashes(
            records, so, strict=strict, cache_dir=cache, cache_name=str(data_cfg["url"]),
            stamps=listing.stamps, max_pixels=_max_pixels(data_cfg),
            max_bytes=_max_bytes(data_cfg), threads=int(read_settings(data_cfg)["io_threads"]))
        problems += bad
        if dedup:  # a bad record has no hash to group it by: dropped before the split
            keep = [i for i, h in enumerate(maybe) if h is not None]
            records = [records[i] for i in keep]
            hashes = [int(maybe[i]) for i in keep]  # type: ignore[arg-type]
        else:
            bad_ids = {r.id for r, h in zip(records, maybe) if h is None}
    record_problems(cfg, problems)
    return records, hashes, bad_ids


def load_records(cfg: dict[str, Any], check: bool | None = None
                 ) -> tuple[list[Record], list[int] | None]:
    """The archive's usable records (and split hashes when dedup is on and they are checked);
    problems recorded.

    Raw archives are listed with their layout, then checked and hashed (`checked_hashes`,
    cached under output_dir/cache) when `check`, which defaults to what the splits need:
    dedup on. Unchecked, bad records are found where they are read. Packed archives give
    records and hashes from their manifest and Parquet shards (packing checked them).
    """
    records, hashes, bad = _checked_listing(cfg, check)
    return [r for r in records if r.id not in bad], hashes


def load_splits(cfg: dict[str, Any], check: bool = False) -> dict[str, list[Record]]:
    """List + check + split, driven by the composed Hydra config (`cfg["data"]`); `check`
    checks the records even when the splits do not need it (dedup off). Then the split is
    of the archive as listed, and the bad records leave their split after it: every reader
    of the archive, checked (the in-process trainer) or not (Ray tasks, evaluation), gets the
    same splits; dropped first, one bad file moved other records between splits."""
    return split_views(cfg, check)[0]


def split_views(cfg: dict[str, Any], check: bool = False
                ) -> tuple[dict[str, list[Record]], dict[str, list[Record]]]:
    """`load_splits`, and the same splits as listed: with the bad records that a check with
    dedup off found still in them, as unchecked readers (Ray's) split the archive."""
    records, hashes, bad = _checked_listing(cfg, True if check else None)
    listed = split_records(records, hashes, cfg["data"]["split"])
    return {name: [r for r in part if r.id not in bad] for name, part in listed.items()}, listed


# ----------------------------------------------------------------------------------------------
# Packed archives (written by pipelines/pack.py)


def _manifest_url(url: str) -> str:
    return f"{url.rstrip('/')}/{MANIFEST_NAME}"


def is_packed(data_cfg: Mapping[str, Any]) -> bool:
    """`layout: packed`, or a medseg pack manifest at the archive URL (detection)."""
    if data_cfg.get("layout") == "packed":
        return True
    try:
        fs, path = _fs(_manifest_url(str(data_cfg["url"])), storage_options(data_cfg))
        if not fs.exists(path):
            return False
        with fs.open(path, "r") as f:
            return json.load(f).get("format") == PACKED_FORMAT
    except (OSError, ValueError):
        return False


def packed_size(data_cfg: Mapping[str, Any]) -> list[int] | None:
    """[h, w] its images and masks were resized to where the archive is a pre-resized pack
    (`pack.resize_to`): scores on it are at that size, not the images' original one."""
    if not is_packed(data_cfg):
        return None
    resized = read_manifest(str(data_cfg["url"]), storage_options(data_cfg)).get("resize_to")
    return [int(v) for v in resized] if resized else None


def read_manifest(url: str, so: dict | None = None) -> dict[str, Any]:
    """The manifest of a packed archive (raises naming the URL when there is none)."""
    murl = _manifest_url(url)
    fs, path = _fs(murl, so)
    try:
        with fs.open(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise LayoutError(f"{murl}: no pack manifest (run pipelines/pack.py first)") from e
    if manifest.get("format") != PACKED_FORMAT:
        raise LayoutError(f"{murl}: not a medseg pack manifest")
    return manifest


def packed_uri(shard: str, row_group: int, row: int) -> str:
    """The record URI of row `row` of row group `row_group` of a packed shard."""
    return f"{shard}{PACKED_MARK}{row_group}&row={row}"


def parse_packed_uri(uri: str) -> tuple[str, int, int]:
    """(shard URI, row group, row within the group) of a packed record URI."""
    shard, _, rest = uri.rpartition(PACKED_MARK)
    rg, _, row = rest.partition("&row=")
    if not shard:
        raise ValueError(f"not a packed record URI: {uri}")
    return shard, int(rg), int(row)


def _check_columns_fit(pf: Any, shard: str, columns: Sequence[str] | None,
                       row_budget: int | None, row_groups: Sequence[int] | None = None) -> None:
    """Refuse, before decompressing them, row groups of a packed shard (`columns` of them, or
    whole with None) whose footer declares more uncompressed bytes than `row_budget` a row
    (ImageTooLargeError, bad input): a small shard could otherwise expand into gigabytes."""
    if row_budget is None:
        return
    md = pf.metadata
    index = [] if columns is None else [pf.schema_arrow.get_field_index(c) for c in columns]
    for rg in range(md.num_row_groups) if row_groups is None else row_groups:
        group = md.row_group(rg)
        if columns is None:
            size, what = group.total_byte_size, f"holds {group.total_byte_size} bytes uncompressed"
        else:
            size = sum(group.column(i).total_uncompressed_size for i in index if i >= 0)
            what = f"declares {size} bytes uncompressed in {', '.join(columns)}"
        if size > group.num_rows * row_budget:
            raise ImageTooLargeError(
                f"{shard}: row group {rg} {what} for {group.num_rows} row(s), over the limit of "
                f"{row_budget} a row (data.max_pixels, data.max_bytes)")


def _rows_with_masks(pf: Any, shard: str = "", mask_budget: int | None = None) -> list[bool]:
    """Which rows of a packed shard hold a mask (an images-only archive packs none), from each
    row group's null count in the footer; only a row group with and without masks is read
    (refused unread over `mask_budget` bytes a row)."""
    md = pf.metadata
    col = pf.schema_arrow.get_field_index("mask")
    out: list[bool] = []
    for rg in range(md.num_row_groups):
        n = md.row_group(rg).num_rows
        stats = md.row_group(rg).column(col).statistics
        nulls = stats.null_count if stats is not None and stats.has_null_count else None
        if nulls in (0, n):
            out += [nulls == 0] * n
        else:
            _check_columns_fit(pf, shard, ["mask"], mask_budget, [rg])
            out += pf.read_row_group(rg, columns=["mask"]).column("mask").is_valid().to_pylist()
    return out


def list_packed(url: str, so: dict | None = None, strict: bool = False,
                class_names: Sequence[str] | None = None, channels: int | None = None,
                image_size: Sequence[int] | None = None, mask_budget: int | None = None,
                mask_threshold: int | None = None
                ) -> tuple[list[Record], list[int], list[Problem]]:
    """Records, split hashes and problems of a packed archive, without decoding: those packing
    reported, and one per record of a shard that cannot be read (truncated, overwritten), which
    is left out (`strict`: raises naming the shard instead).

    Reads the manifest and only the id, label and phash columns of each shard. The labels
    index the manifest's class names: given `class_names` (what the reader will call them;
    None: no names, labels unused) must be the same list in the same order, or LayoutError;
    so must `channels` for raw arrays and `mask_threshold` for the original files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(url, so)
    packed_names = [str(c) for c in manifest.get("class_names") or []]
    # an empty list is a segmentation-only pack, which fits only a reader without class names
    if (class_names is not None and "class_names" in manifest
            and packed_names != [str(c) for c in class_names]):
        raise LayoutError(f"{_manifest_url(url)}: the pack's labels index class_names "
                          f"{packed_names}, but data.class_names is {list(class_names)}: set "
                          f"data.class_names={json.dumps(packed_names).replace(' ', '')} "
                          "(same order) so that the labels keep their meaning")
    if (channels is not None and manifest.get("encoding") == "raw"
            and int(manifest.get("channels", channels)) != int(channels)):
        # raw arrays cannot be decoded to another channel count: every row would be dropped
        raise LayoutError(f"{_manifest_url(url)}: the pack holds raw {manifest['channels']}-"
                          f"channel arrays, but data.channels is {channels}: set data.channels="
                          f"{manifest['channels']} or repack")
    packed_at = manifest.get("mask_threshold")
    if (mask_threshold is not None and packed_at is not None
            and manifest.get("encoding") == "file" and int(packed_at) != int(mask_threshold)):
        # a record's single mask file is stored as it was, so it would read as another mask
        # than the one packing checked (0/1 masks packed at 0 read empty at 127)
        raise LayoutError(f"{_manifest_url(url)}: the pack's masks were read at "
                          f"data.mask_threshold={packed_at}, but it is {mask_threshold} here: "
                          f"set data.mask_threshold={packed_at}, or repack")
    resized = manifest.get("resize_to")
    if resized and image_size is not None and [int(v) for v in resized] != \
            [int(v) for v in image_size]:
        warnings.warn(f"{_manifest_url(url)}: the pack was resized to {resized} and is read at "
                      f"data.image_size={list(image_size)}: every row is resized a second time",
                      stacklevel=2)
    records: list[Record] = []
    hashes: list[int] = []
    lost: list[Problem] = []
    for shard in manifest["shards"]:
        shard_uri = f"{url.rstrip('/')}/{shard['path']}"
        fs, path = _fs(shard_uri, so)
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                _check_columns_fit(pf, shard_uri, ["id", "label", "phash"],
                                   None if mask_budget is None else 65536)  # ids, numbers
                table = pf.read(columns=["id", "label", "phash"])
                masked = _rows_with_masks(pf, shard_uri, mask_budget)
        except (*BAD_INPUT_ERRORS, pa.ArrowInvalid, OSError) as e:
            if not (isinstance(e, BAD_INPUT_ERRORS) or corrupt_parquet(e)):
                raise  # the storage failed (network, permissions), not the shard's bytes
            if strict:
                raise BadRecordError(f"{shard_uri}: unreadable packed shard: "
                                     f"{_reason(e, path)} (data.strict=true)") from e
            reason = f"unreadable packed shard: {_reason(e, path)}"
            lost += [Problem("listing", f"{shard_uri} (row group {rg}, row {r})", reason)
                     for rg, n in enumerate(shard["row_groups"]) for r in range(n)]
            continue
        ids = table.column("id").to_pylist()
        labels = table.column("label").to_pylist()
        ph = table.column("phash").to_pylist()
        row = 0
        for rg, n in enumerate(shard["row_groups"]):
            for r in range(n):
                uri = packed_uri(shard_uri, rg, r)
                # mask_uris: the row itself where it holds a mask, as a raw record names its files
                records.append(Record(ids[row], uri, (uri,) if masked[row] else (),
                                      int(labels[row])))
                hashes.append(int(ph[row]))
                row += 1
    problems = [Problem("pack", s["path"], s["reason"], s.get("id"))
                for s in manifest.get("skipped", [])]
    return records, hashes, problems + lost


# ----------------------------------------------------------------------------------------------
# Ray Data: records -> decoded, transformed rows


@functools.cache
def _read_defaults() -> dict[str, Any]:
    import yaml

    from pipelines import CONF_DIR

    with open(os.path.join(CONF_DIR, "data_read", "default.yaml")) as f:
        return dict(yaml.safe_load(f))


def read_settings(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`data.read`, completed from pipelines/conf/data_read/default.yaml (configs built by
    hand) and checked: ValueError naming the setting (before any archive is listed)."""
    read = {**_read_defaults(), **(data_cfg.get("read") or {})}
    for key in ("batch_size", "packed_batch_size", "io_threads"):
        check_whole(read[key], f"data.read.{key}", 1)
    check_whole(read["concurrency"], "data.read.concurrency", 1, none=True)
    check_number(read["num_cpus"], "data.read.num_cpus", 0, strict=True)
    check_number(read["read_ahead"], "data.read.read_ahead", 0, strict=True, none=True)
    return read


def check_decode_settings(data: Mapping[str, Any]) -> None:
    """`data.channels`, `max_bytes`, `max_pixels`, `mask_threshold` and `epoch_offset`, which
    every read of the archive goes by: refused before anything is listed or replaced
    (`max_bytes=0` dropped every file as bad input and packed an empty archive over a good
    pack; `mask_threshold=300` decoded every mask empty; `channels=2` failed in the read
    tasks, after a repack had removed the old manifest)."""
    channels = data.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    check_whole(data.get("max_bytes", DEFAULT_MAX_BYTES), "data.max_bytes", 1, none=True)
    check_whole(data.get("max_pixels", DEFAULT_MAX_PIXELS), "data.max_pixels", 1, none=True)
    check_whole(data.get("mask_threshold", 127), "data.mask_threshold", 0, 254)
    check_whole(data.get("epoch_offset", 0), "data.epoch_offset", 0)


def _max_pixels(data_cfg: Mapping[str, Any]) -> int | None:
    v = data_cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    return None if v is None else int(v)


def _max_bytes(data_cfg: Mapping[str, Any]) -> int | None:
    v = data_cfg.get("max_bytes", DEFAULT_MAX_BYTES)
    return None if v is None else int(v)


@dataclass(frozen=True)
class DecodeSpec:
    """Everything a read+decode task needs (pickled into the map function's kwargs)."""

    image_size: tuple[int, int]
    channels: int
    augment: dict[str, Any] | None   # None: resize only
    seed: int
    split: str
    strict: bool
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_bytes: int | None = DEFAULT_MAX_BYTES
    threshold: int = 127
    storage_options: dict | None = None
    credentials: EnvCredentials | None = None
    ledger: Any = None
    epoch_offset: int = 0
    base_execution_idx: int = 0
    io_threads: int = 8
    shuffle_rows: bool = False

    def transform(self):
        aug = dict(self.augment or {})
        return build_transforms({"size": list(self.image_size), **aug}, train=bool(aug))


def _finish(spec: DecodeSpec, samples: list[dict[str, Any]]) -> dict[str, np.ndarray] | Any:
    h, w = spec.image_size
    if not samples:
        # An all-bad batch: an empty block with the tensor types of the others (a dict of empty
        # arrays would fall back to pickled objects in Ray's Arrow conversion).
        import pyarrow as pa
        from ray.data.extensions.tensor_extension import ArrowTensorArray

        return pa.table({
            "image": ArrowTensorArray.from_numpy(np.zeros((0, h, w, spec.channels), np.uint8)),
            "mask": ArrowTensorArray.from_numpy(np.zeros((0, h, w), np.uint8)),
            "label": pa.array([], pa.int64())})
    return {"image": np.stack([s["image"] for s in samples]),
            "mask": np.stack([s["mask"] for s in samples]),
            "label": np.array([int(s["label"]) for s in samples], dtype=np.int64)}


def _apply(spec: DecodeSpec, transform, sample: dict[str, Any], epoch: int | None) -> dict:
    rng = sample_rng(spec.seed, int(epoch or 0), sample["id"]) if spec.augment else None
    out = transform(sample, rng)
    out["image"] = to_channels(out["image"], spec.channels)  # a grey plane (keep_grey) repeated
    h, w = spec.image_size
    if out["image"].shape != (h, w, spec.channels) or out["mask"].shape != (h, w):
        raise RuntimeError(f"{sample['id']}: transforms gave image {out['image'].shape} and "
                           f"mask {out['mask'].shape}, expected {(h, w, spec.channels)}")
    return out


def decode_raw_batch(batch: Mapping[str, Sequence[Any]], spec: DecodeSpec,
                     epoch: int | None = None) -> dict[str, np.ndarray] | Any:
    """Read all files of a batch of raw records, decode, transform (augmentation `epoch`)."""
    recs = [Record(str(i), str(u), tuple(str(m) for m in (ms if ms is not None else ())), int(lab))
            for i, u, ms, lab in zip(batch["id"], batch["image_uri"], batch["mask_uris"],
                                     batch["label"])]
    data = fetch_many([u for r in recs for u in (r.image_uri, *r.mask_uris)],
                      spec.storage_options, spec.credentials, spec.io_threads, spec.max_bytes)
    transform = spec.transform()
    samples, problems = [], []
    for rec in recs:
        try:
            blobs = record_bytes(rec, data)
            sample = decode_record(rec, blobs[0], blobs[1:], channels=spec.channels,
                                   max_pixels=spec.max_pixels, threshold=spec.threshold,
                                   keep_grey=True)
            samples.append(_apply(spec, transform, sample, epoch))
        except BAD_INPUT_ERRORS as e:
            problems.append(Problem.of("decode", e, rec, spec.split))
    _settle(problems, spec.strict, spec.ledger)
    return _finish(spec, samples)


def blamed_path(e: BaseException, rec: Record) -> str:
    """The file of `rec` an error message starts with (its image when none)."""
    msg = str(e)
    for u in (*rec.mask_uris, rec.image_uri):
        if msg.startswith(f"{u}: "):
            return u
    return rec.image_uri


def packed_row_budget(max_pixels: int | None, max_bytes: int | None,
                      channels: int) -> int | None:
    """The most uncompressed bytes a packed row may hold: an encoded image and mask file of
    up to `max_bytes` each, or raw image and mask planes of `max_pixels` (None: no limit).
    `channels=0`: the mask alone."""
    if max_pixels is None or max_bytes is None:
        return None
    files = 2 if channels else 1
    return max(files * max_bytes, max_pixels * (channels + 1)) + 65536  # + id, source, ...


def _read_row_group(shard: str, row_group: int, columns: list[str], so: dict | None,
                    env: EnvCredentials | None, row_budget: int | None = None):
    """One row group of a packed shard, refused unread over `row_budget` bytes a row
    (`_check_columns_fit`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(f: Any):
        pf = pq.ParquetFile(f)
        _check_columns_fit(pf, shard, None, row_budget, [row_group])
        return pf.read_row_group(row_group, columns=columns)

    fs, path = _fs(shard, so, env)
    try:
        if is_local(fs):
            return read(path)
        with fs.open(path, "rb") as f:
            return read(f)
    except FileNotFoundError as e:  # s3fs's message was the bare key
        raise LayoutError(f"{shard}: shard not found: the pack was rewritten or removed since "
                          "it was listed (rerun once a repack has finished)") from e
    except (pa.ArrowInvalid, OSError) as e:
        if not corrupt_parquet(e):
            raise
        # rewritten, truncated or corrupted since listing: bad input, named
        raise LayoutError(f"{shard}: row group {row_group} unreadable: {_reason(e, shard)}") from e


def corrupt_parquet(e: BaseException) -> bool:
    """Whether pyarrow rejected a Parquet file's bytes: `ArrowInvalid`, or a bare `OSError`
    without errno ("Couldn't deserialize thrift" of a corrupt footer). Failures of the storage
    itself keep their own type or errno (the OS, fsspec, s3fs) and are not bad input."""
    import pyarrow as pa

    return isinstance(e, pa.ArrowInvalid) or (type(e) is OSError and e.errno is None)


PACKED_COLUMNS = ["id", "image", "mask", "label", "source", "encoding", "shape"]

# load_any_record reads one row at a time (in-process training and evaluation); without this
# small per-process cache every row of a row group would read and parse the whole group again
# (keyed by path: packed shards are written once and never rewritten in place).
_ROW_GROUP_CACHE: collections.OrderedDict = collections.OrderedDict()
_ROW_GROUP_CACHE_SIZE = 8
_ROW_GROUP_LOCK = threading.Lock()


def _cached_row_group(shard: str, row_group: int, so: dict | None, row_budget: int | None):
    key = (shard, row_group, row_budget)  # a group read under looser limits is read again
    with _ROW_GROUP_LOCK:
        if key in _ROW_GROUP_CACHE:
            _ROW_GROUP_CACHE.move_to_end(key)
            return _ROW_GROUP_CACHE[key]
    table = _read_row_group(shard, row_group, PACKED_COLUMNS, so, None, row_budget)
    with _ROW_GROUP_LOCK:
        _ROW_GROUP_CACHE[key] = table
        while len(_ROW_GROUP_CACHE) > _ROW_GROUP_CACHE_SIZE:
            _ROW_GROUP_CACHE.popitem(last=False)
    return table


def decode_packed_row(row: Mapping[str, Any], *, channels: int = 3,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS, threshold: int = 127,
                      keep_grey: bool = False) -> dict:
    """One packed row -> {"id", "image", "mask", "label"} (same decoding as a raw record;
    ``keep_grey``: see ``medseg_core.io.decode_image``)."""
    source = str(row["source"])
    enc = row["encoding"]
    if enc == "raw":
        h, w, c = (int(v) for v in row["shape"])
        if h <= 0 or w <= 0:
            raise ImageDecodeError(f"{source}: packed raw image has an empty size {w}x{h}")
        if max_pixels is not None and h * w > max_pixels:
            raise ImageTooLargeError(f"{source}: packed raw image is {w}x{h} = {h * w} pixels, "
                                     f"over the limit of {max_pixels}")
        for key, size in (("image", h * w * c), ("mask", h * w)):
            if row[key] is not None and len(row[key]) != size:
                raise LayoutError(f"{source}: packed raw {key} has {len(row[key])} bytes, "
                                  f"not {size} for shape {[h, w, c]}")
        image = np.frombuffer(row["image"], np.uint8).reshape(h, w, c)
        if c != channels:
            raise LayoutError(f"{source}: packed raw image has {c} channels, not {channels}")
        mask = (np.zeros((h, w), np.uint8) if row["mask"] is None
                else np.frombuffer(row["mask"], np.uint8).reshape(h, w))
        return {"id": str(row["id"]), "image": image.copy(), "mask": mask.copy(),
                "label": int(row["label"])}
    masks = () if row["mask"] is None else (f"{source} (packed mask)",)
    rec = Record(str(row["id"]), source, masks, int(row["label"]))
    return decode_record(rec, row["image"], [row["mask"]] if masks else [], channels=channels,
                         max_pixels=max_pixels, threshold=threshold, keep_grey=keep_grey)


def decode_packed_batch(batch: Mapping[str, Sequence[Any]], spec: DecodeSpec,
                        epoch: int | None = None) -> dict[str, np.ndarray] | Any:
    """Read each packed row group of the batch once, decode and transform the wanted rows."""
    transform = spec.transform()
    samples, problems = [], []
    for shard, rg, rows in zip(batch["shard"], batch["row_group"], batch["rows"]):
        shard, rg = str(shard), int(rg)
        wanted = [int(r) for r in rows]
        if spec.shuffle_rows and epoch is not None:
            wanted = [wanted[i] for i in sample_rng(spec.seed, epoch, f"{shard}#{rg}")
                      .permutation(len(wanted))]
        try:
            table = _read_row_group(shard, rg, PACKED_COLUMNS, spec.storage_options,
                                    spec.credentials, packed_row_budget(
                                        spec.max_pixels, spec.max_bytes, spec.channels))
        except BAD_INPUT_ERRORS as e:  # every wanted row of the group is lost: one problem each
            reason = _reason(e, shard)
            problems += [Problem("decode", f"{shard} (row group {rg}, row {r})", reason, None,
                                 spec.split) for r in wanted]
            continue
        cols = {c: table.column(c) for c in PACKED_COLUMNS}
        for r in wanted:
            row = {c: cols[c][r].as_py() for c in PACKED_COLUMNS}
            try:
                sample = decode_packed_row(row, channels=spec.channels, keep_grey=True,
                                           max_pixels=spec.max_pixels, threshold=spec.threshold)
                samples.append(_apply(spec, transform, sample, epoch))
            except BAD_INPUT_ERRORS as e:
                where = f"{row['source']} (packed in {shard}, row group {rg}, row {r})"
                problems.append(Problem("decode", where, _reason(e, str(row["source"])),
                                        str(row["id"]), spec.split))
    _settle(problems, spec.strict, spec.ledger)
    return _finish(spec, samples)


def read_chunk(kind: str, chunk: list[dict[str, Any]], spec: DecodeSpec,
               epoch: int | None) -> list[Any]:
    """One Ray read task: a chunk of raw records or packed row groups -> one decoded block."""
    from ray.data.block import BlockAccessor

    if kind == "packed":
        out = decode_packed_batch({"shard": [c["shard"] for c in chunk],
                                   "row_group": [c["row_group"] for c in chunk],
                                   "rows": [c["rows"] for c in chunk]}, spec, epoch)
    else:
        out = decode_raw_batch({"id": [c["id"] for c in chunk],
                                "image_uri": [c["image_uri"] for c in chunk],
                                "mask_uris": [c["mask_uris"] for c in chunk],
                                "label": [c["label"] for c in chunk]}, spec, epoch)
    return [BlockAccessor.batch_to_block(out) if isinstance(out, dict) else out]


def _make_records_datasource() -> type:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class RecordsDatasource(Datasource):
        """The records of one split as a Ray Data source whose read tasks read, decode and
        transform `per_task` records (or packed row groups) each.

        `get_read_tasks` runs when an execution of the Dataset starts, in the process that
        executes it (the driver, or the SplitCoordinator actor behind Ray Train's dataset
        shards), with that execution's DataContext: that is where the epoch is fixed (pinned, or
        `epoch_offset` + the Dataset's execution count) and the records are shuffled for it;
        every read task gets the epoch as a plain argument.
        """

        def __init__(self, items: list[dict[str, Any]], kind: str, spec: DecodeSpec,
                     per_task: int, shuffle: bool, seed: int, epoch: int | None,
                     row_bytes: int, n_rows: int):
            super().__init__()
            self.items, self.kind, self.spec = items, kind, spec
            self.per_task, self.shuffle, self.seed = per_task, shuffle, seed
            self.epoch, self.row_bytes, self.n_rows = epoch, row_bytes, n_rows
            self.base_execution_idx = 0

        def get_name(self) -> str:
            return "MedsegRecords"

        def estimate_inmemory_data_size(self) -> int | None:
            return self.n_rows * self.row_bytes

        def epoch_for(self, data_context: Any) -> int | None:
            if self.epoch is not None:
                return int(self.epoch)
            if not (self.spec.augment or self.shuffle):
                return None
            if data_context is None:  # Ray asks for metadata only (no execution)
                return self.spec.epoch_offset
            idx = getattr(data_context, "_execution_idx", None)
            if idx is None:  # a Ray without the counter: reproducible, but the same every pass
                warnings.warn("DataContext has no _execution_idx: the augmentation epoch stays "
                              "at data.epoch_offset (pin epochs with train_epoch_dataset)",
                              stacklevel=2)
                idx = self.base_execution_idx
            return self.spec.epoch_offset + int(idx) - self.base_execution_idx

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            epoch = self.epoch_for(data_context)
            items = self.items
            if self.shuffle and epoch is not None:
                order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(items))
                items = [items[i] for i in order]
            tasks = []
            for start in range(0, len(items), self.per_task):
                chunk = items[start:start + self.per_task]
                rows = sum(len(c["rows"]) for c in chunk) if self.kind == "packed" else len(chunk)
                # num_rows unknown: bad records may be dropped, so no count() from metadata
                meta = BlockMetadata(num_rows=None, size_bytes=rows * self.row_bytes,
                                     exec_stats=None, input_files=None)
                tasks.append(ReadTask(functools.partial(read_chunk, self.kind, chunk, self.spec,
                                                        epoch), meta))
            return tasks

    RecordsDatasource.__module__ = __name__
    RecordsDatasource.__qualname__ = "RecordsDatasource"
    return RecordsDatasource


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """`RecordsDatasource` is created on first use, so importing this module does not import
    Ray; it is still importable by name (how Ray pickles it into the processes that execute
    a Dataset)."""
    if name == "RecordsDatasource":
        if name not in _LAZY:
            _LAZY[name] = _make_records_datasource()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class _Pipeline:
    """How a Dataset of build_datasets was made, so train_epoch_dataset can rebuild it."""

    records: list[Record]
    cfg: dict[str, Any]
    split: str
    train: bool
    ledger: Any


_PIPELINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spec(cfg: dict[str, Any], split: str, train: bool, ledger: Any,
          credentials: EnvCredentials | None = None) -> DecodeSpec:
    data = cfg["data"]
    gpu_aug = bool((cfg.get("trainer") or {}).get("gpu_augment", False))
    aug = dict(data.get("augment") or {}) if (train and not gpu_aug) else None
    url = str(data["url"])
    return DecodeSpec(
        image_size=tuple(int(v) for v in data["image_size"]),  # type: ignore[arg-type]
        channels=int(data.get("channels", 3)), augment=aug or None,
        seed=int(cfg.get("seed", 0)), split=split, strict=bool(data.get("strict", False)),
        max_pixels=_max_pixels(data), max_bytes=_max_bytes(data),
        threshold=int(data.get("mask_threshold", 127)), storage_options=storage_options(data),
        credentials=credentials or task_credentials(data, url),
        ledger=ledger, epoch_offset=int(data.get("epoch_offset", 0)),
        io_threads=int(read_settings(data)["io_threads"]),
        shuffle_rows=bool(train and data.get("shuffle", False)),
    )


def _packed_items(records: Sequence[Record]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[int]] = {}
    for r in records:
        shard, rg, row = parse_packed_uri(r.image_uri)
        groups.setdefault((shard, rg), []).append(row)
    return [{"shard": s, "row_group": g, "rows": sorted(rows)}
            for (s, g), rows in sorted(groups.items())]


def _per_task(n_items: int, per_task: int, task_cpus: float) -> int:
    """`per_task`, or fewer where that would leave some of the cluster's task slots without
    a task (a small split on a large cluster)."""
    import ray

    from pipelines.cluster import task_slots

    if not ray.is_initialized():
        return per_task
    return max(1, min(per_task, math.ceil(n_items / task_slots(task_cpus))))


def _set_backpressure(ds: Dataset, read_ahead: float | None) -> None:
    """medseg's read-ahead cap (pipelines/backpressure.py), or Ray Data's own per-operator
    budgets where `read_ahead` is null or this Ray lacks the (internal) policy interface."""
    if read_ahead is not None:
        try:
            from pipelines.backpressure import cap_read_ahead
        except ImportError as e:
            warnings.warn(f"data.read.read_ahead needs Ray Data's backpressure-policy interface "
                          f"({e}); using Ray Data's own budgets", stacklevel=3)
        else:
            cap_read_ahead(ds.context, float(read_ahead))
            return
    ds.context.op_resource_reservation_enabled = True


def _set_progress(ds: Dataset, mode: str) -> None:
    """How `ds` shows its progress wherever it runs (`data.read.progress`, resolved by the entry
    point): Ray's bars, or (`log`) Ray Data's periodic log lines, which it writes wherever
    stdout is not a terminal unless told to draw bars through the driver (`use_ray_tqdm`)."""
    if mode == "off":
        ds.context.enable_progress_bars = False
    elif mode == "log":
        ds.context.use_ray_tqdm = False


def build_dataset(records: Sequence[Record], cfg: dict[str, Any], *, split: str = "train",
                  train: bool | None = None, epoch: int | None = None,
                  ledger: Any = None, credentials: EnvCredentials | None = None) -> Dataset:
    """One split as a Ray Dataset of {image, mask, label} rows (see the module docstring).

    `train` (default: split name starts with "train") turns on augmentation (unless
    trainer.gpu_augment) and data.shuffle. `epoch` pins the augmentation epoch; None derives it
    from the execution count of the returned Dataset. `credentials`: those to hand the read
    tasks, captured earlier (default: this process's, per `data.forward_credentials`).
    """
    import ray
    from ray.data import TaskPoolStrategy

    data = cfg["data"]
    train = split.startswith("train") if train is None else train
    records = list(records)
    if ledger is None:
        ledger = problem_ledger(cfg)
    read = read_settings(data)
    spec = _spec(cfg, split, train, ledger, credentials)
    if records and PACKED_MARK in records[0].image_uri:
        kind, items = "packed", _packed_items(records)
        per_task = int(read["packed_batch_size"])
    else:
        kind, items = "raw", [r.to_dict() for r in records]
        per_task = int(read["batch_size"])
    per_task = _per_task(len(items), per_task, float(read["num_cpus"]))
    h, w = spec.image_size
    source = __getattr__("RecordsDatasource")(
        items, kind, spec, per_task, shuffle=bool(train and data.get("shuffle", False)),
        seed=int(cfg.get("seed", 0)), epoch=epoch, row_bytes=h * w * (spec.channels + 1) + 8,
        n_rows=len(records))
    concurrency = read.get("concurrency")
    ds = ray.data.read_datasource(
        source, override_num_blocks=max(1, math.ceil(len(items) / per_task)),
        num_cpus=float(read["num_cpus"]),
        compute=TaskPoolStrategy(size=int(concurrency)) if concurrency else None)
    _set_backpressure(ds, read["read_ahead"])
    _set_progress(ds, str(read["progress"]))
    source.base_execution_idx = int(getattr(ds.context, "_execution_idx", 0))
    _PIPELINES[ds] = _Pipeline(records, cfg, split, train, ledger)
    return ds


def build_datasets(cfg: dict[str, Any],
                   splits: dict[str, list[Record]] | None = None) -> dict[str, Dataset]:
    """A Ray Dataset per split (train/val/test, or any names: those starting with "train" are
    training splits). Rows: image uint8 (H, W, C) at data.image_size, mask uint8 (H, W) in
    {0, 1}, label int64; no string columns, so `iter_torch_batches` works as is.
    """
    if splits is None:
        splits = load_splits(cfg)
    ledger = problem_ledger(cfg)
    return {name: build_dataset(recs, cfg, split=name, ledger=ledger)
            for name, recs in splits.items()}


def train_epoch_dataset(ds: Dataset, epoch: int, cfg: dict[str, Any] | None = None) -> Dataset:
    """The same split as `ds` (a Dataset from build_dataset(s)) with augmentation and shuffle
    pinned to `epoch`, for loops that own their epoch number (in-process loops, benchmarks,
    workers that build their own pipelines). `cfg` overrides the config `ds` was built with.
    """
    pipe = _PIPELINES.get(ds)
    if pipe is None:
        raise TypeError("train_epoch_dataset needs a Dataset returned by build_dataset(s)")
    return build_dataset(pipe.records, cfg or pipe.cfg, split=pipe.split, train=pipe.train,
                         epoch=int(epoch), ledger=pipe.ledger)


def load_any_record(record: Record, cfg: Mapping[str, Any], keep_grey: bool = False
                    ) -> dict[str, Any]:
    """In-process loading of a raw or packed record (decoded, not transformed; ``keep_grey``:
    see ``medseg_core.io.decode_image``)."""
    data = cfg.get("data", cfg)
    so = storage_options(data)
    threshold = int(data.get("mask_threshold", 127))
    if PACKED_MARK in record.image_uri:
        shard, rg, row = parse_packed_uri(record.image_uri)
        table = _cached_row_group(shard, rg, so, packed_row_budget(
            _max_pixels(data), _max_bytes(data), int(data.get("channels", 3))))
        values = {c: table.column(c)[row].as_py() for c in PACKED_COLUMNS}
        return decode_packed_row(values, channels=int(data.get("channels", 3)),
                                 max_pixels=_max_pixels(data), threshold=threshold,
                                 keep_grey=keep_grey)
    blobs = record_bytes(record, fetch_many([record.image_uri, *record.mask_uris], so,
                                            max_bytes=_max_bytes(data)))
    return decode_record(record, blobs[0], blobs[1:],
                         channels=int(data.get("channels", 3)), max_pixels=_max_pixels(data),
                         threshold=threshold, keep_grey=keep_grey)
