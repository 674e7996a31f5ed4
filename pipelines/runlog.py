"""Where a training run leaves its files, locally or on object storage:

    <output_dir>/runs/<run_name>/<stage>/
        latest/  best/     model bundles (medseg_core.checkpoint)
        metrics.csv        one row per epoch, rewritten from the bundle's history (idempotent)
    <output_dir>/runs/<run_name>/.run.lock   while a training run holds the run (RunLock)
        curves.png         training curves
        tb/                TensorBoard event files
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from medseg_core.checkpoint import METRICS_FILE, TRAIN_STATE_FILE, VERSION_FILE
from medseg_core.io import remove_path
from medseg_core.viz import plot_curves, save_png

CURVE_KEYS = ("train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy", "val_macro_f1")


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with '/'."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


STAGED, ASIDE = ".new", ".old"  # siblings of a bundle directory while `copy_dir` replaces it


def _has_version(fs: Any, path: str) -> bool:
    return fs.exists(f"{path}/{VERSION_FILE}")


def _put(fs: Any, src: str, path: str, names: list[str]) -> None:
    fs.makedirs(path, exist_ok=True)
    for name in names:
        fs.put_file(os.path.join(src, name), f"{path}/{name}")


def _remove_others(fs: Any, path: str, keep: list[str]) -> None:
    """Delete the files of `path` not named in `keep` (left from an earlier bundle)."""
    for entry in fs.ls(path, detail=False) if fs.exists(path) else []:
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            remove_path(fs, entry, recursive=True)


def copy_dir(src: str, dst: str, exclude: tuple[str, ...] = ()) -> None:
    """Replace the bundle at `dst` by the local directory `src` (less the names in `exclude`),
    so that a kill at any moment leaves a complete bundle at `dst` or beside it, where
    `recover_dir` finds it.

    Locally the new bundle is written to `<dst>.new`, the old one renamed to `<dst>.old`, the
    new one renamed into place and the old one deleted (a directory cannot be os.replace'd
    onto a non-empty one). Object stores have no rename: the new bundle is uploaded to
    `<dst>.new` (version last), then over `dst` with its `version` removed first and written
    last, then `<dst>.new` deleted. Remaining window there: while `dst` is rewritten it has no
    `version`, so a reader that does not go through `recover_dir` (serving `best/`, say) finds
    no bundle for that moment (never a `version` over a mix of two bundles).
    """
    recover_dir(dst)  # an earlier kill may have left the only complete copy beside it
    fs, path = fsspec.core.url_to_fs(dst)
    path = path.rstrip("/")
    names = sorted((n for n in os.listdir(src) if n not in exclude),
                   key=lambda n: n == VERSION_FILE)
    staged = path + STAGED
    if fs.exists(staged):
        remove_path(fs, staged, recursive=True)
    _put(fs, src, staged, names)
    if isinstance(fs, LocalFileSystem):
        aside = path + ASIDE
        if os.path.exists(path):
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
        os.rename(staged, path)
        shutil.rmtree(aside, ignore_errors=True)
        return
    if _has_version(fs, path):
        remove_path(fs, f"{path}/{VERSION_FILE}")
    _remove_others(fs, path, names)
    _put(fs, src, path, names)
    remove_path(fs, staged, recursive=True)


def complete_dir(dst: str) -> str | None:
    """Where the complete bundle of `dst` lies, without moving anything: `dst`, or the copy
    beside it that `recover_dir` would put back; None for none. For readers that may not hold
    the run's lock (`recover_dir` renames under a running writer)."""
    fs, path = fsspec.core.url_to_fs(dst)
    path = path.rstrip("/")
    found = next((p for p in (path, path + STAGED, path + ASIDE) if _has_version(fs, p)), None)
    return None if found is None else dst.rstrip("/") + found[len(path):]


def recover_dir(dst: str) -> bool:
    """Put back the bundle that a kill inside `copy_dir` left only beside `dst` (the new one in
    `<dst>.new`, else the old one in `<dst>.old`); True when `dst` then holds a bundle."""
    fs, path = fsspec.core.url_to_fs(dst)
    path = path.rstrip("/")
    if _has_version(fs, path):
        return True
    found = next((p for p in (path + STAGED, path + ASIDE) if _has_version(fs, p)), None)
    if found is None:
        return False
    if isinstance(fs, LocalFileSystem):
        shutil.rmtree(path, ignore_errors=True)
        os.rename(found, path)
        for other in (path + STAGED, path + ASIDE):
            shutil.rmtree(other, ignore_errors=True)
        return True
    names = sorted((e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(found, detail=False)),
                   key=lambda n: n == VERSION_FILE)
    _remove_others(fs, path, names)
    for name in names:
        fs.cp_file(f"{found}/{name}", f"{path}/{name}")
    remove_path(fs, found, recursive=True)
    return True


