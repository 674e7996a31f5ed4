"""Mask post-processing: keep only the largest connected lesion.

nnU-Net's "remove all but the largest foreground component", decided per segmentation bundle on
the validation split (`pipelines/train.py`, `train.postprocess`) and stored in the bundle's
``inference.keep_largest``, so every consumer of the bundle (evaluation, the batch job, Serve)
applies it alike. Connected components are found with batched torch ops on the masks' device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _run_max(labels: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Every pixel of a horizontal foreground run takes the run's largest label."""
    b, h, w = labels.shape
    # the left neighbour, background in column 0: a run never continues across a row end
    prev = F.pad(fg[..., :-1], (1, 0), value=False)
    start = fg & ~prev
    run = torch.cumsum(start.reshape(-1).to(torch.int64), 0) * fg.reshape(-1)
    best = torch.zeros(int(run.max()) + 1, dtype=labels.dtype, device=labels.device)
    best = best.scatter_reduce(0, run, labels.reshape(-1), reduce="amax")
    return best[run].view(b, h, w) * fg


def component_labels(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> float64 (B, H, W) labels of the 8-connected components.

    0 is background; each component carries the largest 1-based flat index of its pixels.
    Labels spread along horizontal and vertical runs, then one pixel diagonally (3x3 max-pool),
    until nothing changes: a few rounds for blob-like lesions.
    """
    if mask.dim() != 3:
        raise ValueError(f"expected a (B, H, W) mask, got shape {tuple(mask.shape)}")
    b, h, w = mask.shape
    fg = mask.bool()
    fg_t = fg.transpose(1, 2).contiguous()
    index = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float64).view(1, h, w)
    labels = torch.where(fg, index, torch.zeros((), dtype=torch.float64, device=mask.device))
    if not bool(fg.any()):
        return labels
    while True:
        before = labels
        labels = _run_max(labels, fg)
        labels = _run_max(labels.transpose(1, 2).contiguous(), fg_t).transpose(1, 2)
        labels = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * fg
        if torch.equal(labels, before):
            return labels.contiguous()


def keep_largest(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool -> bool, each mask reduced to its largest 8-connected component
    (ties: the component holding the later pixel in raster order). Empty masks stay empty."""
    labels = component_labels(mask)
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    for i in range(labels.shape[0]):
        fg = labels[i][labels[i] > 0]
        if fg.numel() == 0:
            continue
        values, counts = torch.unique(fg, return_counts=True)
        best = counts == counts.max()
        out[i] = labels[i] == values[best].max()
    return out


def zero_outside_largest(prob: np.ndarray, threshold: float) -> None:
    """Zero, in place, an (H, W) probability map outside the largest component of its mask at
    `threshold` (`keep_largest`)."""
    prob *= keep_largest(torch.from_numpy(prob[None]) > threshold)[0].numpy()
