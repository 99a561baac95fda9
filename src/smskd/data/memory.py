"""In-memory datasets: a whole split as one tensor, batches made with tensor ops.

Small datasets fit in memory many times over; slicing a tensor per batch is far
cheaper than a per-image ``DataLoader``. Every batch is ``(x, y, index)`` so that
methods that key on sample identity (CRD's memory bank) need no special loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ArraySplit:
    """Raw pixels (``uint8``, N×C×H×W) and integer labels of one split."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ArrayDataset:
    """Train and test splits plus how to turn pixels into network inputs."""

    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    pixel_max: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])  # type: ignore[return-value]


class InMemoryLoader:
    """Batches of ``(x, y, index)`` from an :class:`ArraySplit`, normalized on the fly.

    The order of epoch ``e`` depends only on ``(seed, e)``: call :meth:`set_epoch`
    (as with ``DistributedSampler``) and a resumed run sees the same batches.
    """

    def __init__(
        self,
        split: ArraySplit,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last and len(split) > batch_size
        self.epoch = 0
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        shape = (1, -1, 1, 1)
        self._scale = torch.tensor(dataset.std, device=self.device).view(shape) * dataset.pixel_max
        self._shift = torch.tensor(dataset.mean, device=self.device).view(shape) * dataset.pixel_max

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            x = (self.images[index].float() - self._shift) / self._scale
            yield x, self.labels[index], index
