"""Small differentiable pieces that several KD methods (and the reference loss) share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(softmax(target/τ) ‖ softmax(student/τ)) · τ²``, shape ``[B]``.

    The τ² factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al. 2015, §2).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_target = F.log_softmax(target_logits / temperature, dim=1)
    kl = (log_p_target.exp() * (log_p_target - log_p_student)).sum(dim=1)
    return kl * temperature**2


MIN_ROW_NORM = 1e-6


def unit_rows(x: Tensor, min_norm: float = MIN_ROW_NORM) -> Tensor:
    """Rows of the 2-d ``x`` scaled to unit L2 norm; rows with norm below ``min_norm`` give 0.

    Rows at or above ``min_norm`` get exactly ``F.normalize``'s value and gradient. Below
    it a row has no usable direction: ``F.normalize`` divides it by ``max(‖x‖, 1e-12)``,
    so an all-zero row (e.g. a dead-ReLU embedding) sends back ~1e12 times its incoming
    gradient. Here such a row is 0, as ``F.normalize`` makes an all-zero row, but passes
    no gradient. Just above ``min_norm`` gradients still grow like 1/‖x‖ (at most ~1e6
    times), as they must for a loss that sees only directions.
    """
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm >= min_norm, x / norm.clamp_min(min_norm), torch.zeros_like(x))
