"""What every KD method sees and what it must provide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn


@dataclass
class Outputs:
    """One batch as a method sees it. Teacher tensors carry no autograd history.

    ``index`` holds the dataset positions of the samples when the loader yields
    ``(x, y, index)`` (every smskd dataset does); methods that key on sample
    identity declare ``needs_index``.
    """

    student_logits: Tensor
    teacher_logits: Tensor
    labels: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None


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
    :class:`~smskd.taps.ModelLayout`: ``{"student_layer": ("student", "hint")}``.
    A hyper-parameter that follows a schedule within the stage (a warm-up) is
    updated in :meth:`start_epoch`, so the engine needs no special cases.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # "response" | "feature" | "relation"
    citation: ClassVar[str]
    helpers: ClassVar[str] = ""  # the trainable parts setup() creates, for `smskd methods`
    default_weight: ClassVar[float] = 1.0
    needs_index: ClassVar[bool] = False
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

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (0-based) of the stage; update scheduled values here."""

    def loss(self, out: Outputs) -> Tensor:
        raise NotImplementedError
