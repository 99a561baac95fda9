"""What every KD method sees and what it must provide."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn


@dataclass
class Outputs:
    """One batch as a method sees it. Teacher tensors carry no autograd history."""

    student_logits: Tensor
    teacher_logits: Tensor
    labels: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None


class DistillMethod(nn.Module):
    """Base class of a KD method: one job, turn :class:`Outputs` into a loss.

    ``loss`` returns shape ``[B]`` when the method is defined per sample, or a
    scalar when it is defined over the batch (relations between samples). The
    method never calls the models, owns no optimizer and does not move devices;
    trainable helpers (regressors...) are ``nn.Module`` children created in
    :meth:`setup`, and they live and die with their stage.

    ``tap_roles`` maps a constructor argument naming a module to the default it
    takes from the model's :class:`~smskd.taps.ModelLayout`:
    ``{"student_layer": ("student", "hint")}``.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # "response" | "feature" | "relation"
    citation: ClassVar[str]
    default_weight: ClassVar[float] = 1.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {}

    def student_taps(self) -> list[str]:
        return self._taps("student")

    def teacher_taps(self) -> list[str]:
        return self._taps("teacher")

    def _taps(self, side: str) -> list[str]:
        return [getattr(self, arg) for arg, (who, _) in self.tap_roles.items() if who == side]

    def setup(self, probe: Outputs) -> None:
        """Create helpers whose shapes depend on the tapped features (called once)."""

    def loss(self, out: Outputs) -> Tensor:
        raise NotImplementedError
