"""``smskd quickstart``: teacher, then scratch / single / joint / SMSKD on the digits,
and their one-seed table (``report.md``).

The SMSKD run is :func:`quickstart_config` (also ``configs/quickstart.yaml``, kept
equal by a test); the other rows are its baselines at the same student budget
(:mod:`smskd.study.recipes`). Re-running into the same directory reuses finished runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smskd.config import RunConfig, validate
from smskd.experiment import distill, evaluate_checkpoint, own_teachers, resolve_teachers
from smskd.store import rundir
from smskd.store.provenance import git_commit, software
from smskd.study.recipes import recipe

QUICKSTART = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 64},
    "teacher": {
        "model": "convnet-m",
        "epochs": 30,
        "optimizer": {"name": "sgd", "lr": 0.05},
    },
    "student": {"model": "convnet-xs"},
    "stages": [
        {"methods": ["kd"], "epochs": 10},
        # β = 10 here: the CIFAR recipes' 100 swamps CE on these tiny nets (1 is the default).
        {"methods": [{"name": "fitnets", "weight": 10.0}], "epochs": 10},
        {"methods": ["rkd"], "epochs": 10},
    ],
    "reference": {"weighting": "inverse_tcp", "lam": 1.0, "temperature": 4.0},
}


def quickstart_config(
    teacher_epochs: int | None = None, stage_epochs: int | None = None, seed: int | None = None
) -> RunConfig:
    cfg: RunConfig = validate(RunConfig, QUICKSTART, "quickstart")
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    if teacher_epochs is not None:
        cfg = cfg.model_copy(
            update={"teacher": cfg.teacher.model_copy(update={"epochs": teacher_epochs})}
        )
    if stage_epochs is not None:
        stages = [s.model_copy(update={"epochs": stage_epochs}) for s in cfg.stages]
        cfg = cfg.model_copy(update={"stages": stages})
    return cfg


@dataclass
class Row:
    """One recipe of the quickstart (one seed)."""

    recipe: str
    stages: str
    final_acc: float
    best_acc: float
    wall_time: float


def _table(rows: list[Row], teacher_acc: float | None = None) -> str:
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


def _write_report(
    path: Path, title: str, rows: list[Row], teacher_acc: float | None, notes: list[str]
) -> None:
    body = [
        f"# {title}",
        "",
        _table(rows, teacher_acc),
        "",
        "Accuracy is top-1 on the test split, in percent. *Last epoch* is the headline;",
        "*best epoch* picks the best of all epochs on the test split itself, so it is",
        "optimistic and shown only for comparison with papers that report it.",
        "",
        *[f"- {note}" for note in notes],
        f"- smskd commit `{git_commit()}`, {software()}",
        "",
    ]
    path.write_text("\n".join(body))


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    *,
    teacher_epochs: int | None = None,
    stage_epochs: int | None = None,
    seed: int | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[Row]:
    out = Path(out_dir)
    cfg = quickstart_config(teacher_epochs, stage_epochs, seed)
    rundir.claim(out, rundir.QUICKSTART, write=False)
    if force:
        rundir.clear(out, rundir.QUICKSTART, log)
    rundir.claim(out, rundir.QUICKSTART)
    cfg = resolve_teachers(
        cfg, own_teachers(out), resume=True, progress=progress, tracking_root=out
    )
    teacher_acc = evaluate_checkpoint(cfg.teacher.checkpoint, device=cfg.device)["acc"]
    log(f"teacher ({cfg.teacher.model.name}): test acc {teacher_acc:.2f}%")
    rows = []
    for kind in ("scratch", "single", "joint", "smskd"):
        run_cfg = recipe(cfg, kind)
        result = distill(run_cfg, out / kind, resume=True, progress=progress, name=kind)
        rows.append(
            Row(
                recipe=kind,
                stages=" → ".join(s.label for s in run_cfg.stages),
                final_acc=result.final_accuracy,
                best_acc=result.best_accuracy,
                wall_time=sum(r["epoch_time"] for r in result.history),
            )
        )
    notes = [
        f"data: digits (8×8, 1438 train / 359 test), teacher {cfg.teacher.model.name} "
        f"({cfg.teacher.epochs} epochs), student {cfg.student.model.name}, "
        f"{cfg.total_epochs} student epochs per recipe, seed {cfg.seed}",
        f"reference: {cfg.reference.weighting}, λ={cfg.reference.lam}, "
        f"τ={cfg.reference.temperature}; run configs are in each recipe's config.yaml",
        "one seed: differences of a point or two are within seed noise on this data",
    ]
    _write_report(out / "report.md", "smskd quickstart", rows, teacher_acc, notes)
    log("")
    log(_table(rows, teacher_acc))
    log(f"\nrun directory: {out}  (report: {out / 'report.md'})")
    return rows
