"""MiniLM: self-attention distributions and value relations of causal transformers, per token."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def row_kl(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ_j p_j·(log p_j − log q_j)`` over the last axis (one KL per row).

    Entries with ``p_j = 0`` (keys a causal mask hides) add exactly 0 and pass no
    gradient, whatever ``log p`` and ``log q`` hold there (−inf included): never NaN.
    """
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * log_ratio).sum(dim=-1)


def safe_log(probabilities: Tensor) -> Tensor:
    """``log`` floored at the smallest positive float: a probability that underflowed to
    0 gives a large finite log instead of −inf (its gradient is then 0)."""
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def split_heads(values: Tensor, heads: int | None) -> Tensor:
    """``[B, H, T, d]`` as ``heads`` relation heads (MiniLMv2): the H heads concatenated
    back to ``[B, T, H·d]``, then cut into ``heads`` heads of ``H·d/heads``; None keeps H."""
    if heads is None:
        return values
    batch, h, tokens, d = values.shape
    return values.transpose(1, 2).reshape(batch, tokens, heads, h * d // heads).transpose(1, 2)


def causal_log_relation(values: Tensor, heads: int | None) -> Tensor:
    """``log softmax(V·Vᵀ/√d)`` per head, row i over keys 0..i, shape ``[B, R, T, T]``
    (exactly −inf at the keys after the row's own position)."""
    v = split_heads(values, heads)
    tokens, d = v.shape[-2:]
    scores = v @ v.transpose(-1, -2) / math.sqrt(d)
    future = torch.ones(tokens, tokens, dtype=torch.bool, device=v.device).triu(1)
    return F.log_softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def _as_list(taps: str | list[str]) -> list[str]:
    return [taps] if isinstance(taps, str) else list(taps)


def _check_pairs(kind: str, student: list[str], teacher: list[str]) -> None:
    if not student or len(student) != len(teacher):
        raise ValueError(
            f"student_{kind} {student} and teacher_{kind} {teacher} are paired in order: "
            "name the same number (at least one) of each"
        )


@register_method
class LMAttention(DistillMethod):
    """MiniLM deep self-attention distillation (Wang et al., NeurIPS 2020,
    arXiv:2002.10957), for causal language models, per token (``[N]``).

    Two terms, each a KL divergence per head and per query row (teacher first):

    - attention transfer: ``KL(A_t ‖ A_s)`` between the attention probabilities
      ``[B, H, T, T]`` of ``student_attention``/``teacher_attention`` (defaults: each
      model's last layer, as MiniLM), weighted by ``attention_weight``;
    - value relation: ``KL(VR_t ‖ VR_s)`` with ``VR = softmax(V·Vᵀ/√d)`` per head of the
      values ``[B, H, T, d]`` of ``student_values``/``teacher_values`` (defaults: the last
      layer), weighted by ``value_weight``.

    The loss of a token (query row) is the weighted sum of the two terms, each averaged
    over heads and over the layer pairs; rows are then taken where ``token_mask`` is True
    (``[N]``; the engine's mean over tokens gives MiniLM's 1/(A_h·|x|) normalization).
    Without a ``token_mask`` every row counts and a sample's loss is the mean over rows.

    ``relation_heads`` (None: the models' own heads) re-splits the values as MiniLMv2
    (Wang et al., Findings of ACL 2021, arXiv:2012.15828) does: the heads of V are
    concatenated back to ``[B, T, H·d]`` and cut into ``relation_heads`` heads of
    ``H·d/relation_heads``, so models with different head counts can share value
    relations. The attention term always compares the models' own heads, which must then
    be equal in number; with unequal head counts use ``attention_weight: 0`` and
    ``relation_heads`` (MiniLMv2's recipe). A term of weight 0 taps nothing.

    Deviations: MiniLM distills bidirectional BERT; for causal models the value relation
    of row i is taken over keys 0..i only (the same causal mask as the attention, so both
    distributions live on the same keys). Padding keys are not masked beyond that: with
    right padding (after every token in the loss, the usual layout for causal LMs) the
    causal mask already excludes them, with left padding they would enter the value
    relations of later rows (the attention maps the models return exclude them
    themselves). The attention term works on the probabilities the models return, so the
    student's log-probability is floored at the smallest positive float: a key whose
    student probability underflowed to exactly 0 costs a large finite amount, not inf
    (MiniLM's code takes ``log_softmax`` of the scores). Several layer pairs are averaged
    (MiniLM uses the last layer only). Zero-probability keys add exactly 0 (no NaN).
    """

    name = "lm-attention"
    family = "feature"
    needs_sequences = True
    citation = (
        "Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression "
        "of Pre-Trained Transformers, NeurIPS 2020"
    )
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_attention": ("student", "last_attention"),
        "teacher_attention": ("teacher", "last_attention"),
        "student_values": ("student", "last_values"),
        "teacher_values": ("teacher", "last_values"),
    }

    def __init__(
        self,
        student_attention: str | list[str],
        teacher_attention: str | list[str],
        student_values: str | list[str],
        teacher_values: str | list[str],
        relation_heads: int | None = None,
        attention_weight: float = 1.0,
        value_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if attention_weight < 0 or value_weight < 0:
            raise ValueError("attention_weight and value_weight must be >= 0")
        if attention_weight == 0 and value_weight == 0:
            raise ValueError("attention_weight and value_weight are both 0: the loss is empty")
        if relation_heads is not None and relation_heads < 1:
            raise ValueError("relation_heads must be >= 1 (or null for the models' own heads)")
        self.student_attention = _as_list(student_attention)
        self.teacher_attention = _as_list(teacher_attention)
        self.student_values = _as_list(student_values)
        self.teacher_values = _as_list(teacher_values)
        _check_pairs("attention", self.student_attention, self.teacher_attention)
        _check_pairs("values", self.student_values, self.teacher_values)
        self.relation_heads = relation_heads
        self.attention_weight = attention_weight
        self.value_weight = value_weight

    def _taps(self, side: str) -> list[str]:
        taps: list[str] = []
        if self.attention_weight:
            taps += self.student_attention if side == "student" else self.teacher_attention
        if self.value_weight:
            taps += self.student_values if side == "student" else self.teacher_values
        return taps

    @property
    def attention_pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_attention, self.teacher_attention, strict=True))

    @property
    def value_pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.student_values, self.teacher_values, strict=True))

    def setup(self, probe: Outputs, context: StageContext) -> None:
        for s_name, t_name in self.attention_pairs if self.attention_weight else []:
            s, t = probe.student_features[s_name], probe.teacher_features[t_name]
            shapes = f"student {s_name!r} gives {tuple(s.shape)} and teacher {t_name!r} gives"
            shapes += f" {tuple(t.shape)}"
            if s.dim() != 4 or t.dim() != 4 or s.shape[-1] != s.shape[-2]:
                raise UserError(
                    f"lm-attention: {shapes}; attention probabilities must be "
                    "[batch, heads, tokens, tokens]: name attention taps in "
                    "student_attention/teacher_attention"
                )
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise UserError(f"lm-attention: {shapes}; they must cover the same tokens")
            if s.shape[1] != t.shape[1]:
                raise UserError(
                    f"lm-attention: {shapes}: {s.shape[1]} heads against {t.shape[1]}, and "
                    "attention maps are compared head by head; use attention_weight: 0 with "
                    "relation_heads (value relations only, as MiniLMv2) or models with as "
                    "many heads"
                )
        for s_name, t_name in self.value_pairs if self.value_weight else []:
            s, t = probe.student_features[s_name], probe.teacher_features[t_name]
            shapes = f"student {s_name!r} gives {tuple(s.shape)} and teacher {t_name!r} gives"
            shapes += f" {tuple(t.shape)}"
            if s.dim() != 4 or t.dim() != 4:
                raise UserError(
                    f"lm-attention: {shapes}; values must be [batch, heads, tokens, head_dim]: "
                    "name value taps in student_values/teacher_values"
                )
            if s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
                raise UserError(f"lm-attention: {shapes}; they must cover the same tokens")
            if self.relation_heads is None and s.shape[1] != t.shape[1]:
                raise UserError(
                    f"lm-attention: {shapes}: {s.shape[1]} heads against {t.shape[1]}; set "
                    "relation_heads to compare value relations over a common number of heads"
                )
            for who, v in (("student", s), ("teacher", t)):
                width = v.shape[1] * v.shape[3]
                if self.relation_heads is not None and width % self.relation_heads:
                    raise UserError(
                        f"lm-attention: relation_heads {self.relation_heads} does not divide "
                        f"the {who}'s value width {width} (heads × head_dim); pick a divisor "
                        "of both models' widths"
                    )

    def loss(self, out: Outputs) -> Tensor:
        per_row: Tensor | int = 0
        if self.attention_weight:
            terms = []
            for s_name, t_name in self.attention_pairs:
                a_s = out.student_features[s_name].float()
                a_t = out.teacher_features[t_name].float().detach()
                terms.append(row_kl(a_t, safe_log(a_t), safe_log(a_s)).mean(dim=1))
            per_row = per_row + self.attention_weight * torch.stack(terms).mean(dim=0)
        if self.value_weight:
            terms = []
            for s_name, t_name in self.value_pairs:
                log_s = causal_log_relation(
                    out.student_features[s_name].float(), self.relation_heads
                )
                log_t = causal_log_relation(
                    out.teacher_features[t_name].float().detach(), self.relation_heads
                )
                terms.append(row_kl(log_t.exp(), log_t, log_s).mean(dim=1))
            per_row = per_row + self.value_weight * torch.stack(terms).mean(dim=0)
        assert isinstance(per_row, Tensor)  # at least one weight is > 0
        if out.token_mask is not None:
            return per_row[out.token_mask]
        return per_row.mean(dim=1)
