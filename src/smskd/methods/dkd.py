"""Decoupled knowledge distillation: target-class and non-target-class KD apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs


class DKD(DistillMethod):
    """Decoupled KD (Zhao et al., CVPR 2022, arXiv:2203.08679).

    With ``p = softmax(z/τ)`` and ``t`` the label, per sample:
    ``w · τ² · (α·TCKD + β·NCKD)`` where TCKD = ``KL(b_T ‖ b_S)`` on the binary
    target/non-target masses ``b = (p_t, 1 − p_t)``, and NCKD = ``KL(p̂_T ‖ p̂_S)`` on
    the distribution among the non-target classes, ``p̂_k = p_k / (1 − p_t)`` for
    k ≠ t (the softmax of the logits with the target masked out). Defaults α = 1,
    β = 8, τ = 4, warm-up 20: mdistiller's (the paper's official code) default DKD
    config, used for resnet32x4→resnet8x4 on CIFAR-100; its other CIFAR-100 pair configs
    lower β to 2 or 6 (resnet56→resnet20, vgg13→vgg8...). The loss carries its own α, β,
    so the stage weight defaults to 1, with CE weight 1, as in mdistiller.

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
    term overflows when the teacher or the student is confident.
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

    def _factor(self, epoch: int) -> float:
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.warmup_factor = self._factor(epoch)

    def loss(self, out: Outputs) -> Tensor:
        tau = self.temperature
        log_s = F.log_softmax(out.student_logits.float() / tau, dim=1)
        log_t = F.log_softmax(out.teacher_logits.float() / tau, dim=1)
        is_target = F.one_hot(out.labels, log_s.shape[1]).bool()

        def split(log_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """log p_t, log(1 − p_t) and log p̂ (0 at the target, where p̂ is undefined)."""
            log_target = log_p.gather(1, out.labels.unsqueeze(1)).squeeze(1)
            log_rest = torch.logsumexp(log_p.masked_fill(is_target, float("-inf")), dim=1)
            # Zeroing the target entry makes its term exp(0)·(0 − 0) = 0; left as is it would
            # hold p_t/(1 − p_t), which overflows for a confident teacher.
            log_hat = (log_p - log_rest.unsqueeze(1)).masked_fill(is_target, 0.0)
            return log_target, log_rest, log_hat

        s_target, s_rest, s_hat = split(log_s)
        t_target, t_rest, t_hat = split(log_t)
        tckd = t_target.exp() * (t_target - s_target) + t_rest.exp() * (t_rest - s_rest)
        nckd = (t_hat.exp() * (t_hat - s_hat)).sum(dim=1)
        return self.warmup_factor * tau**2 * (self.alpha * tckd + self.beta * nckd)
