"""Segmentation and classification losses.

Segmentation losses take logits (B, C, H, W) and a float target of the same shape (a
(B, H, W) target is accepted for C == 1), or a list of logits from a deep-supervision model,
in which case the per-output losses are combined with weights that halve per level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _match_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape[-2:] != logits.shape[-2:]:
        # Aux outputs at a lower resolution: nearest keeps the target binary.
        target = F.interpolate(target.float(), size=logits.shape[-2:], mode="nearest")
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    return target.to(torch.float32)


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None
) -> torch.Tensor:
    """Binary cross entropy with logits, averaged over all pixels (computed in float32)."""
    target = _match_target(logits, target)
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   batch_dice: bool = False) -> torch.Tensor:
    """1 - soft Dice, with Dice computed per image and channel, then averaged (each image
    weighs the same: missing a small lesion costs as much as missing a large one); with
    `batch_dice`, over the whole batch as one image per channel (nnU-Net's "batch Dice": each
    pixel weighs the same, as in a Dice of counts summed over a data set).

    dice = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid(logits).
    The smooth term makes an empty target with an (almost) empty prediction score ~1 (loss ~0)
    instead of 0/0, while an empty target with a confident prediction still costs ~1.
    """
    target = _match_target(logits, target)
    probs = torch.sigmoid(logits.float())
    dims = tuple(range(2, logits.dim()))
    if batch_dice:
        dims = (0, *dims)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice.mean()


class BCELoss(nn.Module):
    """`bce_loss` as a module."""

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, target, self.pos_weight)


class DiceLoss(nn.Module):
    """`soft_dice_loss` as a module."""

    def __init__(self, smooth: float = 1.0, batch_dice: bool = False) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, self.smooth, self.batch_dice)


class DiceBCELoss(nn.Module):
    """dice_weight * soft Dice loss + bce_weight * BCE."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1.0,
        pos_weight: float | None = None,
        batch_dice: bool = False,
    ) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.smooth = smooth
        self.pos_weight = pos_weight
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * soft_dice_loss(
            logits, target, self.smooth, self.batch_dice
        ) + self.bce_weight * bce_loss(logits, target, self.pos_weight)


