"""What a run chooses, chosen on validation only (DESIGN.md §6).

:func:`best_epoch` picks a run's selected epoch from its records; :class:`StageBest`
keeps the student of each stage's best validation epoch, for ``reference.snapshot:
best``. Neither is ever given a test number: a test in the suite trains the same run
against two different test splits and requires identical students.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from smskd.store.checkpoint import atomic_save, load_state_dict

SELECTION_KEY = "val_acc"


def best_epoch(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The record of the epoch with the highest validation accuracy (the earliest of
    equals), or None when the run has no validation split."""
    scored = [r for r in records if r.get(SELECTION_KEY) is not None]
    return max(scored, key=lambda r: r[SELECTION_KEY], default=None)


class StageBest:
    """The student at the best validation epoch of each stage, in memory and (when the
    run has a directory) in ``checkpoints/stage<k>-best.pt``, with its SHA-256."""

    def __init__(self, path: Callable[[int], Path] | None) -> None:
        self.path = path  # stage number → where its best student is saved; None: not saved
        self.scores: dict[int, float] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.hashes: dict[int, str] = {}

    def offer(self, stage: int, val_acc: float, student: nn.Module) -> None:
        """Keep ``student`` if its ``val_acc`` beats stage ``stage``'s best so far."""
        if stage in self.scores and val_acc <= self.scores[stage]:
            return
        self.scores[stage] = val_acc
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.weights[stage] = state
        if self.path is not None:
            self.hashes[stage] = atomic_save(state, self.path(stage))

    def resume(self, stage: int, records: Sequence[dict[str, Any]]) -> None:
        """Pick up stage ``stage``'s best so far from its logged epochs (a resumed run)."""
        chosen = best_epoch([r for r in records if r["stage"] == stage])
        if chosen is not None:
            self.scores[stage] = chosen[SELECTION_KEY]

    def of(self, stage: int) -> dict[str, Tensor]:
        """The best student of stage ``stage``, from memory or its file."""
        if stage not in self.weights:
            assert self.path is not None, f"stage {stage}'s best student was never kept"
            self.weights[stage] = load_state_dict(self.path(stage), sha256=self.hashes.get(stage))
        return self.weights[stage]
