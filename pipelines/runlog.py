"""Where a training run leaves its files, locally or on object storage:

    <output_dir>/runs/<run_name>/<stage>/
        latest/  best/     model bundles (medseg_core.checkpoint)
        metrics.csv        one row per epoch, rewritten from the bundle's history (idempotent)
        curves.png         training curves
        tb/                TensorBoard event files
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from typing import Any

import fsspec

from medseg_core.checkpoint import METRICS_FILE
from medseg_core.viz import plot_curves, save_png

CURVE_KEYS = ("train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy", "val_macro_f1")


def join(base: str, *parts: str) -> str:
    """Join URL or path segments with '/'."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def copy_dir(src: str, dst: str) -> None:
    """Replace the bundle at `dst` by the local directory `src` (version file last)."""
    fs, path = fsspec.core.url_to_fs(dst)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    names = sorted(os.listdir(src), key=lambda n: n == "version")
    for name in names:
        fs.put_file(os.path.join(src, name), f"{path}/{name}")


def next_epoch(train_state: dict[str, Any]) -> int:
    """The epoch after the one a bundle's `train_state` was saved at (0 for none)."""
    return int(train_state.get("epoch", -1)) + 1


class RunLog:
    """Publishes epoch results of one stage: bundles, CSV, curves and TensorBoard scalars."""

    def __init__(self, run_dir: str, stage: str):
        self.stage_dir = join(run_dir, stage)
        self._tb_local = None
        self._writer = None
        if "://" not in self.stage_dir or self.stage_dir.startswith("file://"):
            self._tb_dir = join(self.stage_dir.removeprefix("file://"), "tb")
        else:
            self._tb_local = tempfile.mkdtemp(prefix="medseg-tb-")
            self._tb_dir = self._tb_local

    @property
    def latest(self) -> str:
        return join(self.stage_dir, "latest")

    @property
    def best(self) -> str:
        return join(self.stage_dir, "best")

    def resume_dir(self) -> str | None:
        return self.latest if exists(join(self.latest, "version")) else None

    def resume_epoch(self) -> int:
        """The epoch a rerun of this stage starts at (0 without a latest bundle)."""
        if self.resume_dir() is None:
            return 0
        fs, path = fsspec.core.url_to_fs(join(self.latest, METRICS_FILE))
        return next_epoch(json.loads(fs.cat_file(path)).get("train_state", {}))

    def record(self, metrics: dict[str, float], bundle_dir: str | None,
               history: list[dict[str, Any]]) -> None:
        if bundle_dir is not None:
            copy_dir(bundle_dir, self.latest)
            if metrics.get("is_best"):
                copy_dir(bundle_dir, self.best)
        self._write_csv(history)
        self._write_tb(metrics)
        series = {k: [h.get(k, float("nan")) for h in history] for k in CURVE_KEYS
                  if any(k in h for h in history)}
        save_png(plot_curves(series, title=f"{self.stage_dir.rsplit('/', 2)[-2]} {self.stage_name}"),
                 join(self.stage_dir, "curves.png"))

    @property
    def stage_name(self) -> str:
        return self.stage_dir.rsplit("/", 1)[-1]

    def _write_csv(self, history: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for row in history:
            keys.extend(k for k in row if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        fs, path = fsspec.core.url_to_fs(join(self.stage_dir, "metrics.csv"))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write(buf.getvalue())

    def _write_tb(self, metrics: dict[str, float]) -> None:
        from tensorboardX import SummaryWriter  # ships with ray[train]

        if self._writer is None:
            os.makedirs(self._tb_dir, exist_ok=True)
            self._writer = SummaryWriter(self._tb_dir)
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