SPLITS_FILE = "splits.json"  # in the run directory: which records each split held


LOCK_FILE = ".run.lock"  # in the run directory while a training run holds it
LOCK_BEAT_S = 20.0      # how often the holder rewrites its lock
LOCK_STALE_S = 90.0     # a lock not rewritten for this long is a dead run's


class RunLock:
    """One training run per run directory at a time. Two runs under one run_name used to
    train side by side, each resuming from and overwriting the other's bundles, logs and
    TensorBoard series, and both ended "successfully".

    The holder writes `<run>/.run.lock` (host, pid, start) and rewrites it every LOCK_BEAT_S
    from a thread. A lock counts as held while it was rewritten within LOCK_STALE_S and, on
    this host, while its process lives: a run killed here can be rerun at once, one killed on
    another machine after LOCK_STALE_S."""

    def __init__(self, run_dir: str) -> None:
        self.url = join(run_dir, LOCK_FILE)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.invalidate_cache()
        try:
            return json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None

    def _content(self, started: float) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": started, "beat": time.time()}).encode()

    def _write(self, started: float) -> None:
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, self._content(started))

    def _create(self, started: float) -> bool:
        """Write the lock where there is none; False where another start wrote one first. On
        a local disk the file is created exclusively (two starts at the same instant both
        found no lock, both wrote theirs and both trained); object stores have no such
        create, and the read-back in `acquire` stands in for it."""
        fs, path = fsspec.core.url_to_fs(self.url)
        if not isinstance(fs, LocalFileSystem):
            self._write(started)
            return True
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._content(started))
        return True

    @staticmethod
    def held(lock: dict[str, Any] | None, now: float | None = None) -> bool:
        """Whether `lock` (as read from the file) belongs to a run that is still going."""
        if not lock:
            return False
        if (now or time.time()) - float(lock.get("beat", 0)) > LOCK_STALE_S:
            return False
        if lock.get("host") == socket.gethostname():
            try:
                os.kill(int(lock.get("pid", 0)), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, OverflowError):
                pass
        return True

    def acquire(self, run_name: str) -> None:
        started = time.time()
        lock = self._read()
        if lock is None:
            if not self._create(started):  # another start created it first
                self._refuse(run_name, self._read())
        elif self.held(lock) and lock.get("token") != self.token:
            self._refuse(run_name, lock)
        else:
            self._write(started)  # a dead run's lock: taken over
        mine = self._read()  # another writer may have come between
        if mine is None or mine.get("token") != self.token:
            self._refuse(run_name, mine)
        self._thread = threading.Thread(target=self._beat, args=(started,), daemon=True,
                                        name="medseg-run-lock")
        self._thread.start()

    def _refuse(self, run_name: str, lock: dict[str, Any] | None) -> None:
        if lock is None:
            raise RuntimeError(f"run {run_name!r}: its lock {self.url} changed hands while this "
                               "start took it (another start at the same moment): try again")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lock["started"])))
        raise RuntimeError(
            f"run {run_name!r} is being trained by another process ({lock.get('host')}, pid "
            f"{lock.get('pid')}, since {since}; its lock {self.url} was renewed "
            f"{time.time() - float(lock['beat']):.0f} s ago): two runs under one run_name "
            "would resume from and overwrite each other's bundles and logs. Wait for it, "
            f"or use another run_name; a lock not renewed for {LOCK_STALE_S:.0f} s is "
            "taken over")

    def _beat(self, started: float) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            try:
                self._write(started)
            except Exception:  # a storage hiccup: the next beat tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        lock = self._read()
        if lock and lock.get("token") == self.token:
            fs, path = fsspec.core.url_to_fs(self.url)
            remove_path(fs, path)


