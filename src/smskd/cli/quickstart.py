"""``smskd quickstart``: teacher, then scratch / single / joint / SMSKD on the digits.

The SMSKD run is :func:`quickstart_config` (also ``configs/quickstart.yaml``, kept
equal by a test); the other rows are its baselines at the same student budget
(:mod:`smskd.study.recipes`). Re-running into the same directory reuses finished runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smskd.config import RunConfig, validate
from smskd.experiment import distill, evaluate_checkpoint, resolve_teacher
from smskd.store import rundir
from smskd.study.recipes import recipe
from smskd.study.report import Row, results_table, write_report

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
    cfg = resolve_teacher(cfg, out, resume=True, force=False, progress=progress)
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
    write_report(out / "report.md", "smskd quickstart", rows, teacher_acc, notes)
    log("")
    log(results_table(rows, teacher_acc))
    log(f"\nrun directory: {out}  (report: {out / 'report.md'})")
    return rows
