"""FitNets: hints from an intermediate teacher layer."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext


class FitNets(DistillMethod):
    """FitNets hint loss (Romero et al., ICLR 2015, arXiv:1412.6550).

    Per sample: mean over elements of ``(r(v_g) − u_h)²``, where ``u_h`` is the
    teacher's hint layer (default: its middle stage), ``v_g`` the student's guided
    layer (default: its middle stage) and ``r`` a learnable regressor — a 1×1
    convolution for feature maps, a linear map for vectors, the identity when the
    shapes already agree. The mean (not the paper's ½·sum) makes the batch average
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
    helpers = "regressor: 1×1 conv (maps) or linear (vectors) when shapes differ"
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
        if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
            self.regressor = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        elif s.dim() == 2 and t.dim() == 2:
            self.regressor = nn.Linear(s.shape[1], t.shape[1])
        else:
            raise UserError(
                f"fitnets: student {self.student_layer!r} gives {tuple(s.shape[1:])} and teacher "
                f"{self.teacher_layer!r} gives {tuple(t.shape[1:])}; a 1×1 regressor needs equal "
                "spatial size: pick layers with the same resolution (student_layer/teacher_layer)"
            )
        self.regressor.to(device=s.device)

    def loss(self, out: Outputs) -> Tensor:
        s = self.regressor(out.student_features[self.student_layer])
        t = out.teacher_features[self.teacher_layer]
        return (s - t).pow(2).flatten(1).mean(dim=1)
