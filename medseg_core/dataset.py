"""A map-style torch Dataset over layout records, for in-process runs (the demo, baselines and
accuracy benchmarks). Ray Data jobs use the same `load_record` + transforms in `map_batches`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from medseg_core.layouts import Record, load_record
from medseg_core.transforms import to_channels

Sample = dict[str, Any]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The random stream of one sample in one epoch: the same wherever the sample is processed
    (any worker, any order), so augmentation is reproducible and reseeded per epoch."""
    digest = np.frombuffer(key.encode("utf-8"), dtype=np.uint8)
    return np.random.default_rng([seed, epoch, *digest.tolist()])


class RecordDataset(torch.utils.data.Dataset):
    """Decodes a record and applies a joint transform; `set_epoch` changes the augmentation.

    Grey images are decoded as one plane and repeated to `channels` after the transform
    (`keep_grey` in `medseg_core.io.decode_image`). `loader` replaces `load_record` (e.g. a
    reader of packed archives; it may return a grey plane too); it must be picklable for
    DataLoader workers.
    """

    def __init__(self, records: Sequence[Record], transform: Callable[..., Sample] | None = None,
                 *, seed: int = 0, storage_options: dict | None = None, channels: int = 3,
                 loader: Callable[[Record], Sample] | None = None):
        self.records = list(records)
        self.transform = transform
        self.loader = loader
        self.seed = seed
        self.epoch = 0
        self.storage_options = storage_options
        self.channels = channels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        if self.loader is not None:
            sample = self.loader(record)
        else:
            sample = load_record(record, storage_options=self.storage_options,
                                 channels=self.channels, keep_grey=True)
        if self.transform is not None:
            sample = self.transform(sample, sample_rng(self.seed, self.epoch, record.id))
        return {**sample, "image": to_channels(sample["image"], self.channels)}


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack equally sized samples into the batch dict the engine consumes (ids dropped)."""
    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
        "mask": torch.from_numpy(np.stack([s["mask"] for s in samples])),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
    }
