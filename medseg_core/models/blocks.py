"""Building blocks shared by the segmentation models: normalisation lookup, padding of arbitrary
input sizes to a multiple of the network stride, and per-level dropout expansion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = (None, "batch", "instance")


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """Return the normalisation layer named `norm` ("batch", "instance" or None -> Identity)."""
    if norm is None or norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def per_level(
    value: float | Sequence[float], levels: int, name: str = "dropout"
) -> tuple[float, ...]:
    """Expand a scalar to `levels` values, or check that a sequence has exactly `levels` values."""
    if isinstance(value, (int, float)):
        return (float(value),) * levels
    values = tuple(float(v) for v in value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} values but the model has {levels} levels")
    return values


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "reflect", min_size: int = 1
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom/right of an (B, C, H, W) tensor so H and W are multiples of `multiple`
    and at least `min_size`. Returns the padded tensor and the original (H, W).

    `mode` is "reflect", "replicate" or "zeros"; reflect falls back to replicate where the pad
    is not smaller than the input (reflect padding cannot mirror more than the image)."""
    h, w = x.shape[-2:]
    target_h = max(-(-h // multiple) * multiple, -(-min_size // multiple) * multiple)
    target_w = max(-(-w // multiple) * multiple, -(-min_size // multiple) * multiple)
    pad_h, pad_w = target_h - h, target_w - w
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    if mode == "zeros":
        return F.pad(x, (0, pad_w, 0, pad_h)), (h, w)
    if mode == "reflect" and (pad_h >= h or pad_w >= w):
        mode = "replicate"
    if mode not in ("reflect", "replicate"):
        raise ValueError(f"unknown pad mode {mode!r}; expected reflect, replicate or zeros")
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop the bottom/right of a (B, C, H, W) tensor back to `size` (H, W)."""
    h, w = size
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    return x[..., :h, :w]


class DoubleConv(nn.Sequential):
    """Two 3x3 'same' convolutions, each followed by optional norm and an activation, with
    dropout between them (the layout of the classic Keras nuclei U-Net)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str | None = None,
        dropout: float = 0.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        # a bias before a norm layer is cancelled by the mean subtraction
        bias = norm in (None, "none")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            activation(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            make_norm(norm, out_channels),
            activation(inplace=True),
        ]
        super().__init__(*[layer for layer in layers if not isinstance(layer, nn.Identity)])


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU}


def activation_class(name: str) -> type[nn.Module]:
    """Map an activation name ("relu", "elu") to its module class."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
