"""Improved U-Net of Isensee et al. 2017 ("Brain tumor segmentation and radiomics survival
prediction: contribution to the BRATS 2017 challenge"), in 2D.

Encoder: a 3x3 conv (stride 1 at the top level, stride 2 below) followed by a residual context
module (pre-activation: norm, leaky ReLU, 3x3 conv, dropout, norm, leaky ReLU, 3x3 conv).
Decoder: upsampling modules (nearest x2 upscale + 3x3 conv halving the features), skip
concatenation, localization modules (3x3 conv + 1x1 conv halving the features) and
segmentation layers (1x1 convs) at several scales whose outputs are upscaled and summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import crop_to, make_norm, pad_to_multiple

_SLOPE = 0.01


def _norm_act(norm: str | None, channels: int) -> nn.Sequential:
    # Not in place: without a norm layer the input itself would be overwritten.
    return nn.Sequential(make_norm(norm, channels), nn.LeakyReLU(_SLOPE))


class ContextModule(nn.Module):
    """Residual pre-activation block: x + conv(act(norm(drop(conv(act(norm(x))))))."""

    def __init__(self, channels: int, norm: str | None, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            make_norm(norm, channels),
            nn.LeakyReLU(_SLOPE),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            make_norm(norm, channels),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsamplingModule(nn.Sequential):
    """Nearest-neighbour x2 upscale, then a 3x3 conv to `out_channels`, norm, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            make_norm(norm, out_channels),
            nn.LeakyReLU(_SLOPE, inplace=True),
        )


class LocalizationModule(nn.Sequential):
    """3x3 conv keeping the (concatenated) features, then a 1x1 conv halving them."""

    def __init__(self, in_channels: int, out_channels: int, norm: str | None) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            make_norm(norm, in_channels),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv2d(in_channels, out_channels, 1),
            make_norm(norm, out_channels),
            nn.LeakyReLU(_SLOPE, inplace=True),
        )


class ImprovedUNet(nn.Module):
    """Isensee et al. 2017 U-Net (2D).

    Args:
        in_channels, out_channels: image channels and logit channels.
        widths: features per level, shallow to deep (paper: 16, 32, 64, 128, 256).
        norm: "instance" (paper), "batch" or None.
        dropout: dropout probability inside the context modules (paper: 0.3).
        seg_levels: number of segmentation layers, at the top `seg_levels` decoder levels
            (paper and default: 3, or levels - 1 if fewer); their upscaled outputs are summed
            into the final logits.
        deep_supervision: if True, `forward` in train() mode returns a list of logits
            `[main, aux_1, ...]`, all at input resolution: the main (summed) output first, then
            the partial sums of the coarser segmentation layers, finest first. In eval() mode
            (and when False) it returns the main logits Tensor.
        pad_mode: padding of inputs whose sides are not a multiple of 2**(levels-1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str | None = "instance",
        dropout: float = 0.3,
        seg_levels: int | None = None,
        deep_supervision: bool = False,
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        levels = len(widths)
        if levels < 2:
            raise ValueError("ImprovedUNet needs at least two levels (widths)")
        if seg_levels is None:
            seg_levels = min(3, levels - 1)
        if not 1 <= seg_levels <= levels - 1:
            raise ValueError(f"seg_levels must be between 1 and {levels - 1}, got {seg_levels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision
        self.seg_levels = seg_levels
        self.pad_mode = pad_mode
        self.stride = 2 ** (levels - 1)

        self.down = nn.ModuleList()
        self.context = nn.ModuleList()
        prev = in_channels
        for i, width in enumerate(widths):
            self.down.append(nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1))
            self.context.append(ContextModule(width, norm, dropout))
            prev = width
        # The context modules end in a conv (pre-activation), so skips and the bottleneck are
        # normalised and activated before the decoder uses them.
        self.skip_act = nn.ModuleList(_norm_act(norm, w) for w in widths)

        self.up = nn.ModuleList()
        self.local = nn.ModuleList()
        self.seg = nn.ModuleDict()
        for level in range(levels - 2, -1, -1):
            self.up.append(UpsamplingModule(widths[level + 1], widths[level], norm))
            if level > 0:
                self.local.append(LocalizationModule(2 * widths[level], widths[level], norm))
                seg_in = widths[level]
            else:  # top level: a single 3x3 conv on the concatenation (as in the paper)
                self.local.append(
                    nn.Sequential(
                        nn.Conv2d(2 * widths[0], 2 * widths[0], 3, padding=1),
                        *_norm_act(norm, 2 * widths[0]),
                    )
                )
                seg_in = 2 * widths[0]
            if level < seg_levels:
                self.seg[str(level)] = nn.Conv2d(seg_in, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, in_channels, H, W) -> logits (B, out_channels, H, W), or a list of such logits
        (main first) in train() mode with deep supervision."""
        # Instance norm needs more than one pixel per channel, so the bottleneck is at least 2x2.
        x, size = pad_to_multiple(x, self.stride, self.pad_mode, min_size=2 * self.stride)
        skips = []
        for down, context, act in zip(self.down, self.context, self.skip_act):
            x = context(down(x))
            skips.append(act(x))
        x = skips.pop()
        level = len(skips)
        partial: torch.Tensor | None = None
        partials: list[torch.Tensor] = []
        for up, local in zip(self.up, self.local):
            level -= 1
            x = local(torch.cat([up(x), skips.pop()], dim=1))
            if str(level) in self.seg:
                seg = self.seg[str(level)](x)
                if partial is not None:
                    seg = seg + F.interpolate(partial, scale_factor=2.0, mode="nearest")
                partial = seg
                partials.append(partial)
        main = crop_to(partial, size)
        if not (self.deep_supervision and self.training):
            return main
        padded = partial.shape[-2:]
        aux = [
            crop_to(F.interpolate(p, size=padded, mode="bilinear", align_corners=False), size)
            for p in reversed(partials[:-1])
        ]
        return [main, *aux]
