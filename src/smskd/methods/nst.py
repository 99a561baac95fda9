"""Neuron selectivity transfer: match the distributions of per-channel activation maps."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.methods.at import check_layer_lists, check_map_pairs, pool_to_common_size
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def _mean_kernel(a: Tensor, b: Tensor, degree: int, c: float) -> Tensor:
    """Per sample, the mean of ``(a_i·b_j + c)^d`` over all channel pairs (i, j), ``[B]``."""
    return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree).mean(dim=(1, 2))


@register_method
class NST(DistillMethod):
    """Neuron selectivity transfer (Huang & Wang, 2017, arXiv:1707.01219).

    Each channel's H·W activation map, divided by its L2 norm, is one sample of a
    network's "neuron selectivity" distribution. Per image and per (student,
    teacher) pair of feature maps the loss is the squared MMD (paper Eq. 4)
    ``mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') − 2 mean_{i,j} k(s_j, t_i)``
    with the polynomial kernel ``k(x, y) = (xᵀy + c)^d``, d = 2, c = 0 (the paper's
    best kernel). The three means run over C_T², C_S² and C_S·C_T pairs, so the
    channel counts may differ; only H·W must agree. Pair losses are summed over
    every feature stage of both models, paired in order. Default weight β = 50:
    the NST CIFAR recipe of RepDistiller (``-b 50``) and mdistiller
    (``FEAT_WEIGHT: 50``).

    Deviations: the paper adds ``λ/2 · MMD²``; here the ½ is dropped, as in
    RepDistiller and mdistiller, whose β = 50 multiplies MMD² directly. The paper
    matches only the last stage's output in its experiments; like RepDistiller we
    pair every stage (name one layer each in ``student_layers``/``teacher_layers``
    for the paper's setup). Different spatial sizes are not covered by the paper:
    the larger feature map is adaptive-average-pooled to the smaller one's H×W
    first, as RepDistiller does; a pair whose common H×W is 1×1 is refused, since
    every unit "map" is then ±1 and the loss gives no gradient. The teacher-teacher
    term has no gradient; it is kept so that the loss is the MMD itself, ≥ 0 and 0
    when the distributions agree. Each sample's MMD uses only that sample's channels.
    """

    name = "nst"
    family = "feature"
    citation = (
        "Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, "
        "arXiv 2017"
    )
    default_weight = 50.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layers": ("student", "features"),
        "teacher_layers": ("teacher", "features"),
    }

    def __init__(
        self,
        student_layers: list[str],
        teacher_layers: list[str],
        degree: int = 2,
        c: float = 0.0,
    ) -> None:
        super().__init__()
        check_layer_lists(student_layers, teacher_layers)
        # Cosines can be negative, and a negative base to a fractional power is NaN.
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be a positive integer (got {degree!r})")
        if c < 0:
            raise ValueError("c must be >= 0 (a negative offset breaks the kernel's PSD-ness)")
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.degree = degree
        self.c = c

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_layers, self.teacher_layers, strict=True))

    def setup(self, probe: Outputs, context: StageContext) -> None:
        check_map_pairs(self.name, self.pairs, probe)

    def loss(self, out: Outputs) -> Tensor:
        terms = []
        for s_name, t_name in self.pairs:
            s, t = pool_to_common_size(
                out.student_features[s_name].float(), out.teacher_features[t_name].float()
            )
            s = F.normalize(s.flatten(2), dim=2)  # [B, C_S, H·W], unit rows
            t = F.normalize(t.flatten(2), dim=2)
            d, c = self.degree, self.c
            mmd = _mean_kernel(t, t, d, c) + _mean_kernel(s, s, d, c) - 2 * _mean_kernel(s, t, d, c)
            terms.append(mmd)
        return torch.stack(terms).sum(dim=0)
