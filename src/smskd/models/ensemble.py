"""Several frozen teachers seen as one: the average of their logits.

The paper's multi-teacher baseline distills from two or more teachers of different
architectures at once. Averaging logits (not probabilities) is what the common
multi-teacher KD baselines do, and it keeps the ensemble a plain logit producer,
so KD, DKD, DIST, LSKD and the reference's TCP weights use it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class LogitAverage(nn.Module):
    """``forward(x) = mean_j teacher_j(x)``; no taps of its own (logits only)."""

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise ValueError("an ensemble needs at least two teachers")
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([teacher(x).float() for teacher in self.teachers]).mean(dim=0)
