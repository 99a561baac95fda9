"""Probabilistic knowledge transfer: match the conditional-probability graphs of a batch."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.functional import unit_rows
from smskd.methods.registry import register_method


def conditional_probabilities(features: Tensor) -> Tensor:
    """``P[i, j] = p_{j|i} = K(x_i, x_j) / Σ_{k≠i} K(x_i, x_k)`` with the cosine kernel
    ``K = (cos + 1) / 2``; the diagonal (j = i) is 0. A row with norm below 1e-6 counts
    as cosine 0 with every other row and passes no gradient (:func:`unit_rows`).
    """
    x = unit_rows(features.flatten(1).float())
    kernel = (x @ x.t() + 1) / 2
    kernel = kernel * (1 - torch.eye(len(x), dtype=kernel.dtype, device=kernel.device))
    # A row sums to 0 only for B = 1 (or two opposite points): give it p = 0, not NaN.
    return kernel / kernel.sum(dim=1, keepdim=True).clamp_min(1e-12)


@register_method
class PKT(DistillMethod):
    """Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018, arXiv:1803.10837).

    On the penultimate embeddings (default: the input of the classifier), each
    network's batch becomes conditional probabilities ``p_{j|i}`` (teacher) and
    ``q_{j|i}`` (student) from the cosine-similarity kernel shifted to [0, 1],
    ``K(a, b) = (aᵀb / (‖a‖‖b‖) + 1) / 2``, normalized over ``j ≠ i``; the loss is the
    paper's ``Σ_i Σ_{j≠i} p_{j|i} · log((p_{j|i} + ε) / (q_{j|i} + ε))``, a sum of
    KL(teacher ‖ student) over the anchors i. The cosine kernel needs no bandwidth and
    the embeddings may have any sizes (the graphs are b×b), so there is no helper.
    Defined over the batch: the loss is a scalar.

    ε = 1e-7 (the authors' code) keeps the log finite where two student embeddings
    point in opposite directions (q = 0). The authors' code, and RepDistiller and
    mdistiller which follow it, differ in two ways: they keep j = i in the
    normalization and the sum, and they take the mean over the b² entries instead of
    the sum. The authors' code weighs the loss by nothing (1, alone or added to a
    supervised term); β = 30000 on that mean is RepDistiller's CIFAR-100 script
    (``-b 30000``) and mdistiller's ``CFG.PKT.LOSS.FEAT_WEIGHT``, both with batch 64.
    On the paper's sum that is β = 30000 / 64² ≈ 7.3, the default here; with batch
    size B, their recipe corresponds to ``weight: 30000 / B²``.

    Deviations from the paper: ε, and a student embedding with L2 norm below 1e-6
    (all ~0, e.g. dead ReLUs) normalizes to 0 without gradient (:func:`unit_rows`)
    rather than sending back a ~1e12-times gradient; other rows are unchanged.
    Teacher embeddings are detached here, so no gradient can reach the teacher.
    """

    name = "pkt"
    family = "relation"
    citation = (
        "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge "
        "Transfer, ECCV 2018"
    )
    default_weight = 30000.0 / 64**2
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "embedding"),
        "teacher_layer": ("teacher", "embedding"),
    }

    def __init__(self, student_layer: str, teacher_layer: str, eps: float = 1e-7) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError("eps must be >= 0")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.eps = eps

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        # ~12 float32 B×B matrices at the peak of loss + backward (measured).
        return 4 * 12 * batch_size**2

    def loss(self, out: Outputs) -> Tensor:
        p = conditional_probabilities(out.teacher_features[self.teacher_layer].detach())
        q = conditional_probabilities(out.student_features[self.student_layer])
        off_diagonal = ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        p, q = p[off_diagonal], q[off_diagonal]
        # xlogy makes a p = 0 term 0 (not 0·log 0 = NaN) when eps = 0.
        return (torch.xlogy(p, p + self.eps) - torch.xlogy(p, q + self.eps)).sum()
