"""Where a run's progress goes as it trains: the log, ``metrics.jsonl``, the tracker
(step tables, TensorBoard, MLflow) and a progress bar on the terminal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from smskd.config import Stage
from smskd.store.tracking import MetricsLog, RunTracker


class ProgressBar:
    """One bar over every step of the run: stage, epoch, loss, accuracy and ETA."""

    def __init__(self, name: str, total: int | None, enabled: bool) -> None:
        # disable=None: the bar shows on a terminal only, never in logs or CI output.
        self.bar = tqdm(
            total=total,
            desc=name,
            unit="step",
            disable=None if enabled else True,
            leave=False,
            dynamic_ncols=True,
        )
        self.name = name
        self.steps = 0

    def describe(self, stage: int, stages: int, label: str, epoch: int, epochs: int) -> None:
        self.bar.set_description(
            f"{self.name} stage {stage}/{stages} {label} epoch {epoch}/{epochs}", refresh=False
        )

    def step(self, terms: dict[str, torch.Tensor]) -> None:
        self.bar.update(1)
        self.steps += 1
        if self.steps % 20 == 0 and not self.bar.disable:  # .item() syncs; keep it rare
            self.bar.set_postfix(loss=f"{terms['loss'].item():.3f}", refresh=False)

    def epoch_done(self, loss: float, acc: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")

    def close(self) -> None:
        self.bar.close()


@dataclass
class Reporting:
    """Sends each step, epoch and stage of a run where it belongs. Stages are numbered
    from 1 here, as users read them."""

    name: str
    log: Callable[[str], None]
    metrics: MetricsLog
    tracker: RunTracker
    bar: ProgressBar

    def start_epoch(
        self, stage: int, stages: int, spec: Stage, epoch: int, lr: float, first: bool
    ) -> None:
        self.bar.describe(stage, stages, spec.label, epoch, spec.epochs)
        self.tracker.start_epoch(stage, spec.label, epoch, lr, first=first)

    def step(self, terms: dict[str, torch.Tensor]) -> None:
        self.bar.step(terms)
        self.tracker.step(terms)

    def end_epoch(self, record: dict[str, Any]) -> None:
        # Call it before the epoch's checkpoint: a resume drops records past its
        # checkpoint, never misses one.
        self.metrics.log(record)
        self.tracker.end_epoch(record)
        self.bar.epoch_done(record["train_loss"], record["test_acc"])

    def end_stage(self, stage: int, stages: int, label: str, seconds: float) -> None:
        records = [r for r in self.metrics.records if r["stage"] == stage]
        if records:
            last = records[-1]
            val = f"val acc {last['val_acc']:.2f}%, " if "val_acc" in last else ""
            self.log(
                f"{self.name}: stage {stage}/{stages} {label}: {val}"
                f"test acc {last['test_acc']:.2f}%, {seconds:.1f}s"
            )

    def close(self, status: str) -> None:
        self.bar.close()
        self.tracker.close(status)
