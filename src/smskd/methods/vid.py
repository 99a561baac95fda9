"""Variational information distillation: a Gaussian likelihood of the teacher's features."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext


def _as_map(f: Tensor) -> Tensor:
    """Vectors ``[B, C]`` (the paper's MLP experiments) become 1×1 maps ``[B, C, 1, 1]``."""
    return f[:, :, None, None] if f.dim() == 2 else f


class VID(DistillMethod):
    """Variational information distillation (Ahn et al., CVPR 2019, arXiv:1904.05835).

    Maximizes a variational lower bound on the mutual information between the
    teacher's feature t and the student's feature s by fitting a Gaussian
    ``q(t | s) = N(μ(s), σ²)``: the mean μ is a regressor of three 1×1
    convolutions with ReLUs between them (hidden width = the teacher's channel
    count, as in the authors' code reproduced by RepDistiller and mdistiller; no
    bias), and the variance is one learned value per teacher channel,
    ``σ_c² = softplus(α_c) + ε``, initialised to ``σ² = 5`` with ε = 1e-5 (authors'
    code). Per sample the loss is the negative log-likelihood without its constant,
    ``½ · (log σ_c² + (t − μ(s))² / σ_c²)`` averaged over the C·H·W elements.
    Default weight β = 1: RepDistiller's (``-b 1``) and mdistiller's VID recipes.
    Feature vectors ``[B, C]`` are treated as 1×1 maps.

    Deviations: the paper sums the log-likelihood over elements and over several
    layer pairs (each with its own λ_k); here the elements are averaged (as in the
    authors' code, so β carries over) and one pair is matched — by default each
    model's middle stage (the "hint" role); run one VID per layer pair, or name
    ``student_layer``/``teacher_layer``, for more. The pair must have equal spatial
    size: RepDistiller average-pools the larger map, which the paper does not do,
    so here a mismatch is an error that names both layers.
    """

    name = "vid"
    family = "feature"
    citation = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"
    helpers = (
        "regressor: three 1×1 convs (ReLU between) for μ; per-channel α for σ² = softplus(α)+ε"
    )
    default_weight = 1.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "hint"),
        "teacher_layer": ("teacher", "hint"),
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        hidden_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if hidden_channels is not None and hidden_channels < 1:
            raise ValueError("hidden_channels must be >= 1 (or null for the teacher's width)")
        if eps <= 0:
            raise ValueError("eps must be > 0")
        if init_variance <= eps:
            raise ValueError("init_variance must be > eps")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.hidden_channels = hidden_channels
        self.init_variance = init_variance
        self.eps = eps
        self.regressor: nn.Module = nn.Identity()
        self.alpha = nn.Parameter(torch.empty(0))

    def setup(self, probe: Outputs, context: StageContext) -> None:
        s = probe.student_features[self.student_layer]
        t = probe.teacher_features[self.teacher_layer]
        if s.dim() not in (2, 4) or t.dim() != s.dim() or s.shape[2:] != t.shape[2:]:
            raise UserError(
                f"vid: student {self.student_layer!r} gives {tuple(s.shape[1:])} and teacher "
                f"{self.teacher_layer!r} gives {tuple(t.shape[1:])}; VID's 1×1 regressor needs "
                "two feature maps of equal spatial size (or two vectors): pick matching layers "
                "(student_layer/teacher_layer)"
            )
        c_s, c_t = s.shape[1], t.shape[1]
        hidden = self.hidden_channels or c_t
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, c_t, kernel_size=1, bias=False),
        ).to(device=s.device)
        # Inverse softplus, so that softplus(α) + ε starts exactly at init_variance.
        alpha = math.log(math.expm1(self.init_variance - self.eps))
        self.alpha = nn.Parameter(torch.full((c_t,), alpha, device=s.device))

    def variance(self) -> Tensor:
        """``σ_c² = softplus(α_c) + ε``, shape ``[C_T]``."""
        return F.softplus(self.alpha) + self.eps

    def loss(self, out: Outputs) -> Tensor:
        mean = self.regressor(_as_map(out.student_features[self.student_layer])).float()
        target = _as_map(out.teacher_features[self.teacher_layer]).float()
        var = self.variance().float().view(1, -1, 1, 1)
        nll = 0.5 * (var.log() + (target - mean).pow(2) / var)
        return nll.flatten(1).mean(dim=1)
