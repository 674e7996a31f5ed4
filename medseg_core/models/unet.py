"""Classic U-Net (Ronneberger et al. 2015) in the layout of the widely copied Keras nuclei
U-Net: two 3x3 'same' convolutions per level with dropout between them, 2x2 max-pool down,
2x2 stride-2 transposed convolution up, skip concatenation, 1x1 head producing logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import DoubleConv, activation_class, crop_to, pad_to_multiple, per_level


class UNet(nn.Module):
    """U-Net with `len(widths)` levels (so `len(widths) - 1` poolings).

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary segmentation).
        widths: feature channels per level, shallow to deep.
        norm: None, "batch" or "instance" after every 3x3 conv (convs lose their bias with a norm).
        dropout: one value for all levels or one per level; the decoder level reuses the
            dropout of the encoder level at the same depth.
        activation: "relu" or "elu" (the Keras original uses elu).
        pad_mode: how inputs whose sides are not a multiple of 2**(levels-1) are padded before
            the network ("reflect", "replicate", "zeros"); the output is cropped back.

    With widths (16, 32, 64, 128, 256), no norm and 3 input channels the model has 1,941,105
    parameters, the same as the Keras original.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str | None = None,
        dropout: float | Sequence[float] = 0.0,
        activation: str = "relu",
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two levels (widths)")
        drops = per_level(dropout, len(widths))
        act = activation_class(activation)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pad_mode = pad_mode
        self.stride = 2 ** (len(widths) - 1)
        # Norm layers need more than one value per channel in training: keep the bottleneck >= 2x2.
        self.min_size = self.stride * (1 if norm in (None, "none") else 2)

        self.encoder = nn.ModuleList()
        prev = in_channels
        for width, drop in zip(widths, drops):
            self.encoder.append(DoubleConv(prev, width, norm, drop, act))
            prev = width
        self.pool = nn.MaxPool2d(2)

        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            self.ups.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            self.decoder.append(
                DoubleConv(2 * widths[level], widths[level], norm, drops[level], act)
            )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) float -> logits (B, out_channels, H, W), any H, W."""
        x, size = pad_to_multiple(x, self.stride, self.pad_mode, self.min_size)
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i, (up, block) in enumerate(zip(self.ups, self.decoder)):
            skip = self.gate_skip(i, skips.pop(), x)
            x = block(torch.cat([up(x), skip], dim=1))
        return crop_to(self.head(x), size)

    def gate_skip(self, step: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The skip features that decoder step `step` concatenates, given the coarser features
        `coarse` before upsampling: unchanged here, attention-gated in `AttentionUNet`."""
        return skip