def deep_supervision_weights(n: int) -> list[float]:
    """Weights 1, 1/2, 1/4, ... for `n` outputs (main first), normalised to sum to 1."""
    raw = [0.5**i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Apply `loss` to a Tensor as is, or to each Tensor of a list (main output first) and
    combine them with `weights` (default: halving per level), normalised to sum to 1."""

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(
        self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(logits, torch.Tensor):
            return self.loss(logits, target)
        outputs = list(logits)
        if not outputs:
            raise ValueError("deep supervision loss got an empty list of logits")
        if self.weights is None:
            weights = deep_supervision_weights(len(outputs))
        else:
            if len(self.weights) < len(outputs):
                raise ValueError(
                    f"{len(outputs)} outputs but only {len(self.weights)} deep supervision weights"
                )
            used = self.weights[: len(outputs)]
            if not all(math.isfinite(w) and w >= 0 for w in used):
                raise ValueError(f"deep supervision weights must be finite and >= 0, got {used}")
            total = sum(used)
            if total <= 0:
                raise ValueError("deep supervision weights must sum to a positive value")
            weights = [w / total for w in self.weights[: len(outputs)]]
        return sum(w * self.loss(out, target) for w, out in zip(weights, outputs) if w != 0)


class LabelledCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy over the labelled samples; a batch with none (every label the ignore
    index) gives a zero loss with zero gradients instead of PyTorch's 0/0 = NaN."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not bool((labels != self.ignore_index).any()):
            return logits.sum() * 0.0
        return super().forward(logits, labels)


SEGMENTATION_LOSSES = ("bce", "dice", "dice_bce")
LOSSES = (*SEGMENTATION_LOSSES, "ce")


def build_loss(cfg: dict[str, Any]) -> nn.Module:
    """Build a loss from a config dict.

    Segmentation (`loss(logits | list[logits], target (B, 1, H, W) float) -> scalar`):
      {"name": "bce", "pos_weight": None}
      {"name": "dice", "smooth": 1.0, "batch_dice": False}
      {"name": "dice_bce", "dice_weight": 1.0, "bce_weight": 1.0, "smooth": 1.0,
       "batch_dice": False, "deep_supervision_weights": None}   # weights: bce and dice too
    Classification (`loss(logits (B, K), labels (B,) int64) -> scalar`):
      {"name": "ce", "class_weights": None | [w_0, ...], "label_smoothing": 0.0,
       "ignore_index": -1}   # labels of -1 (unknown) are ignored by default
    `cfg` is not modified; unknown keys raise ValueError.
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {list(LOSSES)}")
    _check_values(cfg)
    if name == "ce":
        allowed = {"class_weights", "label_smoothing", "ignore_index"}
        _check_keys(name, cfg, allowed)
        weights = cfg.get("class_weights")
        return LabelledCrossEntropy(
            weight=None if weights is None else torch.tensor(list(weights), dtype=torch.float32),
            label_smoothing=float(cfg.get("label_smoothing", 0.0) or 0.0),
            ignore_index=int(cfg.get("ignore_index", -1)),
        )
    ds_weights = cfg.pop("deep_supervision_weights", None)
    if name == "bce":
        _check_keys(name, cfg, {"pos_weight"})
        base: nn.Module = BCELoss(cfg.get("pos_weight"))
    elif name == "dice":
        _check_keys(name, cfg, {"smooth", "batch_dice"})
        base = DiceLoss(float(cfg.get("smooth", 1.0)), _flag(cfg, "batch_dice"))
    else:
        _check_keys(name, cfg, {"dice_weight", "bce_weight", "smooth", "pos_weight",
                                "batch_dice"})
        base = DiceBCELoss(
            dice_weight=float(cfg.get("dice_weight", 1.0)),
            bce_weight=float(cfg.get("bce_weight", 1.0)),
            smooth=float(cfg.get("smooth", 1.0)),
            pos_weight=cfg.get("pos_weight"),
            batch_dice=_flag(cfg, "batch_dice"),
        )
    return DeepSupervisionLoss(base, ds_weights)


def _check_values(cfg: dict[str, Any]) -> None:
    """Weights finite and >= 0, not all zero; pos_weight > 0; label_smoothing in [0, 1): a
    NaN or negative weight trained a NaN (or inverted) model to the end without a word."""

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)

    for key in ("dice_weight", "bce_weight", "smooth"):
        if key in cfg and number(key, cfg[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {cfg[key]!r}")
    if "dice_weight" in cfg and "bce_weight" in cfg and \
            float(cfg["dice_weight"]) + float(cfg["bce_weight"]) == 0:
        raise ValueError("dice_weight and bce_weight are both 0: nothing would be learnt")
    if cfg.get("pos_weight") is not None and not number("pos_weight", cfg["pos_weight"]) > 0:
        raise ValueError(f"pos_weight must be > 0 or null, got {cfg['pos_weight']!r}")
    if "label_smoothing" in cfg and not 0 <= number("label_smoothing",
                                                   cfg["label_smoothing"] or 0.0) < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {cfg['label_smoothing']!r}")
    weights = cfg.get("class_weights")
    if weights is not None:
        values = [number("class_weights", w) for w in list(weights)]
        if not values or min(values) < 0 or sum(values) == 0:
            raise ValueError(f"class_weights must be numbers >= 0, not all 0, got {weights!r}")


def _flag(cfg: dict[str, Any], key: str) -> bool:
    value = cfg.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"loss option {key!r} must be true or false, got {value!r}")
    return value


class UnknownLossKeysError(ValueError):
    """A loss config with keys its loss does not take (``keys``: those, sorted)."""

    def __init__(self, name: str, keys: list[str], allowed: set[str]) -> None:
        super().__init__(f"unknown keys {keys} for loss {name!r}; allowed: {sorted(allowed)}")
        self.keys = keys


def _check_keys(name: str, cfg: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise UnknownLossKeysError(name, sorted(unknown), allowed)
