"""The per-worker training loop of one stage (segmenter or classifier).

It reads like a plain PyTorch loop over medseg_core. Everything that differs between running
in-process and inside a Ray Train worker sits behind `WorkerContext`: where batches come from,
how counts are summed across workers, and how an epoch's bundle is reported.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medseg_core.checkpoint import (
    BundleError,
    load_bundle,
    load_train_state,
    save_bundle,
    save_train_state,
)
from medseg_core.engine import (
    FrozenSegmenter,
    StepConfig,
    build_optimizer,
    build_scheduler,
    seed_everything,
    train_epoch,
    validate_classifier,
    validate_segmenter,
)
from medseg_core.inference import mask_settings
from medseg_core.losses import build_loss
from medseg_core.metrics import ClassificationMeter, metrics_from_counts, thresholded_jaccard
from medseg_core.models import build_model
from medseg_core.precision import amp_dtype
from pipelines.runlog import finished_note, next_epoch, stays_stopped


class WorkerContext(Protocol):
    """What the loop needs from its runtime (in-process or a Ray Train worker)."""

    rank: int
    world_size: int
    device: torch.device

    def train_batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]: ...
    def val_batches(self) -> Iterable[dict[str, torch.Tensor]]: ...
    def steps_per_epoch(self) -> int: ...
    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def all_sum(self, values: np.ndarray) -> np.ndarray: ...
    def sync_buffers(self, module: nn.Module) -> None: ...
    def resume_dir(self) -> str | None: ...
    def report(self, metrics: dict[str, float], bundle_dir: str | None,
               history: list[dict[str, float]]) -> None: ...


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Every buffer of ``module`` (BatchNorm running statistics) from rank ``src`` to all ranks
    of the default process group: DDP syncs buffers only in a training forward, so after the
    last step each worker's statistics include its own last batch. Validating with rank 0's
    makes the summed counts the saved model's."""
    gloo = dist.get_backend() == "gloo"
    for buf in module.buffers():
        if gloo and buf.device.type != "cpu":
            cpu = buf.cpu()
            dist.broadcast(cpu, src=src)
            buf.copy_(cpu)
        else:
            dist.broadcast(buf, src=src)


@dataclass
class StageSpec:
    """A stage's settings, resolved from the Hydra config into plain values."""

    stage: str                   # "segmenter" | "classifier"
    model: dict[str, Any]
    epochs: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loss: dict[str, Any]
    bundle_config: dict[str, Any]  # everything of the bundle's config.yaml except `model`
    grad_clip: float | None = 1.0
    threshold: float = 0.5
    seed: int = 0
    early_stopping_patience: int = 0
    gpu_augment: dict[str, Any] | None = None
    bf16: bool = False           # bf16 autocast on GPUs
    cpu_bf16: bool = False       # and on CPUs with native bf16 (precision.native_bf16)
    channels_last: bool = False
    ema_decay: float = 0.0       # > 0: validate and save an exponential moving average of the weights
    fail_at_epoch: int = -1      # fault injection for tests: raise once at this epoch
    fail_marker: str | None = None
    # classifier: masks from a frozen segmenter bundle instead of the truth (train.classifier_masks)
    predicted_masks: float = 0.0   # fraction of training samples
    validate_masks: str = "truth"  # truth | predicted
    mask_segmenter: str | None = None

    @property
    def task(self) -> str:
        return "segmentation" if self.stage == "segmenter" else "classification"

    @property
    def uses_segmenter(self) -> bool:
        return self.task == "classification" and (
            self.predicted_masks > 0 or self.validate_masks == "predicted")


