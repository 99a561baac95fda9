"""A sweep's results as data: its ``index.json`` and every finished run's per-epoch
log, read into one :class:`RecipeResult` per recipe and base (what the report's tables
and the plots are drawn from)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smskd.errors import UserError
from smskd.store.tracking import MetricsLog
from smskd.train.selection import best_epoch
from smskd.train.stages import FORGETTING


@dataclass
class RecipeResult:
    """One recipe of a sweep (one base), over the seeds that finished."""

    label: str
    kind: str
    group: str
    base: str
    stages: str
    final: dict[int, float] = field(default_factory=dict)  # seed → last-epoch test acc
    best: dict[int, float] = field(default_factory=dict)  # seed → best-epoch test acc (on test)
    val_final: dict[int, float] = field(default_factory=dict)  # seed → last-epoch val acc
    selected: dict[int, float] = field(default_factory=dict)  # seed → test acc, best-val epoch
    forgetting: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # seed → rows
    wall_time: dict[int, float] = field(default_factory=dict)  # seed → train+eval seconds
    curves: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # seed → records
    runs: dict[int, str] = field(default_factory=dict)  # seed → the run directory read
    same_as: str | None = None  # label of the recipe whose runs these all are

    @property
    def seeds(self) -> int:
        return len(self.final)


@dataclass
class SweepResults:
    index: dict[str, Any]
    recipes: list[RecipeResult]

    def bases(self) -> list[str]:
        return list(dict.fromkeys(r.base for r in self.recipes))

    def groups(self, base: str) -> list[str]:
        return list(dict.fromkeys(r.group for r in self.recipes if r.base == base))

    def of(
        self, base: str, group: str | None = None, kind: str | None = None
    ) -> list[RecipeResult]:
        return [
            r
            for r in self.recipes
            if r.base == base
            and (group is None or r.group == group)
            and (kind is None or r.kind == kind)
        ]

    @property
    def has_validation(self) -> bool:
        return any(r.val_final for r in self.recipes)

    def tuning(self, base: str) -> dict[str, dict[str, Any]]:
        return self.index.get("tuning", {}).get(base, {})

    def teachers(self) -> list[dict[str, Any]]:
        return [t for t in self.index.get("teachers", []) if t.get("final_acc") is not None]


def load_sweep_results(runs_dir: str | Path) -> SweepResults:
    """Read ``index.json`` and every finished run's ``metrics.jsonl`` under ``runs_dir``."""
    root = Path(runs_dir)
    index_path = root / "index.json"
    if not index_path.is_file():
        raise UserError(
            f"{root} has no index.json: point smskd report at a directory written by smskd sweep"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{index_path}: not valid JSON ({err})") from None
    recipes: dict[tuple[str, str], RecipeResult] = {}
    label_of_dir = {run["dir"]: run["label"] for run in index["runs"] if not run.get("same_as")}
    # A recipe is another's copy only if every one of its runs is (single-kd's seed-0 run
    # may be a tuning run while its other seeds are its own).
    copied: dict[tuple[str, str], set[str | None]] = {}
    for run in index["runs"]:
        key = (run["base"], run["label"])
        same = run.get("same_as")
        copied.setdefault(key, set()).add(label_of_dir.get(same) if same else None)
        if key not in recipes:
            recipes[key] = RecipeResult(
                run["label"], run["kind"], run["group"], run["base"], run["stages"]
            )
        recipe = recipes[key]
        run_dir = located(root, same or run["dir"])
        records = MetricsLog(run_dir / "metrics.jsonl").records
        if not (run_dir / "result.json").is_file() or not records:
            continue  # not finished (yet): its seed is not counted
        seed = run["seed"]
        recipe.runs[seed] = str(run_dir.resolve())
        recipe.final[seed] = records[-1]["test_acc"]
        recipe.best[seed] = max(r["test_acc"] for r in records)
        recipe.wall_time[seed] = sum(r["epoch_time"] for r in records)
        recipe.curves[seed] = records
        if records[-1].get("val_acc") is not None:
            recipe.val_final[seed] = records[-1]["val_acc"]
            recipe.selected[seed] = best_epoch(records)["test_acc"]  # type: ignore[index]
        rows = _forgetting_rows(run_dir / FORGETTING)
        if rows:
            recipe.forgetting[seed] = rows
    for key, labels in copied.items():
        if len(labels) == 1:
            recipes[key].same_as = labels.pop()
    return SweepResults(index, list(recipes.values()))


def _forgetting_rows(path: Path) -> list[dict[str, Any]]:
    """A run's forgetting matrix rows (JSON: data, whoever wrote it), or none."""
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path}: not a forgetting matrix written by smskd") from None
    return rows if isinstance(rows, list) else []


def located(root: Path, run_dir: str) -> Path:
    """A run directory as the index names it, or the same path found under ``root``
    (a sweep directory that was moved, or read from another working directory)."""
    path = Path(run_dir)
    if path.is_dir():
        return path
    parts = path.parts
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return path
