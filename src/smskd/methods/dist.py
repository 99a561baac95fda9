"""DIST: match the correlations of predictions, across classes and across samples."""

from __future__ import annotations

import math

from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.registry import register_method

SPREAD_FLOOR = 1e-3
"""Relative spread below which a probability vector counts as constant (see ``_pearson_rows``)."""


def _pearson_rows(a: Tensor, b: Tensor, floor: float = SPREAD_FLOOR) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``, shape ``[N]``.

    Rows are probabilities (positive). Each centered row's norm is floored at ``floor``
    times the norm of its mean: a coefficient of variation of 10⁻³, about a spread of
    10⁻³ in ``log p``. Above the floor ρ is exact. Below it, where the exact gradient
    grows like 1/spread (ρ is scale-free), it stays near the level the exact loss has at
    the floor: a constant row gives ρ = 0 and a bounded gradient, not 0/0. Freshly
    initialized zoo students (resnet8x4, resnet20, vgg8; noise inputs) spread by
    ≥ 5·10⁻³ at τ = 4 across classes and across the batch, so only degenerate students
    (zero-initialized classifier, dead features) reach the floor. The 10⁻³⁰ on the
    product covers probabilities that underflow to 0. The official code instead adds
    ε = 10⁻⁸ to ``‖a‖‖b‖``: a negligible change of ρ on normal inputs, but gradients of
    order 10⁵–10⁶ (b/ε) for constant student rows.
    """

    def centered(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(dim=1, keepdim=True)
        x = x - mean
        return x, x.norm(dim=1).clamp_min(floor * math.sqrt(x.shape[1]) * mean.squeeze(1))

    a, norm_a = centered(a)
    b, norm_b = centered(b)
    return (a * b).sum(dim=1) / (norm_a * norm_b).clamp_min(1e-30)


@register_method
class DIST(DistillMethod):
    """DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022, arXiv:2205.10536).

    With ``Y = softmax(z/τ)`` row-wise (B×C) for student and teacher and ``ρ`` the
    Pearson correlation: ``τ²·(β·L_inter + γ·L_intra)``, where the inter-class relation
    ``L_inter = mean_i (1 − ρ(Y^s_i,:, Y^t_i,:))`` compares each sample's class
    probabilities and the intra-class relation ``L_intra = mean_c (1 − ρ(Y^s_:,c, Y^t_:,c))``
    each class's probabilities across the batch. The intra term couples the samples, so
    the loss is defined over the batch and is a scalar.

    Defaults: τ = 4, β = γ = 1 and stage weight 2 — the official CIFAR-100 recipe
    (hunto/image_classification_sota, ``dist_cifar.yaml``: ``kd: dist_t4``, i.e.
    DIST(β=1, γ=1, τ=4), ``kd_loss_weight: 2``, CE weight 1), which amounts to
    β = γ = 2 on the paper's formula. Its ImageNet recipe keeps weight 2 with τ = 1.

    Deviation, numerical only: ρ's denominator is floored (``_pearson_rows``,
    ``SPREAD_FLOOR``) instead of the official ``+ ε``. The floor leaves ρ exact above it
    (ε changes it negligibly) and bounds the gradient for (near-)constant student rows
    or columns (uniform predictions, or one prediction for the whole batch). A batch
    of one sample has no intra-class relation: every column is constant, so L_intra is
    the constant 1 (no gradient), as in the official code.
    """

    name = "dist"
    family = "response"
    citation = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"
    default_weight = 2.0

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if beta < 0 or gamma < 0:
            raise ValueError("beta and gamma must be >= 0")
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def loss(self, out: Outputs) -> Tensor:
        tau = self.temperature
        y_s = (out.student_logits.float() / tau).softmax(dim=1)
        y_t = (out.teacher_logits.float() / tau).softmax(dim=1)
        inter = 1 - _pearson_rows(y_s, y_t).mean()
        intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
        return tau**2 * (self.beta * inter + self.gamma * intra)
