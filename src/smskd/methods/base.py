"""What every KD method sees and what it must provide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from smskd.errors import UserError

BATCH_MEMORY_LIMIT = 16 * 2**30
"""Bytes the KD methods of a stage may need for one batch, by their own estimate
(:meth:`DistillMethod.batch_memory`), before a stage is refused: more than most
accelerators hold, so a larger need is a batch size chosen by mistake."""

MAX_HELPER_WIDTH = 8192
"""Most units a width option of a trainable helper may ask for (CRD's ``feat_dim``, CC's
``embed_dim``, VID's ``hidden_channels``): four times the widest usual embedding (2048),
while VID's hidden×hidden weights stay at 256 MiB."""


def check_width(option: str, value: int | None) -> None:
    """Raise ValueError for a helper width over :data:`MAX_HELPER_WIDTH`."""
    if value is not None and value > MAX_HELPER_WIDTH:
        raise ValueError(
            f"{option} {value} is over the limit of {MAX_HELPER_WIDTH} "
            "(smskd.methods.base.MAX_HELPER_WIDTH)"
        )


@dataclass
class Outputs:
    """One batch as a method sees it. Teacher tensors carry no autograd history.

    ``index`` holds the dataset positions of the samples when the loader yields
    ``(x, y, index)`` (every smskd dataset does); methods that key on sample
    identity declare ``needs_index``.

    Sequences (language models): ``token_mask`` ``[B, T]`` is True at the positions
    inside the losses (padding is not). Logits and labels are then already reduced to
    those tokens (``[N, V]`` and ``[N]``), so a per-sample loss is a per-token loss and
    every response method works unchanged; features keep the model's own shapes
    (``[B, T, D]``, attention ``[B, H, T, T]``) and a method reduces them with the mask.
    """

    student_logits: Tensor
    teacher_logits: Tensor
    labels: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None
    token_mask: Tensor | None = None


@dataclass(frozen=True)
class StageContext:
    """What a method may need to know about its stage when it builds helpers."""

    epochs: int
    num_samples: int | None = None  # training-set size, for memory banks over indices
    num_classes: int | None = None


class DistillMethod(nn.Module):
    """Base class of a KD method: one job, turn :class:`Outputs` into a loss.

    ``loss`` returns shape ``[B]`` when the method is defined per sample, or a
    scalar when it is defined over the batch (relations between samples). The
    method never calls the models, owns no optimizer and does not move devices;
    trainable helpers (regressors, embeddings, memory buffers) are ``nn.Module``
    children or buffers created in :meth:`setup`, and they live and die with
    their stage.

    ``tap_roles`` maps a constructor argument naming a module (or a list of
    modules) to the default it takes from the model's
    :class:`~smskd.models.taps.ModelLayout`: ``{"student_layer": ("student", "hint")}``.
    A hyper-parameter that follows a schedule within the stage (a warm-up) is
    updated in :meth:`start_epoch`, so the engine needs no special cases. A method
    whose memory grows faster than the batch says how much in :meth:`batch_memory`.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # "response" | "feature" | "relation"
    citation: ClassVar[str]
    helpers: ClassVar[str] = ""  # the trainable parts setup() creates, for `smskd methods`
    default_weight: ClassVar[float] = 1.0
    needs_index: ClassVar[bool] = False
    # Reads a transformer's per-token features (hidden states, attention): language models only.
    needs_sequences: ClassVar[bool] = False
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {}

    def student_taps(self) -> list[str]:
        return self._taps("student")

    def teacher_taps(self) -> list[str]:
        return self._taps("teacher")

    def _taps(self, side: str) -> list[str]:
        taps: list[str] = []
        for arg, (who, _) in self.tap_roles.items():
            if who == side:
                value = getattr(self, arg)
                taps.extend([value] if isinstance(value, str) else value)
        return taps

    def setup(self, probe: Outputs, context: StageContext) -> None:
        """Create helpers whose shapes depend on the tapped features (called once)."""

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        """Estimated bytes one loss and its backward need for a batch of ``batch_size``,
        when that grows faster than the batch (B×B relations) or is large up front
        (memory banks); 0, the default, when it grows with the batch like the networks'
        own activations. ``probe`` (any batch size) gives the features' widths.
        Checked against :data:`BATCH_MEMORY_LIMIT` before :meth:`setup`."""
        return 0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based) of the stage; update scheduled values here."""

    def loss(self, out: Outputs) -> Tensor:
        raise NotImplementedError


def check_batch_memory(
    methods: list[DistillMethod], batch_size: int, probe: Outputs, context: StageContext
) -> None:
    """Refuse a batch whose estimated need, summed over ``methods``, exceeds
    :data:`BATCH_MEMORY_LIMIT`, naming the largest batch that fits."""

    def need(batch: int) -> int:
        return sum(m.batch_memory(batch, probe, context) for m in methods)

    if need(batch_size) <= BATCH_MEMORY_LIMIT:
        return
    fits, too_big = 0, batch_size  # estimates grow with the batch: bisect
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        fits, too_big = (middle, too_big) if need(middle) <= BATCH_MEMORY_LIMIT else (fits, middle)
    names = [repr(m.name) for m in methods if m.batch_memory(batch_size, probe, context)]
    who = f"method {names[0]} needs" if len(names) == 1 else f"methods {', '.join(names)} need"
    fix = (
        f"the largest batch that fits is {fits}: lower data.batch_size"
        if fits
        else "no batch fits: lower the methods' size options (feat_dim, num_negatives)"
    )
    raise UserError(
        f"{who} about {need(batch_size) / 2**30:.1f} GiB for a batch of {batch_size} "
        f"(data.batch_size), over the limit of {BATCH_MEMORY_LIMIT / 2**30:.0f} GiB "
        f"(smskd.methods.base.BATCH_MEMORY_LIMIT); {fix}"
    )
