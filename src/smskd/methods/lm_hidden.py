"""TinyBERT-style hidden-state matching between transformer layers, per token."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """TinyBERT's uniform strategy, 1-based: student layer m ↔ teacher layer
    ``g(m) = ⌊m·N/M⌋`` for m = 1..M (M = 2, N = 4 → 2, 4)."""
    return [m * num_teacher // num_student for m in range(1, num_student + 1)]


@register_method
class LMHidden(DistillMethod):
    """Hidden-state distillation (TinyBERT, Jiao et al., Findings of EMNLP 2020,
    arXiv:1909.10351, Eq. 8: ``MSE(H_S·W_h, H_T)``), per token (``[N]``).

    Pairs of (student, teacher) layer outputs ``[B, T, D]``; the loss of a token is the
    mean over the pairs of the mean over the teacher's width of ``(H_s·W_h − H_t)²`` at
    that position, taken at the positions ``token_mask`` keeps (padding is in no loss and
    no mean). Without a ``token_mask`` (vectors ``[B, D]``), each sample is one token
    (``[B]``); a ``[B, T, D]`` pair without a mask averages all T positions of a sample.

    ``layer_map``: ``uniform`` (default), TinyBERT's uniform strategy: the M student
    layers ``student_layers`` (default: every layer of the student's ``features``) are
    matched to teacher layers ``g(m) = m·N/M`` (1-based, m = 1..M) of the N
    ``teacher_layers`` (default: every teacher layer), so 2 student and 4 teacher layers
    pair student 1, 2 with teacher 2, 4. When N is not a multiple of M, ``g(m) = ⌊m·N/M⌋``
    (the last student layer still meets the last teacher layer). The mapping is made
    when the method is built, so only the mapped teacher layers are tapped. A student
    with more layers than the teacher is refused in this mode. ``explicit``: both lists
    have the same length and are paired by position.

    Deviations: TinyBERT always learns ``W_h``; here a linear projection (with bias) is
    learned only for a pair whose widths differ, and equal widths are compared directly
    (the identity), as FitNets' regressor in this library: the student's own last
    linear map in each layer can absorb any rotation, so the extra matrix adds
    parameters without adding expressiveness, and the loss then measures the states
    themselves. TinyBERT's embedding-layer term (Eq. 9) is the same loss on the
    embedding outputs: name those modules in the lists (explicit map). TinyBERT sums the
    layer terms; here they are averaged, so the scale does not grow with depth (use
    ``weight`` to rescale).
    """

    name = "lm-hidden"
    family = "feature"
    needs_sequences = True
    citation = (
        "Jiao et al., TinyBERT: Distilling BERT for Natural Language Understanding, "
        "Findings of EMNLP 2020"
    )
    helpers = "linear projection per layer pair whose widths differ"
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layers": ("student", "features"),
        "teacher_layers": ("teacher", "features"),
    }

    def __init__(
        self,
        student_layers: list[str],
        teacher_layers: list[str],
        layer_map: Literal["uniform", "explicit"] = "uniform",
    ) -> None:
        super().__init__()
        if not student_layers or not teacher_layers:
            raise ValueError("student_layers and teacher_layers must each name at least one layer")
        if layer_map == "uniform":
            if len(student_layers) > len(teacher_layers):
                raise ValueError(
                    f"student_layers {student_layers} has {len(student_layers)} layers, more "
                    f"than the {len(teacher_layers)} of teacher_layers {teacher_layers}; the "
                    "uniform layer_map maps a shallower student onto a deeper teacher: use "
                    "layer_map explicit with lists of equal length"
                )
            picked = uniform_layer_map(len(student_layers), len(teacher_layers))
            teacher_layers = [teacher_layers[g - 1] for g in picked]
        elif layer_map == "explicit":
            if len(student_layers) != len(teacher_layers):
                raise ValueError(
                    f"student_layers {student_layers} has {len(student_layers)} layers but "
                    f"teacher_layers {teacher_layers} has {len(teacher_layers)}; the explicit "
                    "layer_map pairs them in order, so name as many of each (or use uniform)"
                )
        else:
            raise ValueError(f"layer_map {layer_map!r} is not one of uniform, explicit")
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.layer_map = layer_map
        self.projections = nn.ModuleList()

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_layers, self.teacher_layers, strict=True))

    def setup(self, probe: Outputs, context: StageContext) -> None:
        self.projections = nn.ModuleList()
        for s_name, t_name in self.pairs:
            s, t = probe.student_features[s_name], probe.teacher_features[t_name]
            if s.dim() not in (2, 3) or t.dim() != s.dim() or s.shape[:-1] != t.shape[:-1]:
                raise UserError(
                    f"lm-hidden: student {s_name!r} gives {tuple(s.shape)} and teacher "
                    f"{t_name!r} gives {tuple(t.shape)}; hidden states must both be "
                    "[batch, tokens, width] (or both [batch, width]) over the same tokens: "
                    "name transformer layer outputs in student_layers/teacher_layers"
                )
            if s.shape[-1] == t.shape[-1]:
                self.projections.append(nn.Identity())
            else:
                self.projections.append(nn.Linear(s.shape[-1], t.shape[-1]))
        self.to(device=probe.student_features[self.student_layers[0]].device)

    def loss(self, out: Outputs) -> Tensor:
        if len(self.projections) != len(self.pairs):
            raise RuntimeError("lm-hidden: setup() must run before loss()")
        terms = []
        for (s_name, t_name), projection in zip(self.pairs, self.projections, strict=True):
            s = projection(out.student_features[s_name].float())
            t = out.teacher_features[t_name].float().detach()
            terms.append((s - t).pow(2).mean(dim=-1))  # [B, T] (or [B])
        per_position = torch.stack(terms).mean(dim=0)
        if out.token_mask is not None:
            return per_position[out.token_mask]
        return per_position if per_position.dim() == 1 else per_position.flatten(1).mean(dim=1)
