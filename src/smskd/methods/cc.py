"""Correlation congruence: match the batch's kernel (correlation) matrices."""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor, nn

from smskd.methods.base import DistillMethod, Outputs, StageContext, check_width
from smskd.methods.functional import unit_rows
from smskd.methods.registry import register_method

MAX_ORDER = 170  # the Taylor coefficients divide by p!, a float only up to 170!


def correlation_matrix(embeddings: Tensor, gamma: float, order: int) -> Tensor:
    """``ψ(F)[i, j] = exp(−2γ) · Σ_{p=0}^{P} (2γ)^p / p! · (f_iᵀ f_j)^p`` on unit ``f_i``.

    For unit vectors ``‖f_i − f_j‖² = 2 − 2 f_iᵀ f_j``, so this is the P-order Taylor
    expansion of the Gaussian RBF kernel ``exp(−γ ‖f_i − f_j‖²)``. A row with norm
    below 1e-6 becomes ``f_i = 0`` and passes no gradient (:func:`unit_rows`).
    """
    f = unit_rows(embeddings.flatten(1).float())
    cos = f @ f.t()
    series = sum((2 * gamma) ** p / math.factorial(p) * cos.pow(p) for p in range(order + 1))
    return math.exp(-2 * gamma) * series


@register_method
class CC(DistillMethod):
    """Correlation congruence KD (Peng et al., ICCV 2019, arXiv:1904.01802).

    On the penultimate embeddings (default: the input of the classifier), ψ(F) is
    the b×b correlation matrix of the batch under the Gaussian RBF kernel
    ``exp(−γ‖f_i − f_j‖²)``, approximated by its P-order Taylor expansion on
    L2-normalized embeddings (see :func:`correlation_matrix`); the loss is the paper's
    ``L_CC = ‖ψ(F_t) − ψ(F_s)‖_F² / b²``. Defined over the batch: the loss is a scalar.

    P = 2, γ = 0.4 are sourced to implementations only: Knowledge-Distillation-Zoo's
    argparse defaults (``--gamma 0.4 --P_order 2``, repeated in its CC script) and
    torchdistill's CCKD recipe (ImageNet ResNet-50 → ResNet-18: ``gamma: 0.4,
    max_p: 2``).

    ψ is b×b whatever the embedding sizes, so by default the embeddings are compared
    as they are (as in Knowledge-Distillation-Zoo). ``embed_dim`` adds a trainable
    linear map per side to that size before the normalization, as RepDistiller (with
    its generic ``--feat_dim`` default of 128, shared with CRD) and torchdistill (128)
    do; being trainable on both sides, the two maps can also shrink the loss by
    agreeing with each other, not only by moving the student.

    Default weight β = 100: Knowledge-Distillation-Zoo's ``example_train_script.sh``,
    which computes this very loss, but on CIFAR-10 (ResNet-110 → ResNet-20, batch
    128), and whose README says its trade-off weights were "not chosen carefully".
    torchdistill's ImageNet recipe uses 0.003, but on another form (the unsquared
    Frobenius distance / b² of unnormalized 128-d projections, batch 32), so it does
    not carry over. No CIFAR-100 value for this loss was found: tune β per setup.
    RepDistiller's β = 0.02 belongs to a different, simplified loss
    (``mean_i Σ_d |s_i − t_i|_d · |s_{i+1} − t_{i+1}|_d`` on unnormalized 128-d
    embeddings, with no kernel and no b×b matrix) and does not carry over.

    Deviations: the paper's objective is ``α·CE + (1 − α)·KD + β·L_CC``; here KD is a
    separate method (list ``kd`` and ``cc`` in one stage for the paper's mix). The
    paper's class-aware batch samplers are not used: batches come from the loader. A
    student embedding with L2 norm below 1e-6 (all ~0, e.g. dead ReLUs) normalizes to
    0 without gradient (:func:`unit_rows`) rather than sending back a ~1e12-times
    gradient; other rows are unchanged. Teacher embeddings are detached before
    ``embed_t``, so no gradient reaches the teacher (``embed_t`` still trains).
    """

    name = "cc"
    family = "relation"
    citation = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019"
    helpers = "embed_s, embed_t: linear maps to embed_dim, only when embed_dim is set"
    default_weight = 100.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "embedding"),
        "teacher_layer": ("teacher", "embedding"),
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        gamma: float = 0.4,
        order: int = 2,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError("gamma must be > 0")
        if order < 1:
            raise ValueError("order (P) must be >= 1: at P = 0 every correlation is the same")
        if order > MAX_ORDER:
            raise ValueError(f"order (P) must be <= {MAX_ORDER}: {MAX_ORDER + 1}! is no float")
        try:  # the largest power correlation_matrix takes at every step: fail now, not then
            float(2 * gamma) ** order
        except OverflowError:
            raise ValueError(f"(2·gamma)^order overflows a float for {gamma=}, {order=}") from None
        if embed_dim is not None and embed_dim < 1:
            raise ValueError("embed_dim must be >= 1 (or null for no projection)")
        check_width("embed_dim", embed_dim)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.gamma = gamma
        self.order = order
        self.embed_dim = embed_dim
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()

    def setup(self, probe: Outputs, context: StageContext) -> None:
        if self.embed_dim is None:
            return
        s = probe.student_features[self.student_layer].flatten(1)
        t = probe.teacher_features[self.teacher_layer].flatten(1)
        self.embed_s = nn.Linear(s.shape[1], self.embed_dim).to(s.device)
        self.embed_t = nn.Linear(t.shape[1], self.embed_dim).to(t.device)

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        # ~8 float32 B×B matrices at the peak of loss + backward, whatever the order (measured).
        return 4 * 8 * batch_size**2

    def loss(self, out: Outputs) -> Tensor:
        s = self.embed_s(out.student_features[self.student_layer].flatten(1).float())
        t = self.embed_t(out.teacher_features[self.teacher_layer].detach().flatten(1).float())
        diff = correlation_matrix(t, self.gamma, self.order) - correlation_matrix(
            s, self.gamma, self.order
        )
        return diff.pow(2).sum() / len(s) ** 2
