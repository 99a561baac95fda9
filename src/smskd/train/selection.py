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


def selection_score(record: dict[str, Any]) -> float | None:
    """How good an epoch is on validation, higher better: its accuracy, or for a language
    model (a record with ``val_ppl``) minus its loss — perplexity is what language models
    are judged on, and next-token accuracy ignores the probability the rest receives.
    None without a validation split."""
    if record.get("val_ppl") is not None:
        return -record["val_loss"]
    return record.get("val_acc")


def best_epoch(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The record of the epoch best on validation (:func:`selection_score`; the earliest
    of equals), or None when the run has no validation split."""
    scored = [r for r in records if selection_score(r) is not None]
    return max(scored, key=selection_score, default=None)  # type: ignore[arg-type]


class StageBest:
    """The student at the best validation epoch of each stage. The running stage's best
    is kept in memory and in ``last.pt`` (a resume picks it up exactly); a finished
    stage's in ``checkpoints/stage<k>-best.pt``, written at the stage's end, before the
    ``last.pt`` that records its SHA-256 (so a kill never leaves a record of a file that
    was overwritten). Every rank keeps it; only the rank that ``writes`` saves files."""

    def __init__(self, path: Callable[[int], Path] | None, writes: bool) -> None:
        self.path = path  # stage number → its best student's file; None: no run directory
        self.writes = writes
        self.scores: dict[int, float] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.hashes: dict[int, str] = {}

    def offer(self, stage: int, score: float, student: nn.Module) -> None:
        """Keep ``student`` if its :func:`selection_score` beats stage ``stage``'s best so far."""
        if stage in self.scores and score <= self.scores[stage]:
            return
        self.scores[stage] = score
        self.weights[stage] = {k: v.detach().clone() for k, v in student.state_dict().items()}

    def finish(self, stage: int) -> None:
        """Stage ``stage`` ended: its best student goes to its file."""
        if self.writes and self.path is not None and stage in self.weights:
            self.hashes[stage] = atomic_save(self.weights[stage], self.path(stage))

    def running(self, stage: int) -> dict[str, Any] | None:
        """What ``last.pt`` keeps of the running stage ``stage``."""
        if stage not in self.scores:
            return None
        return {"stage": stage, "score": self.scores[stage], "weights": self.weights[stage]}

    def restore(self, saved: dict[str, Any] | None, stage: int, records: Sequence[dict]) -> None:
        """A resumed run: the running stage's best as ``last.pt`` kept it, or (a checkpoint
        written before it kept one) the best score from the stage's logged epochs."""
        if saved is not None and saved.get("stage") == stage:
            self.scores[stage] = saved["score"]
            self.weights[stage] = saved["weights"]
            return
        chosen = best_epoch([r for r in records if r["stage"] == stage])
        if chosen is not None:
            self.scores[stage] = selection_score(chosen)  # type: ignore[assignment]

    def of(self, stage: int) -> dict[str, Tensor]:
        """The best student of stage ``stage``, from memory or its file."""
        if stage not in self.weights:
            assert self.path is not None, f"stage {stage}'s best student was never kept"
            self.weights[stage] = load_state_dict(self.path(stage), sha256=self.hashes.get(stage))
        return self.weights[stage]
