"""Per-sample outputs of a frozen network, computed once and read by sample index.

Without augmentation a training image is the same tensor every epoch, and the
teacher (eval mode, frozen) maps it to the same logits and features; so does the
reference within its stage. Computing them once per stage and gathering rows by
the batch's sample indices removes those forwards from every later step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.models.taps import FeatureTaps
from smskd.train.acceleration import Acceleration


@dataclass
class CachedOutputs:
    """Row ``i`` of every tensor is sample ``i``'s output (stored as the forward made it)."""

    logits: Tensor
    features: dict[str, Tensor]

    def take(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.logits[index], {name: value[index] for name, value in self.features.items()}

    @property
    def nbytes(self) -> int:
        tensors = [self.logits, *self.features.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def cache_outputs(
    model: nn.Module,
    taps: FeatureTaps | None,
    loader: object,
    acceleration: Acceleration,
    *,
    max_bytes: float,
    batch_size: int = 256,
    what: str = "teacher",
) -> CachedOutputs:
    """Run ``model`` over every training sample of ``loader`` once (no grad, eval mode).

    ``loader`` must offer ``every_sample(batch_size)`` and ``len(loader.labels)``, as
    :class:`~smskd.data.memory.InMemoryLoader` does. Refuses before filling anything
    when the outputs would need more than ``max_bytes``.
    """
    every_sample = getattr(loader, "every_sample", None)
    if every_sample is None:
        raise UserError(
            "performance.cache_teacher needs an in-memory training set (smskd.data.memory."
            f"InMemoryLoader), not a {type(loader).__name__}; turn the cache off"
        )
    try:
        batches: Iterable[tuple[Tensor, Tensor]] = every_sample(batch_size)
    except ValueError as err:  # an augmented loader
        raise UserError(
            f"performance.cache_teacher: {err}; set data.augment: false or turn the cache off"
        ) from None
    total = len(loader.labels)  # type: ignore[attr-defined]
    cache: CachedOutputs | None = None
    model.eval()
    with torch.no_grad():
        for x, index in batches:
            with acceleration.autocast():
                logits = model(acceleration.inputs(x))
            features = dict(taps.features) if taps is not None else {}
            if cache is None:
                cache = _allocate(logits, features, total, max_bytes, what)
            cache.logits[index] = logits
            for name, value in features.items():
                cache.features[name][index] = value
    if cache is None:
        raise UserError("the training data has no samples to cache outputs for")
    return cache


def _allocate(
    logits: Tensor, features: dict[str, Tensor], total: int, max_bytes: float, what: str
) -> CachedOutputs:
    per_sample = sum(t[0].numel() * t.element_size() for t in [logits, *features.values()])
    if per_sample * total > max_bytes:
        raise UserError(
            f"performance.cache_teacher: the {what}'s outputs for {total} samples need "
            f"{per_sample * total / 2**30:.2f} GiB, more than the {max_bytes / 2**30:.2f} GiB "
            "left of performance.cache_max_gib; raise it or turn the cache off"
        )

    def empty(like: Tensor) -> Tensor:
        return like.new_empty((total, *like.shape[1:]))

    return CachedOutputs(empty(logits), {name: empty(v) for name, v in features.items()})
