"""The frozen reference model and its TCP-weighted loss (DESIGN.md §1).

From stage 2 on, the student as it left the previous stage is frozen and its
predictions anchor the current student, sample by sample:

    TCP_i    = softmax(t_i / T_tcp)[y_i]                    (teacher's true-class probability)
    w_i      = λ·(1 − TCP_i) | λ·TCP_i | λ | 0              (inverse_tcp | tcp | fixed | none)
    L_ref,i  = τ² · KL(softmax(r_i/τ) ‖ softmax(s_i/τ))     (or mean squared logit difference)
    L_ref    = mean_i(w_i · L_ref,i)

The paper fixes the TCP-based per-sample weighting but not its direction or the
loss form; our defaults and their alternatives are in shared/PAPER.md.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from smskd.config import ReferenceConfig
from smskd.methods.functional import soft_kl


def make_reference(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student``: eval mode, no gradients, never trained."""
    reference = copy.deepcopy(student)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def true_class_probability(
    teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """``softmax(t / T)[y]`` per sample — not the max probability, which hides teacher errors."""
    probs = torch.softmax(teacher_logits.float() / temperature, dim=1)
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


def reference_weights(weighting: str, lam: float, tcp: Tensor) -> Tensor:
    if weighting == "inverse_tcp":
        return lam * (1.0 - tcp)
    if weighting == "tcp":
        return lam * tcp
    if weighting == "fixed":
        return torch.full_like(tcp, lam)
    if weighting == "none":
        return torch.zeros_like(tcp)
    raise ValueError(f"unknown weighting {weighting!r}")


def per_sample_reference_loss(
    student_logits: Tensor, reference_logits: Tensor, kind: str, temperature: float
) -> Tensor:
    if kind == "kl":
        return soft_kl(student_logits.float(), reference_logits.float(), temperature)
    if kind == "mse_logits":
        return (student_logits.float() - reference_logits.float()).pow(2).mean(dim=1)
    raise ValueError(f"unknown reference loss {kind!r}")


def reference_term(
    cfg: ReferenceConfig,
    student_logits: Tensor,
    reference_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    """``mean_i(w_i · L_ref,i)`` and the weights ``w`` (for logging their distribution)."""
    if cfg.needs_teacher:
        if teacher_logits is None:
            raise ValueError(f"reference weighting {cfg.weighting!r} needs teacher logits")
        tcp = true_class_probability(teacher_logits, labels, cfg.tcp_temperature)
    else:
        tcp = torch.ones(len(labels), device=labels.device)
    weights = reference_weights(cfg.weighting, cfg.lam, tcp)
    per_sample = per_sample_reference_loss(
        student_logits, reference_logits, cfg.loss, cfg.temperature
    )
    return (weights * per_sample).mean(), weights


WEIGHT_BINS = 20


def weight_histogram(weights: Tensor, lam: float, bins: int = WEIGHT_BINS) -> Tensor:
    """Fraction of the batch in each of ``bins`` equal bins of ``w_i / λ`` on [0, 1].

    Relative to λ, so runs with different λ share one axis; for ``inverse_tcp`` it is
    the distribution of ``1 − TCP``, for ``fixed`` a spike in the last bin.
    """
    relative = weights.float() / lam if lam > 0 else torch.zeros_like(weights, dtype=torch.float)
    return torch.histc(relative.clamp(0, 1), bins=bins, min=0.0, max=1.0) / len(weights)
