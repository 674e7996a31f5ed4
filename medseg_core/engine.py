"""The training and validation loop, free of Ray: the same functions run in-process (demo,
benchmarks) and inside each Ray Train worker, which only supplies the batches and reports.

A batch is a dict of tensors: `image` uint8 (B, H, W, C), `mask` uint8 (B, H, W) in {0, 1},
`label` int64 (B,). Normalisation and (optionally) geometric augmentation happen here, on the
training device, so a GPU is not starved by per-image CPU work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg_core.inference import model_masks
from medseg_core.metrics import ClassificationMeter, SegmentationMeter
from medseg_core.transforms import augment_batch, normalize_batch

Batch = dict[str, torch.Tensor]


@dataclass
class StepConfig:
    """How one optimisation step runs on a device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    grad_clip: float | None = 1.0
    amp_dtype: torch.dtype | None = None  # torch.bfloat16: see `precision.amp_dtype`
    channels_last: bool = False
    augment: dict[str, Any] | None = None  # cfg for transforms.augment_batch (on device)
    threshold: float = 0.5
    # classifier only: a frozen segmenter whose masks stand in for the truth, for a
    # `mask_prob` fraction of the training samples and for every validation sample
    mask_model: FrozenSegmenter | None = None
    mask_prob: float = 0.0


@dataclass
class FrozenSegmenter:
    """A trained segmenter whose masks the classifier stage sees instead of the truth, made as
    the inference chain makes them (its bundle's threshold, flip and keep_largest)."""

    model: nn.Module
    threshold: float = 0.5
    flip: bool = False
    keep_largest: bool = False


OPTIMIZERS = ("adamw", "sgd")


def _real(cfg: dict[str, Any], key: str, default: float, where: str) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def optimizer_settings(cfg: dict[str, Any], where: str = "optimizer") -> dict[str, Any]:
    """`{name, lr, weight_decay, momentum}` checked (ValueError naming `where.<key>`
    otherwise): a known name, lr > 0, weight_decay >= 0, and for sgd momentum in (0, 1)."""
    name = str(cfg.get("name", "adamw")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown {where}.name {name!r}; expected one of {list(OPTIMIZERS)}")
    known = {"name", "lr", "weight_decay", *(("momentum",) if name == "sgd" else ())}
    unknown = sorted(set(cfg) - known)
    if unknown:  # silently ignored before (betas, or momentum given to adamw)
        raise ValueError(f"{where}: unknown key(s) {unknown} for {name}; it takes "
                         f"{sorted(known - {'name'})}")
    out = {"name": name, "lr": _real(cfg, "lr", 1e-3, where),
           "weight_decay": _real(cfg, "weight_decay", 1e-4, where),
           "momentum": _real(cfg, "momentum", 0.99, where)}
    if not out["lr"] > 0:
        raise ValueError(f"{where}.lr must be > 0, got {out['lr']}")
    if out["weight_decay"] < 0:
        raise ValueError(f"{where}.weight_decay must be >= 0, got {out['weight_decay']}")
    if name == "sgd" and not 0 < out["momentum"] < 1:  # Nesterov needs some momentum
        raise ValueError(f"{where}.momentum must be in (0, 1) for sgd, got {out['momentum']}")
    return out


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with Nesterov momentum, from `{name, lr, weight_decay, momentum}`
    (`optimizer_settings`)."""
    opt = optimizer_settings(cfg)
    if opt["name"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    return torch.optim.SGD(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"],
                           momentum=opt["momentum"], nesterov=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "poly",
              power: float = 0.9, min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warm-up, then poly or cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        decay = (1.0 - progress) ** power
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected poly, cosine or constant")
    return min_factor + (1.0 - min_factor) * decay


SCHEDULES = ("poly", "cosine", "constant")


def check_scheduler(cfg: dict[str, Any]) -> tuple[str, float]:
    """`{schedule, warmup_steps | warmup_fraction, power}` checked up front (a misspelt schedule
    would otherwise fail only when warm-up ends); returns the schedule and the power."""
    unknown = sorted(set(cfg) - {"schedule", "warmup_steps", "warmup_fraction", "power"})
    if unknown:
        raise ValueError(f"train.scheduler: unknown key(s) {unknown}; it takes schedule, "
                         "warmup_steps, warmup_fraction and power")
    schedule = cfg.get("schedule", "poly")
    if schedule not in SCHEDULES:
        raise ValueError(f"train.scheduler.schedule must be one of {list(SCHEDULES)}, "
                         f"got {schedule!r}")
    power = float(cfg.get("power", 0.9))
    if not 0 < power < math.inf:  # inf froze the model once warm-up ended
        raise ValueError(f"train.scheduler.power must be > 0 and finite, got {power}")
    steps = cfg.get("warmup_steps")
    if steps is not None and (int(steps) != float(steps) or int(steps) < 0):
        raise ValueError(f"train.scheduler.warmup_steps must be a whole number >= 0, got {steps}")
    fraction = float(cfg.get("warmup_fraction", 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError("train.scheduler.warmup_fraction must be in [0, 1) (the fraction of "
                         f"all steps spent warming up), got {fraction}")
    return schedule, power


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler from `{schedule, warmup_steps | warmup_fraction, power}`
    (`warmup_steps`, when set, wins; 0 means no warm-up)."""
    schedule, power = check_scheduler(cfg)
    steps = cfg.get("warmup_steps")
    warmup = int(steps) if steps is not None else \
        round(float(cfg.get("warmup_fraction", 0.0) or 0.0) * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule, power)
    )


