"""FitNets: hints from an intermediate teacher layer."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


@register_method
class FitNets(DistillMethod):
    """FitNets hint loss (Romero et al., ICLR 2015, arXiv:1412.6550).

    Per sample: mean over elements of ``(r(v_g) − u_h)²``, where ``u_h`` is the
    teacher's hint layer (default: its middle stage), ``v_g`` the student's guided
    layer (default: its middle stage) and ``r`` a learnable regressor — the identity
    when the shapes agree, a linear map for vectors, a 1×1 convolution for maps of
    equal resolution. Across resolutions (heterogeneous pairs such as ResNet-50 →
    MobileNetV2) it bridges the way RepDistiller's ``ConvReg`` does: a 3×3 stride-2
    convolution when the student's map is twice as large, a 4×4 stride-2 transposed
    convolution when it is half as large, a ``(1+ΔH)×(1+ΔW)`` convolution when it is
    larger by another amount. The mean (not the paper's ½·sum) makes the batch average
    equal ``nn.MSELoss``. Default weight β = 1: the CIFAR recipes of RepDistiller and
    mdistiller use β = 100 on batch-normalized conv features, which swamps the CE
    term (and kills ReLUs) on un-normalized or small networks; set ``weight: 100``
    to reproduce them.

    Deviation: the paper trains the hint in a separate stage before KD. In SMSKD
    the hint *is* a stage, so it is trained alongside the stage's CE term
    (``ce_weight: 0`` gives the paper's pure hint stage).
    """

    name = "fitnets"
    family = "feature"
    citation = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"
    helpers = "regressor when shapes differ: linear, 1×1 conv, or ConvReg-style resampling conv"
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "hint"),
        "teacher_layer": ("teacher", "hint"),
    }

    def __init__(self, student_layer: str, teacher_layer: str) -> None:
        super().__init__()
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.regressor: nn.Module = nn.Identity()

    def setup(self, probe: Outputs, context: StageContext) -> None:
        s = probe.student_features[self.student_layer]
        t = probe.teacher_features[self.teacher_layer]
        if s.shape[1:] == t.shape[1:]:
            return
        if s.dim() == 2 and t.dim() == 2:
            self.regressor = nn.Linear(s.shape[1], t.shape[1])
        elif s.dim() == 4 and t.dim() == 4 and (regressor := _map_regressor(s, t)) is not None:
            self.regressor = regressor
        else:
            raise UserError(
                f"fitnets: student {self.student_layer!r} gives {tuple(s.shape[1:])} and teacher "
                f"{self.teacher_layer!r} gives {tuple(t.shape[1:])}; no regressor bridges them "
                "(the student map must be at least as large, or half as large): pick other "
                "layers with student_layer/teacher_layer"
            )
        self.regressor.to(device=s.device)

    def loss(self, out: Outputs) -> Tensor:
        s = self.regressor(out.student_features[self.student_layer])
        t = out.teacher_features[self.teacher_layer]
        return (s - t).pow(2).flatten(1).mean(dim=1)


def _map_regressor(s: Tensor, t: Tensor) -> nn.Module | None:
    """A conv from the student's map to the teacher's shape, or None if none fits."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = s.shape[1:], t.shape[1:]
    if (h_s, w_s) == (h_t, w_t):
        return nn.Conv2d(c_s, c_t, kernel_size=1)
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if (2 * h_s, 2 * w_s) == (h_t, w_t):
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if h_s >= h_t and w_s >= w_t:
        return nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    return None
