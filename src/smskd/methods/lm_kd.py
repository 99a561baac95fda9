"""Token-level logit distillation for language models: forward, reverse, skew and JS divergences."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.registry import register_method

Divergence = Literal["forward", "reverse", "skew_forward", "skew_reverse", "jsd"]


def kl_from_log(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a ‖ b) = Σ a·(log a − log b)`` over the last axis, from log-probabilities.

    Entries where ``a`` is exactly 0 (``log a = −inf``, e.g. a vocabulary entry masked
    with ``−inf`` logits) add 0 and pass no gradient, never NaN.
    """
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * log_ratio).sum(dim=-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log(w·a + (1 − w)·b)`` from log-probabilities, by ``logsumexp`` (0 < w < 1).

    ``−inf`` entries (a vocabulary entry both logits mask out) are raised to the most
    negative float first: ``logsumexp`` of two ``−inf`` would send NaN gradients back.
    """
    lowest = torch.finfo(log_a.dtype).min
    return torch.logsumexp(
        torch.stack(
            [
                log_a.clamp_min(lowest) + math.log(weight),
                log_b.clamp_min(lowest) + math.log1p(-weight),
            ]
        ),
        dim=0,
    )


@register_method
class LMKD(DistillMethod):
    """Token-level logit distillation with a choice of divergence, per token (``[N]``).

    With ``p = softmax(teacher/τ)`` and ``q = softmax(student/τ)`` over the vocabulary of
    each token in the loss (the engine has already dropped padding: logits ``[N, V]``),
    the loss of a token is ``τ² · D(p, q)``, where ``divergence`` picks D:

    - ``forward``: ``KL(p ‖ q)``, the usual word-level KD (Hinton et al. 2015,
      arXiv:1503.02531; Kim & Rush 2016 for sequences): mode-covering.
    - ``reverse``: ``KL(q ‖ p)``, mode-seeking (MiniLLM, Gu et al. 2024, arXiv:2306.08543,
      uses it at the sequence level with policy gradients; here it is the exact per-token
      value on the given tokens).
    - ``skew_forward``: ``KL(p ‖ α·p + (1 − α)·q)`` and ``skew_reverse``:
      ``KL(q ‖ α·q + (1 − α)·p)``, DistiLLM's skew KL and skew reverse KL (Ko et al.,
      ICML 2024, arXiv:2402.03898), α = ``skew`` (0.1, the paper's default).
    - ``jsd``: the generalized Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024,
      arXiv:2306.13649, Eq. 1) as TRL's ``GKDTrainer.generalized_jsd_loss`` computes it:
      ``m = β·p + (1 − β)·q``, ``JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``, β = ``beta``.

    Mixtures are taken in log space (``logsumexp`` of the weighted log-probabilities), so
    no probability is rounded to 0 before its log. Entries where the distribution in
    front is exactly 0 add 0. The logits may be any ``[N, V]`` or ``[B, C]`` (image
    classes), so the method also runs on classifiers.

    Deviations: the τ² factor (Hinton) is applied to every divergence; TRL and DistiLLM
    apply none (identical at the default τ = 1). DistiLLM's skew forward loss is the
    cross-entropy ``−Σ p·log m``, which differs from ``KL(p ‖ m)`` by the teacher's entropy,
    a constant for the student (same gradient; here the loss is 0 when q = p). TRL accepts
    β = 0 and β = 1 and special-cases them to forward and reverse KL; here
    0 < β < 1 and 0 < α < 1 (the endpoints are ``forward`` and ``reverse``). The student's
    q inside a mixture is not detached, as in TRL and DistiLLM. GKD's on-policy data
    (student-generated sequences) is a matter of the data, not of this loss.
    """

    name = "lm-kd"
    family = "response"
    citation = (
        "Agarwal et al., On-Policy Distillation of Language Models: Learning from "
        "Self-Generated Mistakes, ICLR 2024; Ko et al., DistiLLM: Towards Streamlined "
        "Distillation for Large Language Models, ICML 2024"
    )

    def __init__(
        self,
        divergence: Divergence = "forward",
        temperature: float = 1.0,
        skew: float = 0.1,
        beta: float = 0.5,
    ) -> None:
        super().__init__()
        if divergence not in ("forward", "reverse", "skew_forward", "skew_reverse", "jsd"):
            raise ValueError(
                f"divergence {divergence!r} is not one of forward, reverse, skew_forward, "
                "skew_reverse, jsd"
            )
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0 < skew < 1:
            raise ValueError(
                f"skew must be strictly between 0 and 1 (got {skew}); skew 0 is plain KL: "
                "use divergence forward or reverse"
            )
        if not 0 < beta < 1:
            raise ValueError(
                f"beta must be strictly between 0 and 1 (got {beta}); for the endpoints use "
                "divergence forward or reverse"
            )
        self.divergence = divergence
        self.temperature = temperature
        self.skew = skew
        self.beta = beta

    def loss(self, out: Outputs) -> Tensor:
        tau = self.temperature
        log_q = F.log_softmax(out.student_logits.float() / tau, dim=-1)
        log_p = F.log_softmax(out.teacher_logits.float().detach() / tau, dim=-1)
        if self.divergence == "forward":
            value = kl_from_log(log_p, log_q)
        elif self.divergence == "reverse":
            value = kl_from_log(log_q, log_p)
        elif self.divergence == "skew_forward":
            value = kl_from_log(log_p, log_mixture(log_p, log_q, self.skew))
        elif self.divergence == "skew_reverse":
            value = kl_from_log(log_q, log_mixture(log_q, log_p, self.skew))
        else:
            log_m = log_mixture(log_p, log_q, self.beta)
            value = self.beta * kl_from_log(log_p, log_m) + (1 - self.beta) * kl_from_log(
                log_q, log_m
            )
        return value * tau**2