def load_mask_segmenter(spec: StageSpec, device: torch.device) -> FrozenSegmenter:
    """The frozen segmenter (`spec.mask_segmenter`) whose masks the classifier stage trains or
    validates on, with its bundle's threshold and post-processing (`inference.flip`,
    `inference.keep_largest`), so they are the masks the inference chain gives the classifier."""
    try:
        bundle = load_bundle(spec.mask_segmenter, map_location=device)
    except BundleError as exc:
        raise BundleError(f"train.classifier_masks: {exc} (train the segmenter stage first or "
                          "set train.classifier_masks.segmenter)") from exc
    cfg, own = bundle.config, spec.bundle_config
    if cfg.get("task") != "segmentation":
        raise ValueError(f"{spec.mask_segmenter} is a {cfg.get('task')} bundle, not a segmenter")
    if [list(map(float, cfg.get(k, []))) for k in ("mean", "std")] != \
            [list(map(float, own[k])) for k in ("mean", "std")]:
        raise ValueError(f"segmenter {spec.mask_segmenter} normalises images with mean/std "
                         f"{cfg.get('mean')}/{cfg.get('std')}, the classifier with "
                         f"{own['mean']}/{own['std']}")
    model = bundle.model.to(device).eval().requires_grad_(False)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return FrozenSegmenter(model, *mask_settings(cfg))


def epoch_metrics(spec: StageSpec, ctx: WorkerContext, model: nn.Module,
                  step: StepConfig) -> dict[str, float]:
    """Validation metrics from sums over all workers (one all-reduce), so they equal the metrics
    of the whole validation set: Dice, IoU, ... from the summed confusion counts, and the ISIC
    2018 thresholded Jaccard as the mean over images of each image's score."""
    if spec.task == "segmentation":
        meter, loss_sum = validate_segmenter(model, ctx.val_batches(), step, build_loss(spec.loss))
        per_image = meter.counts
        counts = per_image.sum(axis=0)
        tj_sum = float(np.sum(thresholded_jaccard(per_image))) if len(per_image) else 0.0
        n = float(len(per_image))
        total = ctx.all_sum(np.array([*counts, loss_sum, n, tj_sum], dtype=np.float64))
        _require_validation(total[5])
        agg = metrics_from_counts(total[:4].astype(np.int64))
        out = {f"val_{k}": float(agg[k]) for k in
               ("dice", "iou", "sensitivity", "specificity", "precision")}
        out["val_thresholded_jaccard"] = float(total[6] / max(total[5], 1.0))
        out["val_loss"] = float(total[4] / max(total[5], 1.0))
        out["val_images"] = float(total[5])
        return out
    num_classes = int(spec.model.get("num_classes", 3))
    cm = validate_classifier(model, ctx.val_batches(), step, num_classes).confusion
    total = ctx.all_sum(cm.astype(np.float64).ravel()).reshape(cm.shape)
    _require_validation(total.sum(), "with a label ")
    agg = ClassificationMeter.from_state({"confusion": total}).aggregate()
    return {"val_accuracy": float(agg["accuracy"]), "val_macro_f1": float(agg["macro_f1"]),
            "val_images": float(total.sum())}


def _require_validation(images: float, kind: str = "") -> None:
    """Scores of no images (every validation record unreadable) would read as a perfect Dice
    and pick that epoch as the best for good."""
    if images <= 0:
        raise RuntimeError(f"no validation image {kind}could be read: every such record of the "
                           "validation split was dropped as bad input (see the warnings and "
                           "data.report)")


def score_key(spec: StageSpec) -> str:
    return "val_dice" if spec.task == "segmentation" else "val_accuracy"


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's random draws (augmentation, dropout) in one epoch: a resumed
    run draws what an uninterrupted one would have, not epoch 0's numbers again."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63


def seek_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, position: int) -> None:
    """Put the per-step schedule at step `position` (an epoch's first step: its number times
    the planned steps per epoch). Each epoch starts where it was planned to, not where the
    steps taken so far reached: on Ray a bad record dropped in a read task shortens an epoch
    by a step or two, and a resumed run, which can only count planned steps, would otherwise
    take another schedule than the uninterrupted run."""
    scheduler.last_epoch = position - 1
    with warnings.catch_warnings():  # stepping without optimizer steps is the point here
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()


