"""Vanilla knowledge distillation on softened logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs


def soft_kl(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(softmax(target/τ) ‖ softmax(student/τ)) · τ²``, shape ``[B]``.

    The τ² factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al. 2015, §2).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_target = F.log_softmax(target_logits / temperature, dim=1)
    kl = (log_p_target.exp() * (log_p_target - log_p_student)).sum(dim=1)
    return kl * temperature**2


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
