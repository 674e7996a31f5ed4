"""Lesion classifier: a small CNN over the image concatenated with its lesion mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class LesionClassifier(nn.Module):
    """CNN classifier of (image, mask) pairs.

    The mask is concatenated to the image as an extra channel; each stage is two 3x3
    conv-BN-ReLU layers, stages after the first start with a 2x2 max-pool (ceil mode, so any
    H, W >= 1 works). The head concatenates the global average of the last features, their
    average inside the (downsampled) mask, and the mask's area fraction, then dropout + linear.

    Args:
        in_channels: image channels (the mask adds one).
        num_classes: number of output logits.
        widths: features per stage.
        dropout: dropout before the linear layer.
        mask_pooling: include the mask-pooled features and the area fraction in the head.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.3,
        mask_pooling: bool = True,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("LesionClassifier needs at least one stage (widths)")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mask_pooling = mask_pooling
        stages: list[nn.Module] = []
        prev = in_channels + 1
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            layers += _conv_bn_relu(prev, width) + _conv_bn_relu(width, width)
            stages.append(nn.Sequential(*layers))
            prev = width
        self.features = nn.Sequential(*stages)
        head_in = 2 * prev + 1 if mask_pooling else prev
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head_in, num_classes)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """image (B, in_channels, H, W) float, mask (B, 1, H, W) in [0, 1] -> logits (B, num_classes)."""
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}"
            )
        mask = mask.to(image.dtype)
        feats = self.features(torch.cat([image, mask], dim=1))
        pooled = feats.mean(dim=(2, 3))
        if self.mask_pooling:
            weights = F.adaptive_avg_pool2d(mask, feats.shape[-2:])
            area = weights.sum(dim=(2, 3))
            # An empty mask gives zero mask-pooled features (rather than NaN).
            inside = (feats * weights).sum(dim=(2, 3)) / area.clamp_min(1e-6)
            fraction = mask.mean(dim=(2, 3))
            pooled = torch.cat([pooled, inside.to(pooled.dtype), fraction.to(pooled.dtype)], dim=1)
        return self.fc(self.dropout(pooled))