def split_digest(ids: list[str]) -> dict[str, Any]:
    """One split's record count and the SHA-256 of its sorted record ids."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    return {"count": len(ids), "sha256": digest}


def record_splits(run_dir: str, ids: dict[str, list[str]], replace: bool = False) -> list[str]:
    """Write the run's `splits.json` at its first start (or with `replace`: no bundle of the
    run was trained on the recorded splits yet); on a rerun return the names of the splits
    that now hold other records than the run's first start recorded."""
    url = join(run_dir, SPLITS_FILE)
    digests = {name: split_digest(v) for name, v in ids.items()}
    recorded = None if replace else read_splits(run_dir)
    if recorded is None:
        fs, path = fsspec.core.url_to_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps(digests, indent=1).encode())
        return []
    return sorted(k for k in set(recorded) | set(digests) if recorded.get(k) != digests.get(k))


def read_splits(run_dir: str, storage_options: dict[str, Any] | None = None
                ) -> dict[str, dict[str, Any]] | None:
    """The run's recorded split digests (`record_splits`), None where it has none."""
    fs, path = fsspec.core.url_to_fs(join(run_dir, SPLITS_FILE), **(storage_options or {}))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def next_epoch(train_state: dict[str, Any]) -> int:
    """The epoch after the one a bundle's `train_state` was saved at (0 for none)."""
    return int(train_state.get("epoch", -1)) + 1


def stays_stopped(train_state: dict[str, Any], patience: int) -> bool:
    """Whether a stage that stopped early at `train_state` stops there under `patience` too
    (a larger patience, or 0 = off, would have gone on: a rerun goes on)."""
    return (bool(train_state.get("stopped_early")) and patience > 0
            and int(train_state.get("stale", 0)) >= patience)


def finished(train_state: dict[str, Any], epochs: int, patience: int) -> bool:
    """Whether a stage at `train_state` has nothing left to train for `epochs` under early
    stopping `patience` (done, or stopped early for good); False for none."""
    return bool(train_state) and (stays_stopped(train_state, patience)
                                  or next_epoch(train_state) >= epochs)


def finished_note(stage: str, train_state: dict[str, Any], epochs: int, patience: int
                  ) -> str | None:
    """What a rerun says of a stage that `finished` (None for one with epochs to train): why
    it has nothing to do, and which setting goes on from there."""
    if not finished(train_state, epochs, patience):
        return None
    if stays_stopped(train_state, patience):
        why = (f"stopped early: no better validation score in {int(train_state.get('stale', 0))}"
               " epochs")
        more = "a larger train.early_stopping_patience (or 0, off)"
    else:
        why, more = f"{next_epoch(train_state)} of {epochs} epochs done", "a larger epoch count"
    return f"[{stage}] already trained ({why}): nothing to do; {more} goes on from here"


