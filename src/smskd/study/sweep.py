"""``smskd sweep``: a grid of recipes × seeds × overrides, run one after another.

A sweep file names one or more base configs (SMSKD runs), the seeds, config
overrides (fixed ``set`` and a ``grid`` of values, crossed) and the recipes
(:mod:`smskd.study.recipes`) to derive from each base::

    name: fashion-mnist
    base: ../fashion-mnist.yaml          # relative to this file; or a list of files
    seeds: [0, 1, 2]
    set: [data.train_subset=8000]
    recipes:
      - scratch
      - single                           # one run per method of the base
      - {kind: smskd, name: lambda, group: lambda, grid: {reference.lam: [0.5, 1.0, 2.0]}}

Every expanded run gets a directory ``OUT/<label>/seed-<s>`` (``OUT/<base>/...``
when there are several bases) and a line in ``OUT/index.json``. A run whose
resolved config equals an earlier one's is not run twice: its line points at that
run (``same_as``). Teachers are trained once per distinct teacher config, into
``OUT/teachers/``, and shared by every run. Re-running the command skips finished
runs (``result.json``) and resumes a half-done one from its last checkpoint.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator

from smskd.config import (
    ReferenceConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    _Strict,
    load_config,
    read_stored_config,
    read_yaml_mapping,
    validate,
)
from smskd.errors import UserError
from smskd.store import rundir
from smskd.store.checkpoint import atomic_write_text
from smskd.store.provenance import git_commit
from smskd.store.tracking import MetricsLog
from smskd.study.recipes import RECIPES, expand

INDEX = "index.json"
RESULT = "result.json"

# The comparison table a recipe kind lands in when its entry names no group.
DEFAULT_GROUPS = {"stages": "stages", "orders": "orders"}


class RecipeEntry(_Strict):
    """One line of ``recipes:``: a kind, and what sets its runs apart."""

    kind: Literal[RECIPES]  # type: ignore[valid-type]
    name: str | None = None  # label of its runs (default: the kind's own labels)
    group: str | None = None  # the report's comparison table (default: main)
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    method: str | None = None  # single / multi-teacher: this method only
    # multi-teacher: the other teachers; what they leave out is the base teacher's
    teachers: list[TeacherConfig] = Field(default_factory=list)

    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return grid


class SweepConfig(_Strict):
    name: str
    base: str | list[str]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    recipes: list[RecipeEntry] = Field(min_length=1)
    teacher_seed: int = Field(default=0, ge=0)  # the shared teachers' training seed

    @field_validator("recipes", mode="before")
    @classmethod
    def _kinds(cls, entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        return [RecipeEntry._shorthand(e) for e in entries]

    @property
    def bases(self) -> list[str]:
        return [self.base] if isinstance(self.base, str) else list(self.base)


@dataclass
class PlannedRun:
    """One run of the sweep, as ``index.json`` lists it."""

    label: str
    kind: str
    group: str
    seed: int
    base: str
    stages: str
    dir: str
    config_sha: str
    same_as: str | None = None  # dir of an earlier run with the same config
    status: str = "pending"
    final_acc: float | None = None
    best_acc: float | None = None
    wall_time: float | None = None
    error: str | None = None
    config: RunConfig | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("config")
        return row


def load_sweep(
    path: str | Path, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None
) -> SweepConfig:
    """Read and validate a sweep file; ``overrides`` join its ``set`` (applied to every
    run, after the file's own), ``seeds`` replace its seeds."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", "name, base, seeds, recipes")
    for entry in raw.get("recipes") or []:
        if isinstance(entry, dict) and entry.get("teachers"):
            # "resnet8" stands for {model: resnet8}, as a model name does elsewhere.
            entry["teachers"] = [
                {"model": t} if isinstance(t, str) else t for t in entry["teachers"]
            ]
    sweep = validate(SweepConfig, raw, str(path))
    update: dict[str, Any] = {"set": [*sweep.set, *overrides]}
    if seeds is not None:
        update["seeds"] = list(seeds)
    return sweep.model_copy(update=update)


def _slug(text: str) -> str:
    """One readable path component for a label: letters of any script, digits and
    ``.=_-`` are kept (``β=1`` stays ``β=1``), runs of anything else become ``-``, and
    leading dots go (never ``..``, never hidden); empty if nothing is left."""
    kept = re.sub(r"[^\w.=-]+", "-", unicodedata.normalize("NFC", text))
    return kept.lstrip(".-").rstrip("-")


def _dir_name(label: str, where: str) -> str:
    name = _slug(label)
    if not name:
        raise UserError(
            f"{where}: the label {label!r} leaves no usable directory name; give the "
            "recipe a 'name:' with letters or digits"
        )
    return name


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


def _base_raw(sweep_path: Path, base: str) -> tuple[str, dict[str, Any]]:
    path = (sweep_path.parent / base).resolve()
    return path.stem, read_yaml_mapping(path, f"{sweep_path}: base config", "seed, data, stages")


def _override_text(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: lists and strings survive


def plan(sweep: SweepConfig, sweep_path: str | Path, out: str | Path) -> list[PlannedRun]:
    """Every run of the sweep, seed by seed (all of seed 0 first: a sweep cut short
    still has a complete table), each config validated before anything trains."""
    sweep_path, out = Path(sweep_path), Path(out)
    bases = [_base_raw(sweep_path, base) for base in sweep.bases]
    names = [name for name, _ in bases]
    if len(set(names)) < len(names):
        raise UserError(
            f"{sweep_path}: two base configs are named {names[0]!r} (by their file names); "
            "their runs would share directories: rename one of the files"
        )
    root = out if len(bases) == 1 else None
    runs = [
        run
        for seed in sweep.seeds
        for base_name, base_raw in bases
        for entry in sweep.recipes
        for point in _grid_points({**sweep.grid, **entry.grid})
        for run in _entry_runs(
            sweep,
            sweep_path,
            root or out / _dir_name(base_name, f"{sweep_path}: base config"),
            base_name,
            base_raw,
            entry,
            point,
            seed,
        )
    ]
    repeated = [key for key, n in Counter((r.base, r.label, r.seed) for r in runs).items() if n > 1]
    if repeated:
        raise UserError(
            f"{sweep_path}: two recipes give runs labelled {repeated[0][1]!r}; "
            "give one of them a 'name:'"
        )
    label_of: dict[str, str] = {}
    for run in runs:
        other = label_of.setdefault(run.dir, run.label)
        if other != run.label:
            raise UserError(
                f"{sweep_path}: the labels {other!r} and {run.label!r} map to one directory, "
                f"{run.dir}; give one of them another 'name:'"
            )
    first_of: dict[str, str] = {}
    for run in runs:
        run.same_as = first_of.get(run.config_sha)
        first_of.setdefault(run.config_sha, run.dir)
    return runs


def _entry_runs(
    sweep: SweepConfig,
    sweep_path: Path,
    out: Path,
    base_name: str,
    base_raw: dict[str, Any],
    entry: RecipeEntry,
    point: dict[str, Any],
    seed: int,
) -> list[PlannedRun]:
    """The runs of one recipe entry at one grid point and seed, on one base."""
    overrides = [*sweep.set, *entry.set, *(_override_text(k, v) for k, v in point.items())]
    where = f"{sweep_path}: recipe {entry.name or entry.kind!r} on {base_name}"
    try:
        cfg = load_config(copy.deepcopy(base_raw), [*overrides, f"seed={seed}"])
        expanded = expand(cfg, entry.kind, method=entry.method, teachers=_others(cfg, entry))
    except (UserError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None
    runs = []
    for label, run_cfg in expanded:
        if entry.name:
            label = entry.name if len(expanded) == 1 else f"{entry.name}-{label}"
        if point:
            label = f"{label}({_point_label(point)})"
        # Recipes copy configs without validation: validate the result.
        run_cfg = validate(RunConfig, run_cfg.model_dump(mode="json"), where)
        text = f"{base_name}\n{run_cfg.to_yaml()}"
        runs.append(
            PlannedRun(
                label=label,
                kind=entry.kind,
                group=entry.group or DEFAULT_GROUPS.get(entry.kind, "main"),
                seed=seed,
                base=base_name,
                stages=" → ".join(s.label for s in run_cfg.stages),
                dir=str(out / _dir_name(label, where) / f"seed-{seed}"),
                config_sha=hashlib.sha256(text.encode()).hexdigest()[:12],
                config=run_cfg,
            )
        )
    return runs


def _others(cfg: RunConfig, entry: RecipeEntry) -> list[TeacherConfig]:
    """A multi-teacher entry's teachers, each trained like the base's teacher except in
    what the entry sets (``{model: resnet8}`` takes its epochs and optimizer), so an
    override such as ``teacher.epochs=1`` reaches every teacher."""
    if cfg.teacher is None:
        return list(entry.teachers)
    return [
        cfg.teacher.model_copy(update={key: getattr(t, key) for key in t.model_fields_set})
        for t in entry.teachers
    ]


def select(runs: list[PlannedRun], only: Sequence[str]) -> set[str]:
    """Directories to train for the labels matching ``only`` (shell patterns on
    ``label`` or ``base/label``: ``smskd``, ``order-*``, ``vgg19-resnet18/*``); a run
    that repeats another's config stands for that one. Empty ``only``: every run."""

    def matches(run: PlannedRun) -> bool:
        names = (run.label, f"{run.base}/{run.label}")
        return not only or any(fnmatch.fnmatchcase(n, p) for n in names for p in only)

    chosen = {run.same_as or run.dir for run in runs if matches(run)}
    if not chosen:
        raise UserError(f"no run matches --only {' '.join(only)}")
    return chosen


def _teacher_trainer(cfg: RunConfig, teacher: TeacherConfig, seed: int) -> RunConfig:
    """The run that trains ``teacher``: only what it depends on (data, device, seed)."""
    return cfg.model_copy(
        update={
            "seed": seed,
            "teacher": teacher,
            "extra_teachers": [],
            "student": StudentConfig(model=teacher.model),
            "stages": [teacher.training_stage()],
            "reference": ReferenceConfig(),
        }
    )


class Sweep:
    """Executes a plan into ``out``, keeping ``index.json`` current after every run."""

    def __init__(
        self,
        sweep: SweepConfig,
        sweep_path: Path,
        out: Path,
        *,
        progress: bool = True,
        only: Sequence[str] = (),
        log: Callable[[str], None] = print,
    ) -> None:
        self.sweep, self.sweep_path, self.out = sweep, sweep_path, out
        self.progress, self.log = progress, log
        # The index lists the whole plan; `only` narrows what this call trains.
        self.runs = plan(sweep, sweep_path, out)
        self.selected = select(self.runs, only)
        self.teachers: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        self.commit = git_commit(Path(__file__).parent)  # once: the code that ran
        # Every commit that made a run of this sweep: earlier invocations' too.
        self.commits: list[str] = []
        previous = out / INDEX
        if previous.is_file():
            old = json.loads(previous.read_text())
            self.commits = old.get("commits") or ([old["commit"]] if "commit" in old else [])
        self.sizes: dict[str, str] = {}

    def _shared_teacher(
        self, cfg: RunConfig, _j: int, teacher: TeacherConfig
    ) -> tuple[RunConfig, Path]:
        """Each distinct teacher trains once, with the sweep's teacher seed, into
        ``OUT/teachers/<model>-<hash of what trains it>``, and every run shares it."""
        trainer = _teacher_trainer(cfg, teacher, self.sweep.teacher_seed)
        # Tracking changes where numbers go, not the teacher: it stays out of the name.
        identity = yaml.safe_dump(
            trainer.model_dump(mode="json", exclude={"tracking"}), sort_keys=False
        )
        sha = hashlib.sha256(identity.encode()).hexdigest()[:8]
        return trainer, self.out / "teachers" / f"{_slug(teacher.model.label)}-{sha}"

    def _with_teachers(self, cfg: RunConfig) -> RunConfig:
        from smskd.experiment import resolve_teachers

        resolved = resolve_teachers(
            cfg,
            self._shared_teacher,
            resume=True,
            progress=self.progress,
            tracking_root=self.out,
            log=self.log,
        )
        for planned, teacher in zip(cfg.all_teachers, resolved.all_teachers, strict=True):
            if planned.checkpoint is None:
                self._list_teacher(teacher)
        return resolved

    def _list_teacher(self, teacher: TeacherConfig) -> None:
        """Put a shared teacher in ``index.json``, once."""
        assert teacher.checkpoint is not None
        teacher_dir = Path(teacher.checkpoint).parent
        if str(teacher_dir) in self.teachers:
            return
        records = MetricsLog(teacher_dir / "metrics.jsonl").records
        self.teachers[str(teacher_dir)] = {
            "model": teacher.model.label,
            "dir": str(teacher_dir),
            "epochs": teacher.epochs,
            "final_acc": records[-1]["test_acc"] if records else None,
        }
        self._write_index()

    def _write_index(self) -> None:
        index = {
            "sweep": self.sweep.name,
            "sweep_file": str(self.sweep_path),
            "bases": self.sweep.bases,
            "seeds": self.sweep.seeds,
            "commits": self.commits,
            "sizes": self.sizes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "teachers": list(self.teachers.values()),
            "runs": [run.record() for run in self.runs],
        }
        atomic_write_text(self.out / INDEX, json.dumps(index, indent=1) + "\n")

    def execute(self) -> list[PlannedRun]:
        from smskd.experiment import distill

        rundir.claim(self.out, rundir.SWEEP)
        atomic_write_text(self.out / "sweep.yaml", self.sweep_path.read_text(encoding="utf-8"))
        distinct = [r for r in self.runs if r.same_as is None]
        for run in distinct:
            if (Path(run.dir) / RESULT).exists():
                _check_same_config(run)
                run.__dict__.update(json.loads((Path(run.dir) / RESULT).read_text()))
                run.status = "done"
        todo = [r for r in distinct if r.dir in self.selected and r.status != "done"]
        self.log(
            f"sweep {self.sweep.name}: {len(self.runs)} runs, {len(distinct)} distinct configs, "
            f"{len(todo)} to train, into {self.out}"
        )
        # Teachers first, each once: every run after this only loads them.
        configs = {r.dir: self._with_teachers(r.config) for r in todo if r.config is not None}
        for base in dict.fromkeys(r.base for r in todo):
            self.sizes[base] = describe_sizes([configs[r.dir] for r in todo if r.base == base])
        spent: list[float] = []  # seconds per run trained by this call, for the ETA
        for position, run in enumerate(todo, 1):
            tag = f"[{position}/{len(todo)}] {run.label} seed {run.seed}"
            cfg = configs[run.dir]
            if self.commit not in self.commits:
                self.commits.append(self.commit)
            started = time.perf_counter()
            try:
                result = distill(
                    cfg,
                    run.dir,
                    resume=True,
                    progress=self.progress,
                    name=run.label,
                    tracking_root=self.out,
                )
            except UserError as err:
                run.status, run.error = "failed", str(err)
                self.log(f"{tag}: FAILED: {err}")
                self._write_index()
                continue
            outcome = {
                "final_acc": result.final_accuracy,
                "best_acc": result.best_accuracy,
                "wall_time": time.perf_counter() - started,
            }
            atomic_write_text(Path(run.dir) / RESULT, json.dumps(outcome) + "\n")
            run.__dict__.update(outcome)
            run.status = "done"
            spent.append(outcome["wall_time"])
            left = len(todo) - position
            eta = f", about {_duration(sum(spent) / len(spent) * left)} left" if left else ""
            self.log(
                f"{tag}: {run.final_acc:.2f}% last epoch, {run.best_acc:.2f}% best, "
                f"{outcome['wall_time']:.0f}s; {left} to go{eta}"
            )
            self._write_index()
        by_dir = {r.dir: r for r in distinct}
        for run in self.runs:
            if run.same_as is not None:
                first = by_dir[run.same_as]
                run.status, run.final_acc, run.best_acc = (
                    first.status,
                    first.final_acc,
                    first.best_acc,
                )
                run.wall_time, run.error = first.wall_time, first.error
        self._write_index()
        failed = [r for r in todo if r.status == "failed"]
        if failed:
            raise UserError(
                f"{len(failed)} of {len(todo)} runs failed (first: {failed[0].label} seed "
                f"{failed[0].seed}: {failed[0].error}); see {self.out / INDEX}"
            )
        return self.runs


def _check_same_config(run: PlannedRun) -> None:
    """A finished run is reused only if it ran the config planned now: a changed sweep
    or base file must not mix old and new results in one report."""
    saved = read_stored_config(Path(run.dir) / "config.yaml")
    assert run.config is not None
    planned = run.config.all_teachers
    # The sweep fills in the shared teachers' weights; the plan has them still empty.
    teachers = [
        t.model_copy(update={"checkpoint": None}) if p.checkpoint is None else t
        for t, p in zip(saved.all_teachers, planned, strict=False)
    ]
    if teachers:
        saved = saved.model_copy(update={"teacher": teachers[0], "extra_teachers": teachers[1:]})
    if saved.to_yaml() != run.config.to_yaml():
        raise UserError(
            f"{run.dir} holds a finished run of another config than {run.label!r} has now "
            "(the sweep file or its base config changed); delete that directory to rerun "
            "it, or sweep into another --out"
        )


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"


def describe_sizes(configs: list[RunConfig]) -> str:
    """Data, models and budget of a base's runs, in words, for the report."""
    from smskd.experiment import make_model, prepare_data
    from smskd.models.registry import parameter_count

    cfg = max(configs, key=lambda c: len(c.stages))  # the SMSKD run: its stage split
    data = prepare_data(cfg.data, cfg.seed, torch.device("cpu"))
    test = len(data.test.labels) if hasattr(data.test, "labels") else "all"
    student = make_model(cfg.student.model, data)
    models = [f"student {cfg.student.model.label} ({parameter_count(student):,} parameters)"]
    teachers = {t.model.label: t.model for c in configs for t in c.all_teachers}
    models += [
        f"teacher {name} ({parameter_count(make_model(spec, data)):,})"
        for name, spec in teachers.items()
    ]
    return (
        f"{cfg.data.name}, {data.num_train} training images, {test} test images, batch "
        f"{cfg.data.batch_size}; {', '.join(models)}; {cfg.total_epochs} student epochs "
        f"per recipe ({' + '.join(str(s.epochs) for s in cfg.stages)} in SMSKD)"
    )


def run_sweep(
    sweep_file: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    only: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[PlannedRun]:
    """Run every run of ``sweep_file`` into ``out_dir`` (finished ones are skipped);
    ``only`` keeps the runs whose label matches one of its patterns (see :func:`plan`)."""
    path = Path(sweep_file)
    sweep = load_sweep(path, overrides, seeds)
    return Sweep(sweep, path, Path(out_dir), progress=progress, only=only, log=log).execute()


__all__ = ["RECIPES", "PlannedRun", "SweepConfig", "load_sweep", "plan", "run_sweep"]
