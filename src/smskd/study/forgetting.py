"""The forgetting matrices of a sweep's runs, summarized: the mean stage × measure matrix
of a recipe, and how much of stage 1's knowledge its later stages took away
(rows as :mod:`smskd.train.forgetting` writes them)."""

from __future__ import annotations

from typing import Any

from smskd.study.results import RecipeResult
from smskd.study.stats import mean_std


def measures_of(recipe: RecipeResult) -> list[str]:
    """Every measure in the recipe's rows, in first-seen order."""
    seen: dict[str, None] = {}
    for rows in recipe.forgetting.values():
        for row in rows:
            seen.update(dict.fromkeys(row["measures"]))
    return list(seen)


def mean_matrix(recipe: RecipeResult) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Row labels (``1 kd``), measures, and each cell's mean over the seeds that have it."""
    measures = measures_of(recipe)
    stages: dict[int, str] = {}
    cells: dict[tuple[int, str], list[float]] = {}
    for rows in recipe.forgetting.values():
        for row in rows:
            stages[row["stage"]] = row["label"]
            for key, value in row["measures"].items():
                if value is not None:
                    cells.setdefault((row["stage"], key), []).append(value)
    numbers = sorted(stages)
    matrix = [
        [mean_std(cells[(n, m)])[0] if (n, m) in cells else None for m in measures] for n in numbers
    ]
    return [f"{n} {stages[n]}" for n in numbers], measures, matrix


def stage_one_forgetting(recipe: RecipeResult) -> dict[str, dict[int, float]]:
    """Per measure, per seed: how far the last stage end moved from stage 1's end on what
    stage 1 taught. ``loss:<m>`` of stage 1's methods: the rise of that loss (positive:
    forgotten); ``teacher_agreement``: its change; ``kl_to_stage1``: the last student's
    KL from stage 1's student."""
    out: dict[str, dict[int, float]] = {}
    for seed, rows in recipe.forgetting.items():
        if len(rows) < 2 or rows[0]["stage"] != 1:
            continue
        first, last = rows[0]["measures"], rows[-1]["measures"]
        # Files written before per-stage columns (loss:kd@1) kept one loss:kd column for
        # a method two stages use, measured with the later stage's options: not one loss.
        later = {name for row in rows[1:] for name in row.get("methods", [])}
        taught = [
            key
            for key in first
            if key.startswith("loss:")
            and _trained_in(rows[0], key)
            and not ("@" not in key and key.removeprefix("loss:") in later)
        ]
        for key in [*taught, "teacher_agreement"]:
            if first.get(key) is not None and last.get(key) is not None:
                out.setdefault(f"Δ {key}", {})[seed] = last[key] - first[key]
        if last.get("kl_to_stage1") is not None:
            out.setdefault("kl_to_stage1", {})[seed] = last["kl_to_stage1"]
    return out


def _trained_in(row: dict[str, Any], key: str) -> bool:
    """Whether the stage of ``row`` trained the method of measure ``key`` (``loss:kd``,
    or ``loss:kd@1`` for a method that several stages use)."""
    name, _, at = key.removeprefix("loss:").partition("@")
    trained = name in row.get("methods", row["label"].split("+"))
    return trained and (not at or int(at) == row["stage"])
