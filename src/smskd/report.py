"""Readable results: a markdown table of runs and the provenance of the numbers."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    recipe: str
    stages: str
    final_acc: float
    best_acc: float
    wall_time: float


def git_commit(path: Path | None = None) -> str:
    """Short commit of the checkout at ``path``, with ``-dirty`` if files differ from it."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=path or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def results_table(rows: list[Row], teacher_acc: float | None = None) -> str:
    """Markdown table; the best final accuracy among the rows is bold."""
    best = max((r.final_acc for r in rows), default=None)
    lines = [
        "| recipe | stages | test acc (last epoch) | test acc (best epoch) | train+eval time |",
        "|---|---|---:|---:|---:|",
    ]
    if teacher_acc is not None:
        lines.append(f"| teacher | labels only | {teacher_acc:.2f} | – | – |")
    for r in rows:
        acc = f"{r.final_acc:.2f}"
        acc = f"**{acc}**" if r.final_acc == best else acc
        lines.append(f"| {r.recipe} | {r.stages} | {acc} | {r.best_acc:.2f} | {r.wall_time:.1f}s |")
    return "\n".join(lines)


def write_report(
    path: Path, title: str, rows: list[Row], teacher_acc: float | None, notes: list[str]
) -> None:
    body = [
        f"# {title}",
        "",
        results_table(rows, teacher_acc),
        "",
        "Accuracy is top-1 on the test split, in percent. *Last epoch* is the headline;",
        "*best epoch* picks the best of all epochs on the test split itself, so it is",
        "optimistic and shown only for comparison with papers that report it.",
        "",
        *[f"- {note}" for note in notes],
        f"- smskd commit `{git_commit(path.parent)}`, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}",
        "",
    ]
    path.write_text("\n".join(body))
