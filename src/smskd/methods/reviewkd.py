"""Knowledge review: student features fused deep to shallow, matched level by level."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method

PYRAMID_LEVELS = (4, 2, 1)


def hierarchical_context_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """HCL of two ``[B, C, H, W]`` maps, shape ``[B]``.

    Squared error averaged over (C, H, W) at full resolution (weight 1) and after
    adaptive average pooling to 4×4, 2×2, 1×1, skipping pooled sizes not smaller than
    the map. The weight halves with each level actually used, so it depends on the map
    size: an 8×8 map weighs its levels 1, ½, ¼, ⅛, a 4×4 map its full, 2×2, 1×1 levels
    1, ½, ¼, a 1×1 map only the full level. Divided by the sum of the weights used.
    """
    s, t = student.float(), teacher.float()
    loss = (s - t).pow(2).flatten(1).mean(dim=1)
    weight, total = 1.0, 1.0
    for level in PYRAMID_LEVELS:
        if level >= min(s.shape[2:]):
            continue
        weight /= 2
        pooled = F.adaptive_avg_pool2d(s, level) - F.adaptive_avg_pool2d(t, level)
        loss = loss + weight * pooled.pow(2).flatten(1).mean(dim=1)
        total += weight
    return loss / total


class _ABF(nn.Module):
    """Attention-based fusion of one student level with the fused deeper levels."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.project = nn.Sequential(
            nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        )
        # Two sigmoid maps weigh this level against the deeper one at every position.
        self.attention = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the official initialization

    def forward(
        self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Return (the map compared with the teacher, the residual for shallower levels)."""
        x = self.reduce(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            z = self.attention(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


@register_method
class ReviewKD(DistillMethod):
    """Knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021, arXiv:2104.09044).

    The student's stage outputs ``S_1..S_n`` (shallow→deep) are fused from deep to
    shallow by attention-based fusion (ABF) modules: level i reduces ``S_i`` to a mid
    width by 1×1 conv + BN, blends it with the upsampled (nearest) fused map of level
    i+1 using two sigmoid attention maps from a 1×1 conv, resizes to the teacher's
    H×W, and projects to the teacher's channels with 3×3 conv + BN. Per sample the
    loss is ``Σ_i HCL(ABF_i, T_i)`` (:func:`hierarchical_context_loss`); everything in
    it is a per-sample mean, so the batch mean equals the official value. The mid
    width is ``min(512, channels of the student's deepest level)``, the out widths the
    teacher's channels, as in the official code. ``pooled_level`` adds, as the
    official CIFAR code does, the globally average-pooled last maps as a deepest
    1×1 level.

    Default weight β = 5: mdistiller's only CIFAR-100 config
    (``configs/cifar100/reviewkd.yaml``, ``REVIEWKD_WEIGHT: 5.0``) and 5 of the 8
    teacher-student pairs in the official ``CIFAR-100/script/reviewKD.sh`` (the others
    use 8, 0.6 and 1). The value 1 is only the argparse default of the official
    ``train.py`` and of mdistiller's ``cfg.py``. Warm-up: the official code multiplies
    the loss by ``min(1, epoch/20)`` over 240 epochs. Here the factor before epoch e
    (0-based) is ``min(1, (e+1)/(warmup_fraction·epochs))``; the +1 (as mdistiller
    counts epochs) keeps a short stage's first epoch from having no review loss at
    all, and the fraction (default 20/240) scales the warm-up to the stage, which in
    SMSKD is usually far shorter than 240 epochs; 0 disables it. The factor changes
    per epoch only, so a stage of at most 1/warmup_fraction epochs (12 with the
    default) has no warm-up at all: its first epoch already uses factor 1.

    A training batch of one sample (a loader's short last batch) gives loss 0: the
    BatchNorm layers of the ABFs cannot take batch statistics over the single value
    per channel of the pooled 1×1 level (PyTorch raises an error), so that batch
    trains with the other terms only. Teacher maps are detached here, so no gradient
    can reach the teacher whatever the caller passes.

    Deviations: both sides use the tapped module outputs (post-activation), whereas the
    official code reads the teacher's pre-activation stage outputs; the pooled level is
    computed from the last tapped maps rather than taken from the network; the
    warm-up is scaled to the stage; a training batch of one sample gives loss 0.
    """

    name = "reviewkd"
    family = "feature"
    citation = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021"
    helpers = "one attention-based fusion (ABF) module per level"
    default_weight = 5.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layers": ("student", "features"),
        "teacher_layers": ("teacher", "features"),
    }

    def __init__(
        self,
        student_layers: list[str],
        teacher_layers: list[str],
        pooled_level: bool = True,
        max_mid_channels: int = 512,
        warmup_fraction: float = 20 / 240,
    ) -> None:
        super().__init__()
        if not student_layers or not teacher_layers:
            raise ValueError("student_layers and teacher_layers must name at least one layer")
        if max_mid_channels < 1:
            raise ValueError("max_mid_channels must be >= 1")
        if not 0 <= warmup_fraction <= 1:
            raise ValueError("warmup_fraction must be in [0, 1]")
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.pooled_level = pooled_level
        self.max_mid_channels = max_mid_channels
        self.warmup_fraction = warmup_fraction
        self.warmup = 1.0  # until start_epoch sets it
        self.abfs = nn.ModuleList()

    def _levels(self, out: Outputs) -> tuple[list[Tensor], list[Tensor]]:
        s = [out.student_features[name] for name in self.student_layers]
        t = [out.teacher_features[name].detach() for name in self.teacher_layers]
        if self.pooled_level:
            s.append(s[-1].mean(dim=(2, 3), keepdim=True))
            t.append(t[-1].mean(dim=(2, 3), keepdim=True))
        return s, t

    def setup(self, probe: Outputs, context: StageContext) -> None:
        if len(self.student_layers) != len(self.teacher_layers):
            raise UserError(
                f"reviewkd pairs layers one to one, but the student gives "
                f"{len(self.student_layers)} ({', '.join(self.student_layers)}) and the teacher "
                f"{len(self.teacher_layers)} ({', '.join(self.teacher_layers)}): name as many "
                "student_layers as teacher_layers"
            )
        for s_name, t_name in zip(self.student_layers, self.teacher_layers, strict=True):
            s, t = probe.student_features[s_name], probe.teacher_features[t_name]
            if s.dim() != 4 or t.dim() != 4:
                raise UserError(
                    f"reviewkd: student {s_name!r} gives {tuple(s.shape[1:])} and teacher "
                    f"{t_name!r} gives {tuple(t.shape[1:])}; both must be feature maps "
                    "(C, H, W): name conv stages in student_layers/teacher_layers"
                )
        student, teacher = self._levels(probe)
        mid = min(self.max_mid_channels, student[-1].shape[1])
        deepest = len(student) - 1
        self.abfs = nn.ModuleList(
            _ABF(s.shape[1], mid, t.shape[1], fuse=i < deepest)
            for i, (s, t) in enumerate(zip(student, teacher, strict=True))
        )
        self.abfs.to(device=student[0].device)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        length = self.warmup_fraction * epochs
        self.warmup = min(1.0, (epoch + 1) / length) if length > 0 else 1.0

    def loss(self, out: Outputs) -> Tensor:
        student, teacher = self._levels(out)
        if self.training and len(student[0]) == 1:
            # Zero, yet tied to the student's graph so that backward() still works when
            # this is the stage's only term.
            return 0.0 * student[0].float().flatten(1).sum(dim=1)
        residual: Tensor | None = None
        total = student[0].new_zeros(len(student[0]), dtype=torch.float32)
        for i in reversed(range(len(student))):
            fused, residual = self.abfs[i](student[i], residual, tuple(teacher[i].shape[2:]))
            total = total + hierarchical_context_loss(fused, teacher[i])
        return self.warmup * total
