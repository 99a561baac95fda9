"""Decoupled knowledge distillation: target-class and non-target-class KD apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def _split(log_p: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log p_t``, ``log(1 − p_t)`` and ``log p̂`` (0 at the target, where p̂ is undefined)."""
    log_target = log_p.masked_select(is_target)
    log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
    # A teacher with p_t = 1 exactly (every other logit −inf) has log_rest = −inf; the
    # floor keeps −inf − log_rest at −inf (p̂ = 0, so no NCKD) instead of NaN.
    log_rest = log_rest.clamp_min(torch.finfo(log_p.dtype).min)
    # Zeroing the target entry makes its term vanish; left as is it would hold
    # p_t/(1 − p_t), which overflows for a confident teacher.
    log_hat = (log_p - log_rest.unsqueeze(1)).masked_fill(is_target, 0.0)
    return log_target, log_rest, log_hat


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``p·(log p − log q)`` elementwise, 0 where ``p = 0`` even if ``log p = −inf``."""
    p = log_p.exp()
    return torch.xlogy(p, p) - p * log_q


@register_method
class DKD(DistillMethod):
    """Decoupled KD (Zhao et al., CVPR 2022, arXiv:2203.08679).

    With ``p = softmax(z/τ)`` and ``t`` the label, per sample:
    ``w · τ² · (α·TCKD + β·NCKD)`` where TCKD = ``KL(b_T ‖ b_S)`` on the binary
    target/non-target masses ``b = (p_t, 1 − p_t)``, and NCKD = ``KL(p̂_T ‖ p̂_S)`` on
    the distribution among the non-target classes, ``p̂_k = p_k / (1 − p_t)`` for
    k ≠ t (the softmax of the logits with the target masked out). Defaults α = 1,
    β = 8, τ = 4, warm-up 20: mdistiller's (the paper's official code) default DKD
    config. 5 of its 11 CIFAR-100 pair configs keep β = 8 (resnet32x4→resnet8x4,
    →ShuffleV1, →ShuffleV2, resnet50→MobileNetV2, wrn40_2→ShuffleV1); resnet56→resnet20
    and resnet110→resnet32 use β = 2, vgg13→vgg8/MobileNetV2 and wrn40_2→wrn16_2/wrn40_1
    use β = 6. The loss carries its own α, β, so the stage weight defaults to 1, with CE
    weight 1, as in mdistiller. Needs at least 2 classes (checked in :meth:`setup`).

    Warm-up (from mdistiller's code): ``w = min(e/warmup, 1)`` with ``e`` the epoch
    counted from 1 *within the stage*, set in :meth:`start_epoch`; ``warmup = 0`` gives
    ``w = 1`` throughout. A stage shorter than ``warmup`` epochs never reaches full
    strength: its last epoch uses ``w = epochs/warmup`` (a 10-epoch stage with the
    default ends at w = 0.5), so set ``warmup`` to at most the stage length (or 0) for
    short stages. Before the first ``start_epoch`` call ``w`` is the first epoch's
    value, ``1/warmup``.

    Implementation note: NCKD uses ``log p̂_k = log p_k − log(1 − p_t)`` from one
    log-softmax, the exact limit of mdistiller's "subtract 1000 from the target logit"
    masking; ``log(1 − p_t)`` is a log-sum-exp over the non-target classes, so neither
    term overflows when the teacher or the student is confident. Teacher probabilities
    of exactly 0 (a −inf teacher logit) contribute 0, as ``0·log 0`` should, not NaN.
    """

    name = "dkd"
    family = "response"
    citation = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if alpha < 0 or beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        if warmup < 0:
            raise ValueError("warmup must be >= 0 epochs (0 turns the warm-up off)")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup
        self.warmup_factor = self._factor(0)

    def setup(self, probe: Outputs, context: StageContext) -> None:
        student, teacher = probe.student_logits.shape, probe.teacher_logits.shape
        if student[1:] != teacher[1:]:
            raise UserError(
                f"dkd compares class probabilities, but the student's logits have shape "
                f"{tuple(student)} and the teacher's {tuple(teacher)}"
            )
        classes = context.num_classes if context.num_classes is not None else student[1]
        if classes < 2:
            raise UserError(
                f"dkd splits target from non-target classes and needs >= 2 classes, got {classes}"
            )

    def _factor(self, epoch: int) -> float:
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.warmup_factor = self._factor(epoch)

    def loss(self, out: Outputs) -> Tensor:
        tau = self.temperature
        log_s = F.log_softmax(out.student_logits.float() / tau, dim=1)
        log_t = F.log_softmax(out.teacher_logits.float() / tau, dim=1)
        is_target = F.one_hot(out.labels, log_s.shape[1]).bool()
        s_target, s_rest, s_hat = _split(log_s, is_target)
        t_target, t_rest, t_hat = _split(log_t, is_target)
        tckd = _kl_terms(t_target, s_target) + _kl_terms(t_rest, s_rest)
        # The target entries hold log p̂ = 0 on both sides: 1·(0 − 0) = 0.
        nckd = _kl_terms(t_hat, s_hat).sum(dim=1)
        return self.warmup_factor * tau**2 * (self.alpha * tckd + self.beta * nckd)
