"""Vanilla knowledge distillation on softened logits."""

from __future__ import annotations

from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.functional import soft_kl
from smskd.methods.registry import register_method


@register_method
class KD(DistillMethod):
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015, arXiv:1503.02531).

    Per sample: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` with τ = 4, the temperature
    used for CIFAR-100 by CRD/RepDistiller and mdistiller. The CE term on labels
    is added by the stage (``ce_weight``), not here.
    """

    name = "kd"
    family = "response"
    citation = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def loss(self, out: Outputs) -> Tensor:
        return soft_kl(out.student_logits, out.teacher_logits, self.temperature)
