"""Variational information distillation: a Gaussian likelihood of the teacher's features."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.at import check_layer_lists
from smskd.methods.base import DistillMethod, Outputs, StageContext, check_width
from smskd.methods.registry import register_method


def _as_map(f: Tensor) -> Tensor:
    """Vectors ``[B, C]`` (the paper's MLP experiments) become 1×1 maps ``[B, C, 1, 1]``."""
    return f[:, :, None, None] if f.dim() == 2 else f


@register_method
class VID(DistillMethod):
    """Variational information distillation (Ahn et al., CVPR 2019, arXiv:1904.05835).

    Maximizes a variational lower bound on the mutual information between the
    teacher's feature t and the student's feature s by fitting a Gaussian
    ``q(t | s) = N(μ(s), σ²)``: the mean μ is a regressor of three 1×1
    convolutions with ReLUs between them (hidden width = the teacher's channel
    count, as in the authors' code reproduced by RepDistiller and mdistiller; no
    bias), and the variance is one learned value per teacher channel,
    ``σ_c² = softplus(α_c) + ε``, initialised to ``σ² = 5`` with ε = 1e-5 (authors'
    code). Per sample and layer pair the loss is the negative log-likelihood without
    its constant, ``½ · (log σ_c² + (t − μ(s))² / σ_c²)`` averaged over the C·H·W
    elements; the pairs' losses are summed. Taps: every feature stage of both
    models, paired in order, each pair with its own regressor and α — the field's
    standard setting (RepDistiller matches ``feat[1:-1]``, mdistiller ``feats[1:]``:
    the outputs of all residual groups). Default weight β = 1: RepDistiller's
    (``-b 1``) and mdistiller's VID recipes, applied to that sum. Feature vectors
    ``[B, C]`` (e.g. ``fc:input``, the paper's MLP experiments) are 1×1 maps.

    Deviations: the paper sums the log-likelihood over elements and weights each
    pair with its own λ_k; here elements are averaged and every pair has weight 1
    (as in the authors' code, so β carries over). Each pair must have equal spatial
    size: RepDistiller average-pools the larger map, which the paper does not do,
    so here a mismatch is an error that names both layers.
    """

    name = "vid"
    family = "feature"
    citation = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"
    helpers = (
        "per layer pair: a regressor (three 1×1 convs, ReLU between) for μ and per-channel α "
        "for σ² = softplus(α)+ε"
    )
    default_weight = 1.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layers": ("student", "features"),
        "teacher_layers": ("teacher", "features"),
    }

    def __init__(
        self,
        student_layers: list[str],
        teacher_layers: list[str],
        hidden_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_layer_lists(student_layers, teacher_layers)
        if hidden_channels is not None and hidden_channels < 1:
            raise ValueError("hidden_channels must be >= 1 (or null for the teacher's width)")
        check_width("hidden_channels", hidden_channels)
        if eps <= 0:
            raise ValueError("eps must be > 0")
        if init_variance <= eps:
            raise ValueError("init_variance must be > eps")
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.hidden_channels = hidden_channels
        self.init_variance = init_variance
        self.eps = eps
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_layers, self.teacher_layers, strict=True))

    def setup(self, probe: Outputs, context: StageContext) -> None:
        for s_name, t_name in self.pairs:
            s, t = probe.student_features[s_name], probe.teacher_features[t_name]
            if s.dim() not in (2, 4) or t.dim() != s.dim() or s.shape[2:] != t.shape[2:]:
                raise UserError(
                    f"vid: student {s_name!r} gives {tuple(s.shape[1:])} and teacher "
                    f"{t_name!r} gives {tuple(t.shape[1:])}; VID's 1×1 regressor needs two "
                    "feature maps of equal spatial size (or two vectors): pick matching layers "
                    "(student_layers/teacher_layers)"
                )
        self.regressors = nn.ModuleList()
        self.alphas = nn.ParameterList()
        # Inverse softplus, so that softplus(α) + ε starts exactly at init_variance.
        alpha = math.log(math.expm1(self.init_variance - self.eps))
        for s_name, t_name in self.pairs:
            c_s = probe.student_features[s_name].shape[1]
            c_t = probe.teacher_features[t_name].shape[1]
            hidden = self.hidden_channels or c_t
            self.regressors.append(
                nn.Sequential(
                    nn.Conv2d(c_s, hidden, kernel_size=1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(hidden, hidden, kernel_size=1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(hidden, c_t, kernel_size=1, bias=False),
                )
            )
            self.alphas.append(nn.Parameter(torch.full((c_t,), alpha)))
        self.to(device=probe.student_features[self.student_layers[0]].device)

    def variances(self) -> list[Tensor]:
        """``σ_c² = softplus(α_c) + ε`` per pair, each of shape ``[C_T]``."""
        return [F.softplus(alpha) + self.eps for alpha in self.alphas]

    def loss(self, out: Outputs) -> Tensor:
        terms = []
        for (s_name, t_name), regressor, var in zip(
            self.pairs, self.regressors, self.variances(), strict=True
        ):
            mean = regressor(_as_map(out.student_features[s_name])).float()
            target = _as_map(out.teacher_features[t_name]).float()
            var = var.float().view(1, -1, 1, 1)
            nll = 0.5 * (var.log() + (target - mean).pow(2) / var)
            terms.append(nll.flatten(1).mean(dim=1))
        return torch.stack(terms).sum(dim=0)