class RunLog:
    """Publishes epoch results of one stage: bundles, CSV, curves and TensorBoard scalars."""

    def __init__(self, run_dir: str, stage: str):
        self.stage_dir = join(run_dir, stage)
        self._tb_local: str | None = None  # event files staged here for object storage
        self._writer = None

    @property
    def latest(self) -> str:
        return join(self.stage_dir, "latest")

    @property
    def best(self) -> str:
        return join(self.stage_dir, "best")

    def resume_dir(self) -> str | None:
        """The latest bundle to resume from (None: start afresh), after putting back the
        `latest/` and `best/` bundles a kill inside `record` may have left beside their place."""
        recover_dir(self.best)
        return self.latest if recover_dir(self.latest) else None

    def train_state(self, read_only: bool = False) -> dict[str, Any]:
        """The latest bundle's `train_state` (empty without one); `read_only` reads it where
        it lies (`complete_dir`), for a process that does not hold the run's lock."""
        latest = complete_dir(self.latest) if read_only else self.resume_dir()
        if latest is None:
            return {}
        fs, path = fsspec.core.url_to_fs(join(latest, METRICS_FILE))
        return json.loads(fs.cat_file(path)).get("train_state", {})

    def resume_epoch(self) -> int:
        """The epoch a rerun of this stage starts at (0 without a latest bundle)."""
        return next_epoch(self.train_state())

    def catch_up(self, train_state: dict[str, Any]) -> int:
        """Write the metrics.csv rows, TensorBoard scalars and curves of the epochs in the
        latest bundle's history (`train_state`, as `train_state()` reads it) that the logs lack
        (a kill between writing `latest/` and the logs left them short for good); returns how
        many epochs it added."""
        history = train_state.get("history") or []
        logged = self._logged_epochs()
        missing = [h for h in history if int(float(h.get("epoch", -1))) not in logged]
        if not missing:
            return 0
        for row in missing:
            self._write_tb(row)
        self._write_csv(history)
        self._write_curves(history)
        self.close()
        return len(missing)

    def _logged_epochs(self) -> set[int]:
        fs, path = fsspec.core.url_to_fs(join(self.stage_dir, "metrics.csv"))
        try:
            text = fs.cat_file(path).decode("utf-8", "replace")
        except FileNotFoundError:
            return set()
        epochs = set()
        for row in csv.DictReader(io.StringIO(text)):
            if None in row.values():  # a row cut short by a kill
                continue
            try:
                epochs.add(int(float(row.get("epoch") or "")))
            except ValueError:
                continue
        return epochs

    def record(self, metrics: dict[str, float], bundle_dir: str | None,
               history: list[dict[str, Any]]) -> None:
        if bundle_dir is not None:
            # best/ first: latest/ records the best score so far, so a kill between the two
            # copies must not leave a latest/ that claims a best/ not written yet
            if metrics.get("is_best"):
                # the optimizer state is for resuming, which reads latest/ only
                copy_dir(bundle_dir, self.best, exclude=(TRAIN_STATE_FILE,))
            copy_dir(bundle_dir, self.latest)
        # metrics.csv last: `catch_up` goes by its epochs, so a kill after it had been written
        # and before the scalars and curves left those short for good (a kill before it
        # writes the epoch's scalars a second time at the same step, where they overlap)
        self._write_tb(metrics)
        self._write_curves(history)
        self._write_csv(history)

    def _write_curves(self, history: list[dict[str, Any]]) -> None:
        series = {k: [h.get(k, float("nan")) for h in history] for k in CURVE_KEYS
                  if any(k in h for h in history)}
        # epochs numbered from 0, as in metrics.csv, TensorBoard and the training log
        save_png(plot_curves(series, title=f"{self.stage_dir.rsplit('/', 2)[-2]} {self.stage_name}",
                             first=0), join(self.stage_dir, "curves.png"))

    @property
    def stage_name(self) -> str:
        return self.stage_dir.rsplit("/", 1)[-1]

    def _write_csv(self, history: list[dict[str, Any]]) -> None:
        # columns in the order the loop reports them (the newest row's: rows a rerun read back
        # from a bundle's metrics.json come with their keys sorted), the epoch first, as an int
        keys: list[str] = ["epoch"]
        for row in history[-1:] + history:
            keys.extend(k for k in row if k not in keys)
        rows = [{**row, "epoch": int(float(row["epoch"]))} if "epoch" in row else row
                for row in history]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        fs, path = fsspec.core.url_to_fs(join(self.stage_dir, "metrics.csv"))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(fs, LocalFileSystem):  # whole or not at all (an object is anyway)
            staged = f"{path}{STAGED}"
            with open(staged, "w", encoding="utf-8") as f:
                f.write(buf.getvalue())
            os.replace(staged, path)
        else:
            fs.pipe_file(path, buf.getvalue().encode("utf-8"))

    def _write_tb(self, metrics: dict[str, float]) -> None:
        from tensorboardX import SummaryWriter  # ships with ray[train]

        if self._writer is None:
            # made on first use: most RunLogs only read (resume points, best/), and a staging
            # directory made for each would be left behind
            if "://" not in self.stage_dir or self.stage_dir.startswith("file://"):
                tb_dir = join(self.stage_dir.removeprefix("file://"), "tb")
                os.makedirs(tb_dir, exist_ok=True)
            else:
                tb_dir = self._tb_local = tempfile.mkdtemp(prefix="medseg-tb-")
            self._writer = SummaryWriter(tb_dir)
        epoch = int(metrics.get("epoch", 0))
        for key, value in metrics.items():
            if key != "epoch":
                self._writer.add_scalar(f"{self.stage_name}/{key}", float(value), epoch)
        self._writer.flush()
        if self._tb_local is not None:
            fs, path = fsspec.core.url_to_fs(join(self.stage_dir, "tb"))
            fs.put(self._tb_local + "/", path, recursive=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tb_local is not None:  # its files are on object storage (_write_tb)
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None