def restore_optimizer(optimizer: torch.optim.Optimizer, resume: str,
                      state: dict[str, Any] | None) -> bool:
    """Load the optimizer state (AdamW moments, step counts) of `state`, the train state saved
    beside the bundle at `resume`; False, with a warning, for a checkpoint without one (the
    optimizer starts afresh).

    Call it after building the LR scheduler: the scheduler keeps the configured base LRs and
    sets each step's LR from its position, which `fit_stage` recomputes from the epoch. The
    other settings of each parameter group (weight decay, momentum, betas, ...) stay as
    configured: the saved state would otherwise bring back the first run's."""
    saved = (state or {}).get("optimizer_name")
    if state is None or saved != type(optimizer).__name__:
        why = ("it has no optimizer state (saved by an older version)" if state is None
               else f"its optimizer state is for {saved}, not {type(optimizer).__name__}")
        warnings.warn(f"resuming from {resume}: {why}; the optimizer starts afresh",
                      RuntimeWarning, stacklevel=2)
        return False
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                  for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    return True


def update_average(ema: AveragedModel, model: torch.nn.Module) -> None:
    """One step of the weight average; integer buffers (BatchNorm's num_batches_tracked) are
    counts, copied rather than averaged (the average truncated them to 1 for good)."""
    ema.update_parameters(model)
    for averaged, current in zip(ema.module.buffers(), model.buffers()):
        if not averaged.is_floating_point():
            averaged.copy_(current)


