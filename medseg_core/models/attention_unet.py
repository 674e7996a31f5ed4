"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the
pancreas"): a U-Net whose skip connections pass through additive attention gates driven by the
coarser decoder features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DoubleConv, activation_class, crop_to, make_norm, pad_to_multiple, per_level


class AttentionGate(nn.Module):
    """Additive attention gate (grid attention as in the paper's reference code).

    The skip `x` is projected by a 2x2 stride-2 conv to the gating signal's resolution, the
    gating signal `g` by a 1x1 conv; relu(sum) -> 1x1 conv -> sigmoid gives one coefficient per
    coarse pixel, which is upsampled bilinearly and multiplies `x`; a 1x1 conv + norm follows.
    """

    def __init__(
        self, x_channels: int, g_channels: int, inter_channels: int, norm: str | None = "batch"
    ) -> None:
        super().__init__()
        self.theta = nn.Conv2d(x_channels, inter_channels, 2, stride=2, bias=False)
        self.phi = nn.Conv2d(g_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)
        self.out = nn.Sequential(nn.Conv2d(x_channels, x_channels, 1), make_norm(norm, x_channels))

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients in [0, 1], shape (B, 1, H, W) at the resolution of `x`."""
        theta = self.theta(x)
        phi = self.phi(g)
        if phi.shape[-2:] != theta.shape[-2:]:
            phi = F.interpolate(phi, size=theta.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta + phi)))
        return F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.out(x * self.coefficients(x, g))


class AttentionUNet(nn.Module):
    """U-Net (double 3x3 convs, max-pool, transposed-conv up) with attention-gated skips.

    Args mirror `UNet`; `norm` defaults to "batch" as in the paper. Any H, W is accepted
    (padded to a multiple of 2**(levels-1) and cropped back).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str | None = "batch",
        dropout: float | Sequence[float] = 0.0,
        activation: str = "relu",
        pad_mode: str = "reflect",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("AttentionUNet needs at least two levels (widths)")
        drops = per_level(dropout, len(widths))
        act = activation_class(activation)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pad_mode = pad_mode
        self.stride = 2 ** (len(widths) - 1)
        # Norm layers need more than one value per channel in training: keep the bottleneck >= 2x2.
        self.min_size = self.stride * (1 if norm is None else 2)

        self.encoder = nn.ModuleList()
        prev = in_channels
        for width, drop in zip(widths, drops):
            self.encoder.append(DoubleConv(prev, width, norm, drop, act))
            prev = width
        self.pool = nn.MaxPool2d(2)

        self.gates = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            w, coarse = widths[level], widths[level + 1]
            self.gates.append(AttentionGate(w, coarse, max(w // 2, 1), norm))
            self.ups.append(nn.ConvTranspose2d(coarse, w, 2, stride=2))
            self.decoder.append(DoubleConv(2 * w, w, norm, drops[level], act))
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
        for gate, up, block in zip(self.gates, self.ups, self.decoder):
            skip = gate(skips.pop(), x)
            x = block(torch.cat([up(x), skip], dim=1))
        return crop_to(self.head(x), size)
