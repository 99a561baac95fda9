"""Attention transfer: match where the networks put their activation energy."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def check_layer_lists(student_layers: list[str], teacher_layers: list[str]) -> None:
    """Pairs are taken in order, so both lists must be non-empty and equally long."""
    if len(student_layers) != len(teacher_layers):
        raise ValueError(
            f"student_layers {student_layers} has {len(student_layers)} layers but "
            f"teacher_layers {teacher_layers} has {len(teacher_layers)}; layers are paired in "
            "order, so name as many of each"
        )
    if not student_layers:
        raise ValueError("student_layers and teacher_layers are empty; name at least one pair")


def check_map_pairs(method: str, pairs: list[tuple[str, str]], probe: Outputs) -> None:
    """Both sides of every pair must be feature maps ``[B, C, H, W]`` that share more than
    one position once the larger is pooled: a map over a single position normalizes to a
    constant (±1), so its loss is 0 or constant and gives the student no gradient."""
    for s_name, t_name in pairs:
        s, t = probe.student_features[s_name], probe.teacher_features[t_name]
        shapes = f"student {s_name!r} gives {tuple(s.shape[1:])} and teacher {t_name!r} gives"
        shapes += f" {tuple(t.shape[1:])}"
        if s.dim() != 4 or t.dim() != 4:
            raise UserError(
                f"{method}: {shapes}; both must be feature maps (C, H, W): "
                "name convolutional layers in student_layers/teacher_layers"
            )
        if min(s.shape[2], t.shape[2]) * min(s.shape[3], t.shape[3]) == 1:
            raise UserError(
                f"{method}: {shapes}; pooled to a common size they cover a single position, "
                "where the normalized map is constant and the loss carries no signal: name "
                "layers with a larger H×W in student_layers/teacher_layers"
            )


def pool_to_common_size(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger map down to the smaller one's H×W (per axis)."""
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def attention_map(f: Tensor, p: float) -> Tensor:
    """``Q = mean_c |f_c|^p`` flattened over H·W and scaled to unit L2 norm, ``[B, H·W]``."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


@register_method
class AT(DistillMethod):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928).

    For each pair j of (student, teacher) feature maps, the attention map is
    ``Q = mean over channels of |f|^p`` (p = 2, the paper's choice), flattened and
    L2-normalized per sample; the loss of a sample is
    ``Σ_j mean over H·W of (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²``. Channel counts may differ.
    Taps: every feature stage of both models, paired in order (the paper's CIFAR
    setup pairs the outputs of the residual groups). Default weight β = 1000:
    the AT CIFAR recipe of RepDistiller (``-b 1000``), mdistiller
    (``FEAT_WEIGHT: 1000``) and the authors' code.

    Deviations, all shared with the authors' code and RepDistiller: the paper's
    Eq. 2 is ``β/2 · Σ_j ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖_2`` (a plain, not squared, norm)
    and its β = 1000 is divided by the attention map's element count and by the
    batch size; here the norm is squared and averaged over the H·W positions,
    with no ½. β = 1000 is calibrated for this squared mean, which is why we keep
    it. Channels are averaged rather than summed, a constant factor that the
    normalization cancels. When a pair's spatial sizes differ (not covered by the
    paper), the larger *feature map* is adaptive-average-pooled to the smaller
    one's H×W before the attention map is taken, as RepDistiller does. Checks not
    in the paper: p ≥ 1 (for p < 1 the gradient of ``|f|^p`` is NaN at the exact
    zeros of ReLU maps), and a pair whose common H×W is 1×1 is refused (its
    normalized attention map is the constant 1, so the loss would be identically 0).
    """

    name = "at"
    family = "feature"
    citation = (
        "Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the Performance "
        "of CNNs via Attention Transfer, ICLR 2017"
    )
    default_weight = 1000.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layers": ("student", "features"),
        "teacher_layers": ("teacher", "features"),
    }

    def __init__(
        self, student_layers: list[str], teacher_layers: list[str], p: float = 2.0
    ) -> None:
        super().__init__()
        check_layer_lists(student_layers, teacher_layers)
        if p < 1:
            # d|f|^p/df = p·|f|^(p−1)·sign(f) is 0·∞ = NaN at the exact zeros of ReLU maps.
            raise ValueError(f"p must be >= 1 (got {p}); p < 1 gives NaN gradients at zeros")
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.p = p

    def setup(self, probe: Outputs, context: StageContext) -> None:
        check_map_pairs(self.name, self.pairs, probe)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_layers, self.teacher_layers, strict=True))

    def loss(self, out: Outputs) -> Tensor:
        terms = []
        for s_name, t_name in self.pairs:
            s, t = pool_to_common_size(
                out.student_features[s_name].float(), out.teacher_features[t_name].float()
            )
            terms.append((attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean(dim=1))
        return torch.stack(terms).sum(dim=0)