def _inputs(batch: Batch, step: StepConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move a batch to the device; images normalised to (B, C, H, W) float, masks (B, 1, H, W)."""
    dev = step.device
    images = normalize_batch(batch["image"].to(dev, non_blocking=True), step.mean, step.std)
    masks = batch["mask"].to(dev, non_blocking=True).float().unsqueeze(1)
    labels = batch["label"].to(dev, non_blocking=True).long() if "label" in batch else None
    if step.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks, labels


def predicted_masks(images: torch.Tensor, step: StepConfig) -> torch.Tensor:
    """`step.mask_model`'s masks (B, 1, H, W) float for normalised `images`."""
    seg = step.mask_model
    with torch.no_grad():
        masks = model_masks(seg.model, images, seg.threshold, seg.flip, seg.keep_largest,
                            autocast=lambda: _autocast(step))
    return masks[:, None].float()


def _training_masks(images: torch.Tensor, masks: torch.Tensor, step: StepConfig,
                    generator: torch.Generator | None) -> torch.Tensor:
    """The classifier's training masks: each sample's truth, or with probability
    `step.mask_prob` the frozen segmenter's prediction on the (augmented) image."""
    if step.mask_model is None or step.mask_prob <= 0:
        return masks
    pred = predicted_masks(images, step)
    if step.mask_prob >= 1:
        return pred
    pick = torch.rand(masks.shape[0], device=masks.device, generator=generator) < step.mask_prob
    return torch.where(pick[:, None, None, None], pred, masks)


def _autocast(step: StepConfig):
    if step.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=step.device.type, dtype=step.amp_dtype)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    step: StepConfig,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    task: str = "segmentation",
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns mean loss, samples, seconds, samples/s, the fraction of
    time spent waiting for data and, on CUDA, the fraction of wall time the GPU was busy with
    this loop's work (CUDA events around each step).

    `task` is "segmentation" (targets: masks) or "classification" (model(image, mask) -> logits,
    targets: labels). Augmentation, when configured, is applied to the whole batch on the device.
    """
    model.train()
    total_loss, samples, steps = 0.0, 0, 0
    wait, start = 0.0, time.perf_counter()
    cuda = step.device.type == "cuda"
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    it: Iterator[Batch] = iter(batches)
    while max_steps is None or steps < max_steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        images, masks, labels = _inputs(batch, step)
        if step.augment:
            images, masks = augment_batch(images, masks, generator, step.augment,
                                           mean=step.mean, std=step.std)
        with _autocast(step):
            if task == "segmentation":
                loss = loss_fn(model(images), masks)
            else:
                masks = _training_masks(images, masks, step, generator)
                loss = loss_fn(model(images, masks), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if cuda:
            events[-1][1].record()
        n = images.shape[0]
        total_loss += float(loss.detach()) * n
        samples += n
        steps += 1
        if on_step is not None:
            on_step(steps, float(loss.detach()))
    if cuda:
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - start
    busy = sum(a.elapsed_time(b) for a, b in events) / 1000.0 if cuda else float("nan")
    return {
        "gpu_busy_fraction": busy / seconds if cuda and seconds > 0 else float("nan"),
        "loss": total_loss / max(samples, 1),
        "samples": float(samples),
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "data_wait_fraction": wait / seconds if seconds > 0 else 0.0,
    }


@torch.inference_mode()
def validate_segmenter(model: nn.Module, batches: Iterable[Batch], step: StepConfig,
                       loss_fn: Callable[..., torch.Tensor] | None = None
                       ) -> tuple[SegmentationMeter, float]:
    """Confusion counts of thresholded predictions over `batches` (mergeable across workers),
    and the summed loss (0 when no loss_fn)."""
    model.eval()
    meter = SegmentationMeter()
    loss_sum = 0.0
    for batch in batches:
        images, masks, _ = _inputs(batch, step)
        with _autocast(step):
            logits = model(images)
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, masks)) * images.shape[0]
        pred = torch.sigmoid(logits) > step.threshold
        meter.update(pred[:, 0].cpu().numpy(), masks[:, 0].cpu().numpy() > 0.5)
    return meter, loss_sum


@torch.inference_mode()
def validate_classifier(model: nn.Module, batches: Iterable[Batch], step: StepConfig,
                        num_classes: int) -> ClassificationMeter:
    """Confusion matrix of the classifier over `batches` (mergeable across workers), given the
    true masks or, with `step.mask_model`, that segmenter's (as the inference chain does)."""
    model.eval()
    meter = ClassificationMeter(num_classes)
    for batch in batches:
        images, masks, labels = _inputs(batch, step)
        if step.mask_model is not None:
            masks = predicted_masks(images, step)
        with _autocast(step):
            logits = model(images, masks)
        meter.update(logits.float().argmax(1).cpu().numpy(), labels.cpu().numpy())
    return meter


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seed numpy and torch; returns a generator on `device` for on-device augmentation."""
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)
