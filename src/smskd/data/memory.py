"""In-memory datasets: a whole split as one tensor, batches made with tensor ops.

Small datasets fit in memory many times over; slicing a tensor per batch is far
cheaper than a per-image ``DataLoader``. Every batch is ``(x, y, index)`` so that
methods that key on sample identity (CRD's memory bank) need no special loader.
Training augmentation runs batched on the same device (:mod:`smskd.data.augment`);
DDP sharding follows ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from smskd.data.augment import Augment, Normalize, crop_flip, sample_params
from smskd.errors import UserError

# Seed offset between the loader's random streams (shuffle, augmentation).
_STREAM_STRIDE = 1 << 40


@dataclass(frozen=True)
class ArraySplit:
    """Raw pixels (``uint8``, N×C×H×W) and integer labels of one split; for text
    (:mod:`smskd.data.text`), token windows (``int64``, N×T) and their next tokens (N×T)."""

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

    def input_transform(self, device: torch.device | str = "cpu") -> Normalize:
        """Raw pixels → network inputs, with its constants on ``device``."""
        return Normalize(self.pixel_max, self.mean, self.std, device)


class InputSource(Protocol):
    """What :class:`InMemoryLoader` needs of a dataset: how stored inputs become network
    inputs (:class:`ArrayDataset`: normalization; text: the token ids as they are)."""

    def input_transform(self, device: torch.device | str = ...) -> Callable[[Tensor], Tensor]: ...


class InMemoryLoader:
    """Batches of ``(x, y, index)`` from an :class:`ArraySplit`, normalized on the fly.

    The whole split lives on ``device``; indices, augmentation and normalization run
    there, and ``index`` holds positions in the full split (what CRD's memory bank keys on).
    Normalization is ``dataset.input_transform(device)``: for text (N×T token windows,
    N×T next-token labels) the identity, and text takes no augmentation.

    **Order.** The order of epoch ``e`` depends only on ``(seed, e)``: call
    :meth:`set_epoch` (as with ``DistributedSampler``) and a resumed run sees the same
    batches. With ``world_size == 1`` and no augmentation the order is the one this loader
    always had.

    **Training** (``shuffle=True``) follows ``DistributedSampler``: every rank draws the
    same permutation, pads it by wrapping around to ``ceil(N / world_size) · world_size``
    samples, and takes every ``world_size``-th one from position ``rank``. Ranks therefore
    get disjoint, equal-size shards, except that when ``N`` is not divisible by
    ``world_size`` the permutation's first ``total_size − N`` samples are seen twice per
    epoch (more often only if ``N < world_size``).

    **Evaluation** (``shuffle=False``) never pads: rank ``r`` takes the ``r``-th of
    ``world_size`` contiguous, near-equal (±1 sample) slices, so the shards cover every
    sample exactly once and concatenating them in rank order gives the split's order.
    Ranks may then yield different numbers of batches: reduce sums after the loop,
    never run a collective per batch.

    **Augmentation** (``augment``; training only) crops and flips the raw pixels before
    normalization (:mod:`smskd.data.augment`). Its draws come from their own generator
    seeded from ``(seed, epoch)``, separate from the shuffle's, so enabling it does not
    change the order; they are drawn per *position* of the padded epoch permutation, so a
    sample at a given position is augmented the same way whatever ``world_size`` is.
    """

    def __init__(
        self,
        split: ArraySplit,
        dataset: InputSource,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        *,
        augment: Augment | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, {world_size=}")
        if augment is not None and not shuffle:
            # Augmenting evaluation batches would make metrics random: refuse, don't guess.
            raise ValueError("augment is for training loaders (shuffle=True)")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self.augment = None if augment is None or augment.is_identity else augment
        if self.augment is not None:
            if split.images.dim() != 4:
                raise ValueError("augment crops and flips images (N×C×H×W), not token windows")
            self.augment.check_fits(tuple(split.images.shape[2:]))
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)  # the full split: len() = training-set size
        self.normalize = dataset.input_transform(self.device)
        n = len(split)
        if shuffle:
            self.total_size = -(-n // world_size) * world_size  # padded epoch, all ranks
            self.num_samples = self.total_size // world_size
            self._shard_start = 0
        else:
            self.total_size = n
            base, extra = divmod(n, world_size)
            self.num_samples = base + (rank < extra)
            self._shard_start = rank * base + min(rank, extra)
        # Dropping the only, incomplete batch would leave an epoch with no step at all.
        self.drop_last = drop_last and self.num_samples > batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, stream: int) -> torch.Generator:
        # Stream 0 keeps the seed formula of earlier versions, so existing runs resume onto
        # the same order; other streams are offset far beyond any realistic epoch count.
        return torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch + stream * _STREAM_STRIDE
        )

    def _epoch_plan(self) -> tuple[Tensor, Tensor]:
        """This rank's positions in the padded epoch order, and the sample at each (CPU)."""
        n = len(self.labels)
        if not self.shuffle:
            positions = torch.arange(self._shard_start, self._shard_start + self.num_samples)
            return positions, positions
        order = torch.randperm(n, generator=self._generator(0))
        if self.total_size > n:  # wrap around, as DistributedSampler pads
            order = order.repeat(-(-self.total_size // n))[: self.total_size]
        positions = torch.arange(self.rank, self.total_size, self.world_size)
        return positions, order[positions]

    def epoch_indices(self) -> Tensor:
        """Sample indices this rank visits in the current epoch, in order (before drop_last)."""
        return self._epoch_plan()[1].to(self.device)

    @property
    def views(self) -> int:
        """How many different images one training sample can be (1 without augmentation;
        :attr:`Augment.views <smskd.data.augment.Augment.views>` with it)."""
        return 1 if self.augment is None else self.augment.views

    def every_sample(self, batch_size: int, view: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, index)`` over the whole split in order, every sample as view ``view``,
        on every rank: what a cache of per-sample outputs needs."""
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} is not in [0, {self.views})")
        for start in range(0, len(self.labels), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self.labels)))
            index = index.to(self.device)
            images = self.images[index]
            if self.augment is not None:
                params = self.augment.view_params(view, len(index))
                images = crop_flip(images, params, self.augment.crop_padding)
            yield self.normalize(images), index

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        """``(x, y, index)`` batches; augmented, ``(x, y, index, view)``, where ``view``
        says which of the :attr:`views` each sample is (what a cache is read by)."""
        positions, order = self._epoch_plan()
        order = order.to(self.device)  # one transfer per epoch, not per batch
        params = None
        if self.augment is not None:
            # Drawn for the whole padded epoch on the CPU, then this rank's positions:
            # identical on every device and for every world_size.
            drawn = sample_params(self.total_size, self.augment, self._generator(1))
            params = drawn[positions].to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if params is not None and self.augment is not None:
                batch_params = params[start : start + self.batch_size]
                images = crop_flip(images, batch_params, self.augment.crop_padding)
                view = self.augment.view_ids(batch_params)
                yield self.normalize(images), self.labels[index], index, view
            else:
                yield self.normalize(images), self.labels[index], index


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask holding ``round(test_fraction · n_c)`` samples of every class c."""
    classes, sizes = np.unique(labels, return_counts=True)
    return _pick(labels, classes, [round(test_fraction * int(n)) for n in sizes], seed)


def stratified_subset(split: ArraySplit, size: int, seed: int = 0) -> ArraySplit:
    """A fixed subset of exactly ``size`` samples (the whole split if it is not larger)
    with the split's class proportions: class c gives ``n_c · size / N`` samples, rounded
    so that the counts add up (largest remainders round up; ties: the lower class)."""
    if size >= len(split):
        return split
    return stratified_holdout(split, size, seed)[0]


def stratified_holdout(split: ArraySplit, size: int, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """``split`` cut in two: a class-stratified random part of ``size`` samples (as
    :func:`stratified_subset` picks it) and the rest, both in the split's order."""
    labels = split.labels.numpy()
    classes, sizes = np.unique(labels, return_counts=True)
    quotas = sizes * size / len(split)
    counts = np.floor(quotas).astype(np.int64)
    counts[np.argsort(counts - quotas, kind="stable")[: size - counts.sum()]] += 1
    mask = _pick(labels, classes, counts, seed)
    part, rest = (torch.from_numpy(np.flatnonzero(m)) for m in (mask, ~mask))
    return (
        ArraySplit(split.images[part], split.labels[part]),
        ArraySplit(split.images[rest], split.labels[rest]),
    )


def _pick(labels: np.ndarray, classes: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Mask of ``counts[i]`` random samples of each class ``classes[i]``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c, count in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == c)
        mask[rng.permutation(members)[:count]] = True
    return mask


def check_batch_size(batch_size: int, num_train: int) -> None:
    """Refuse a batch larger than the training split: it would hold the whole split
    (or, with drop_last, give no batch at all) while the config promises another size."""
    if batch_size > num_train:
        raise UserError(
            f"data.batch_size {batch_size} is larger than the {num_train} training images; "
            f"use at most {num_train}"
        )
