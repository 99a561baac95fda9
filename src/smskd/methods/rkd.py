"""Relational knowledge distillation: distances and angles between samples."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def _normalized_distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct pairs."""
    squared = e.pow(2).sum(dim=1)
    # The Gram form keeps memory at B² (not B²·D); the clamp keeps sqrt's gradient
    # finite where rounding leaves a tiny negative, and the diagonal is zeroed.
    d2 = (squared.unsqueeze(0) + squared.unsqueeze(1) - 2 * e @ e.t()).clamp_min(1e-12)
    off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    d = d2.sqrt() * off_diagonal
    return d / d[off_diagonal].mean().clamp_min(1e-12)


def _angles(e: Tensor) -> Tensor:
    """``cos ∠(e_i, e_j, e_k)`` for all triplets: unit vectors e_i − e_j, e_k − e_j."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2))


@register_method
class RKD(DistillMethod):
    """Relational KD, distance + angle (Park et al., CVPR 2019, arXiv:1904.05068).

    On the penultimate embeddings (default: the input of the classifier):
    ``w_d · Huber(ψ_D(s), ψ_D(t)) + w_a · Huber(ψ_A(s), ψ_A(t))`` where ψ_D are the
    pairwise distances normalized by their mean over distinct pairs and ψ_A the
    cosines of the angles of all triplets; Huber is smooth-L1 with δ = 1 averaged
    over all B² (resp. B³) entries. w_d = 25, w_a = 50 as in the paper's
    classification experiments (and RepDistiller). Defined over the batch, so
    the loss is a scalar; a batch of one sample has no relations and gives 0.
    """

    name = "rkd"
    family = "relation"
    citation = "Park et al., Relational Knowledge Distillation, CVPR 2019"
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "embedding"),
        "teacher_layer": ("teacher", "embedding"),
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__()
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        # float32 counts measured on the CPU (peak of loss + backward): the angle term
        # holds B×B×D unit differences per side and ~4 B×B×B tensors, distances ~16 B×B.
        b = batch_size
        floats = 16 * b**2
        if self.angle_weight:
            width = (
                probe.student_features[self.student_layer][0].numel()
                + probe.teacher_features[self.teacher_layer][0].numel()
            )
            floats += 4 * b**3 + 3 * b**2 * width
        return 4 * floats

    def loss(self, out: Outputs) -> Tensor:
        s = out.student_features[self.student_layer].flatten(1)
        t = out.teacher_features[self.teacher_layer].flatten(1).float()
        s = s.float()
        loss = s.new_zeros(())
        if len(s) < 2:  # a lone sample has no relations (a loader's short last batch)
            return loss
        if self.distance_weight:
            d = F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t))
            loss = loss + self.distance_weight * d
        if self.angle_weight:
            a = F.smooth_l1_loss(_angles(s), _angles(t))
            loss = loss + self.angle_weight * a
        return loss