def fit_stage(spec: StageSpec, ctx: WorkerContext) -> None:
    """Train one stage for `spec.epochs`, resuming from the context's latest bundle (weights,
    optimizer state, schedule position, early-stopping state and history)."""
    seed_everything(spec.seed + ctx.rank, ctx.device)
    model = build_model(spec.model)
    start_epoch, best, stale, history = 0, -math.inf, 0, []
    resume, saved, averaged = ctx.resume_dir(), None, None
    if resume:
        bundle = load_bundle(resume)
        saved = load_train_state(resume)
        averaged = bundle.model.state_dict()
        # a bundle of an averaging run holds the average; training goes on from the raw weights
        model.load_state_dict((saved or {}).get("model") or averaged)
        state = bundle.metrics.get("train_state", {})
        start_epoch = next_epoch(state)
        best = float(state.get("best", -math.inf))
        stale = int(state.get("stale", 0))
        history = list(state.get("history", []))
        if stays_stopped(state, spec.early_stopping_patience):
            start_epoch = spec.epochs
        note = finished_note(spec.stage, state, spec.epochs, spec.early_stopping_patience)
        if note and ctx.rank == 0:  # a stage the driver did not skip (train.run does)
            sys.stdout.write(note + "\n")
            sys.stdout.flush()
    model = model.to(ctx.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if spec.ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.ema_decay),
                            use_buffers=True)
        if saved is not None and "ema_updates" in saved:
            ema.module.load_state_dict(averaged)
            ema.n_averaged.fill_(int(saved["ema_updates"]))
    model = ctx.wrap_model(model)
    optimizer = build_optimizer(model, spec.optimizer)
    steps = max(1, ctx.steps_per_epoch())
    scheduler = build_scheduler(optimizer, spec.scheduler, total_steps=steps * spec.epochs)
    if resume and start_epoch < spec.epochs:
        restore_optimizer(optimizer, resume, saved)
    loss_fn = build_loss(spec.loss)
    cfg = spec.bundle_config
    step = StepConfig(
        device=ctx.device, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        grad_clip=spec.grad_clip, threshold=spec.threshold,
        amp_dtype=amp_dtype(ctx.device, gpu=spec.bf16, cpu=spec.cpu_bf16,
                            setting="trainer.cpu_bf16" if ctx.device.type == "cpu" and ctx.rank == 0
                            else None),
        channels_last=spec.channels_last, augment=spec.gpu_augment,
        mask_model=load_mask_segmenter(spec, ctx.device) if spec.uses_segmenter else None,
        mask_prob=spec.predicted_masks,
    )
    plain = getattr(model, "module", model)
    average = None if ema is None else (lambda *_: update_average(ema, plain))
    val_step = step if spec.validate_masks == "predicted" else replace(step, mask_model=None)
    for epoch in range(start_epoch, spec.epochs):
        _maybe_fail(spec, epoch)
        generator = seed_everything(epoch_seed(spec.seed, ctx.rank, epoch), ctx.device)
        seek_schedule(scheduler, epoch * steps)
        lr = float(optimizer.param_groups[0]["lr"])  # the epoch's first step's
        tr = train_epoch(model, ctx.train_batches(epoch), optimizer, loss_fn, step,
                         scheduler=scheduler, task=spec.task, generator=generator,
                         on_step=average)
        tot = ctx.all_sum(np.array([tr["loss"] * tr["samples"], tr["samples"], tr["seconds"],
                                    tr["data_wait_fraction"] * tr["seconds"]]))
        metrics = {
            "epoch": float(epoch),
            "train_loss": float(tot[0] / max(tot[1], 1.0)),
            "train_samples": float(tot[1]),
            "samples_per_s": float(tot[1] / max(tot[2] / ctx.world_size, 1e-9)),
            "data_wait_fraction": float(tot[3] / max(tot[2], 1e-9)),
            "lr": lr,
        }
        if not math.isfinite(metrics["train_loss"]):
            # every later step stays NaN: stop before it becomes the latest (or best) bundle
            raise RuntimeError(
                f"[{spec.stage}] training diverged at epoch {epoch}: the training loss is "
                f"{metrics['train_loss']}; the bundles of the epochs before it are kept. Lower "
                "the learning rate (train.optimizer.lr) or clip gradients (train.grad_clip)")
        if ctx.device.type == "cuda":
            busy = ctx.all_sum(np.array([tr["gpu_busy_fraction"]]))[0] / ctx.world_size
            metrics["gpu_busy_fraction"] = float(busy)
        # validate the plain module (or its average) with rank 0's buffers on every worker: the
        # summed counts are then the saved model's (DDP syncs buffers only while training)
        kept = plain if ema is None else ema.module
        ctx.sync_buffers(kept)
        metrics.update(epoch_metrics(spec, ctx, kept, val_step))
        score = metrics[score_key(spec)]
        improved = score > best
        best, stale = (score, 0) if improved else (best, stale + 1)
        metrics["is_best"] = float(improved)
        history.append({k: v for k, v in metrics.items()})
        stop = spec.early_stopping_patience > 0 and stale >= spec.early_stopping_patience
        train_state = {"epoch": epoch, "best": best, "stale": stale, "history": history,
                       "stopped_early": stop}
        with tempfile.TemporaryDirectory() as tmp:
            bundle_dir = None
            if ctx.rank == 0:
                bundle_dir = str(Path(tmp) / "bundle")
                # the LR schedule needs no state: it is recomputed from the epoch on resume
                state = {"optimizer_name": type(optimizer).__name__,
                         "optimizer": optimizer.state_dict()}
                if ema is not None:
                    state.update(model=plain.state_dict(), ema_updates=int(ema.n_averaged))
                save_train_state(bundle_dir, state)
                save_bundle(bundle_dir, kept, {"model": spec.model, **cfg},
                            metrics={**metrics, "train_state": train_state},
                            version=f"{spec.stage}-e{epoch:03d}-{int(time.time())}")
            ctx.report(metrics, bundle_dir, history)
        if stop:
            break


def _maybe_fail(spec: StageSpec, epoch: int) -> None:
    """Fault injection: raise once at `fail_at_epoch`, remembered by a marker file."""
    if spec.fail_at_epoch != epoch or not spec.fail_marker:
        return
    # in the run directory, wherever it is (a worker restarted on another node must find it)
    fs, path = fsspec.core.url_to_fs(spec.fail_marker)
    if fs.exists(path):
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps({"epoch": epoch, "time": time.time()}).encode())
    raise RuntimeError(f"injected failure at epoch {epoch} (marker {spec.fail_marker})")
