"""Similarity-preserving KD: match the batch's pairwise-similarity matrices."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.functional import unit_rows
from smskd.methods.registry import register_method


def similarity_matrix(features: Tensor) -> Tensor:
    """``G = row-L2-normalize(Q·Qᵀ)`` with ``Q`` the ``[B, C·H·W]`` flattened features
    (normalized by :func:`unit_rows`)."""
    q = features.flatten(1).float()
    return unit_rows(q @ q.t())


@register_method
class SP(DistillMethod):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv:1907.09682).

    For a batch of b samples, each tapped activation map is flattened to
    ``Q ∈ R^{b×(c·h·w)}``; ``G = Q·Qᵀ`` with each row L2-normalized is the b×b matrix of
    how similarly the network sees every pair of samples. The loss is
    ``Σ_pairs ‖G_t − G_s‖_F² / b²`` over the tapped (student, teacher) layer pairs,
    as in the paper. Since G is b×b, the two networks' layers may have any sizes, so
    no trainable helper is needed. Defined over the batch: the loss is a scalar.

    Default taps: the last feature map of each network (RepDistiller's ``feat[-2]``,
    the output of the last stage); lists of equal length give several pairs.
    Default weight β = 3000, RepDistiller's CIFAR-100 script (``-b 3000``) and
    mdistiller's ``CFG.SP.LOSS.FEAT_WEIGHT``, which compute exactly this loss.
    Teacher features are detached here, so no gradient can reach the teacher whatever
    the caller passes. The only deviation from the paper: a Gram row with L2 norm below
    1e-6 (a student sample whose features are all ~0) normalizes to 0 without gradient
    (:func:`unit_rows`) instead of blowing up the gradient; other rows are unchanged.
    """

    name = "sp"
    family = "relation"
    citation = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019"
    default_weight = 3000.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "last_feature"),
        "teacher_layer": ("teacher", "last_feature"),
    }

    def __init__(self, student_layer: str | list[str], teacher_layer: str | list[str]) -> None:
        super().__init__()
        students = [student_layer] if isinstance(student_layer, str) else list(student_layer)
        teachers = [teacher_layer] if isinstance(teacher_layer, str) else list(teacher_layer)
        if not students or len(students) != len(teachers):
            raise ValueError(
                f"student_layer and teacher_layer must pair up one to one; got {len(students)} "
                f"student and {len(teachers)} teacher layers"
            )
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.pairs = list(zip(students, teachers, strict=True))

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        # ~8 float32 B×B matrices per layer pair at the peak of loss + backward (measured).
        return 4 * 8 * batch_size**2 * len(self.pairs)

    def loss(self, out: Outputs) -> Tensor:
        total = out.student_logits.new_zeros((), dtype=torch.float32)
        for s_name, t_name in self.pairs:
            s = out.student_features[s_name]
            t = out.teacher_features[t_name].detach()
            g_diff = similarity_matrix(t) - similarity_matrix(s)
            total = total + g_diff.pow(2).sum() / len(s) ** 2
        return total
