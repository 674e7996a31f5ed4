"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: learning where to look for the
pancreas"): a U-Net whose skip connections pass through additive attention gates driven by the
coarser decoder features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import make_norm
from .unet import UNet


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


class AttentionUNet(UNet):
    """`UNet` (double 3x3 convs, max-pool, transposed-conv up) with attention-gated skips.

    Args as `UNet`; `norm` defaults to "batch" as in the paper.
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
        super().__init__(in_channels, out_channels, widths, norm, dropout, activation, pad_mode)
        widths = tuple(int(w) for w in widths)
        self.gates = nn.ModuleList(
            AttentionGate(widths[level], widths[level + 1], max(widths[level] // 2, 1), norm)
            for level in range(len(widths) - 2, -1, -1)
        )

    def gate_skip(self, step: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.gates[step](skip, coarse)
