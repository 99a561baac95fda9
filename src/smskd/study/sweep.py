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
A recipe's own ``seeds`` may be a subset of the sweep's, or seeds apart from them
(variants chosen among on a seed the compared recipes do not use); they run after the
sweep's seeds, and ``--seeds`` replaces every seed, a recipe's own included.

Several processes may work through one sweep: run the same command again (in another
shell, or on another machine sharing the directory). Each run is claimed by its run
directory's lock, so no run is trained twice; a worker skips the runs another one is
training, puts off the runs whose shared teacher another one is training until it has
trained what it can (then waits for that teacher), and waits for the tuning runs before
the runs whose β they choose.

A ``tune:`` section chooses method weights β on the validation split before anything
else runs: each listed method alone (the ``single`` recipe) at each β of its grid, on
the tuning seeds; the β with the highest mean last-epoch validation accuracy then
weighs that method in every other run of the sweep (single, joint, SMSKD alike). The
tuning seeds are not the sweep's: the winning β's run is the one whose seed happened to
do well on validation, so on a shared seed its single-method run would start the
comparison ahead (test and validation share that run's luck)::

    tune:
      seeds: [5]                # default: one past the sweep's largest seed
      weights: {fitnets: [1, 10, 100], rkd: [0.1, 1, 10]}
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
from pydantic import Field, field_validator, model_validator

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
from smskd.store.runlock import RunInUse
from smskd.store.tracking import MetricsLog
from smskd.study.recipes import RECIPES, expand

INDEX = "index.json"
RESULT = "result.json"
WAIT_SECONDS = 10.0  # how often a worker looks again at what other workers are doing

# The comparison table a recipe kind lands in when its entry names no group.
DEFAULT_GROUPS = {"stages": "stages", "orders": "orders"}


class RecipeEntry(_Strict):
    """One line of ``recipes:``: a kind, and what sets its runs apart."""

    kind: Literal[RECIPES]  # type: ignore[valid-type]
    name: str | None = None  # label of its runs (default: the kind's own labels)
    group: str | None = None  # the report's comparison table (default: main)
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] | None = Field(default=None, min_length=1)  # default: the sweep's
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


def check_weight_grids(cls: type, grids: dict[str, list[float]]) -> dict[str, list[float]]:
    """A method name → β grid mapping, as tuning and search take it: known methods,
    non-empty grids of weights ≥ 0."""
    from smskd.methods.registry import METHODS

    for name, grid in grids.items():
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
        if not grid or any(beta < 0 for beta in grid):
            raise ValueError(f"{name}: give one or more weights β ≥ 0")
    return grids


class TuneConfig(_Strict):
    """β grids chosen on validation before the sweep's other runs (see the module doc)."""

    seeds: list[int] | None = Field(default=None, min_length=1)  # default: max(seeds) + 1
    weights: dict[str, list[float]] = Field(min_length=1)

    _grids = field_validator("weights")(check_weight_grids)


class SweepConfig(_Strict):
    name: str
    base: str | list[str]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    recipes: list[RecipeEntry] = Field(min_length=1)
    teacher_seed: int = Field(default=0, ge=0)  # the shared teachers' training seed
    tune: TuneConfig | None = None

    @property
    def tune_seeds(self) -> list[int]:
        if self.tune is None:
            return []
        return self.tune.seeds or [max(self.seeds) + 1]

    @model_validator(mode="after")
    def _tuning_apart(self) -> SweepConfig:
        problem = self.tuning_overlap()
        if problem:
            raise ValueError(problem)
        return self

    def tuning_overlap(self) -> str | None:
        """Why the tuning seeds may not be these, if they are among the compared ones."""
        shared = sorted(set(self.tune_seeds) & set(self.seeds))
        if not shared:
            return None
        return (
            f"tune.seeds {shared} are also the sweep's seeds: the β chosen on a seed favours "
            "that seed's single-method run; tune on other seeds, e.g. "
            f"[{max(self.seeds) + 1}] (the default)"
        )

    @field_validator("recipes", mode="before")
    @classmethod
    def _kinds(cls, entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        return [RecipeEntry._shorthand(e) for e in entries]

    @property
    def run_seeds(self) -> list[int]:
        """Every seed some recipe runs on: the sweep's, then the seeds apart that recipes
        name (e.g. a seed to choose among variants on, away from the compared ones)."""
        apart = {s for entry in self.recipes for s in entry.seeds or []} - set(self.seeds)
        return [*self.seeds, *sorted(apart)]

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
    waits_for_tuning: bool = False  # its β are the base's until the tune runs finish
    status: str = "pending"
    final_acc: float | None = None
    best_acc: float | None = None
    selected_acc: float | None = None  # test acc at the best validation epoch
    val_acc: float | None = None  # last-epoch validation accuracy
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
        if sweep.tune is not None and sweep.tune.seeds is None:
            # The file's tuning seed, whichever seeds this call runs: β stays chosen once.
            update["tune"] = sweep.tune.model_copy(update={"seeds": sweep.tune_seeds})
        update["seeds"] = list(seeds)
        # Only these seeds run, a recipe's own seeds included.
        update["recipes"] = [
            entry.model_copy(update={"seeds": [s for s in entry.seeds if s in seeds]})
            if entry.seeds is not None
            else entry
            for entry in sweep.recipes
        ]
    sweep = sweep.model_copy(update=update)
    problem = sweep.tuning_overlap()
    if problem:
        raise UserError(f"{path} with --seeds: {problem}")
    return sweep


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

    def base_out(base_name: str) -> Path:
        return root or out / _dir_name(base_name, f"{sweep_path}: base config")

    tune_runs = [
        run
        for seed in sweep.tune_seeds
        for base_name, base_raw in bases
        for run in _tune_runs(sweep, sweep_path, base_out(base_name), base_name, base_raw, seed)
    ]
    tuned = tuned_weights(tune_runs)
    runs = tune_runs + [
        run
        for seed in sweep.run_seeds
        for base_name, base_raw in bases
        for entry in sweep.recipes
        if seed in (sweep.seeds if entry.seeds is None else entry.seeds)
        for point in _grid_points({**sweep.grid, **entry.grid})
        for run in _entry_runs(
            sweep,
            sweep_path,
            base_out(base_name),
            base_name,
            base_raw,
            entry,
            point,
            seed,
            tuned,
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
    tuned: dict[str, dict[str, float]] | None = None,
) -> list[PlannedRun]:
    """The runs of one recipe entry at one grid point and seed, on one base, with the
    β that tuning chose (``tuned``: base → method → β; None while tuning is unfinished)."""
    where = f"{sweep_path}: recipe {entry.name or entry.kind!r} on {base_name}"
    try:
        # The tuned β go in before the entry's own overrides: a weight it sets wins.
        weights = _weight_overrides(base_raw, sweep.set, tuned[base_name]) if tuned else []
        point_set = [_override_text(k, v) for k, v in point.items()]
        overrides = [*sweep.set, *weights, *entry.set, *point_set]
        cfg = load_config(copy.deepcopy(base_raw), [*overrides, f"seed={seed}"])
        expanded = expand(cfg, entry.kind, method=entry.method, teachers=_others(cfg, entry))
    except (UserError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None
    waits = set(sweep.tune.weights) if sweep.tune is not None and tuned is None else set()
    return _planned(expanded, entry, point, seed, base_name, out, where, waits)


def _planned(
    expanded: list[tuple[str, RunConfig]],
    entry: RecipeEntry,
    point: dict[str, Any],
    seed: int,
    base_name: str,
    out: Path,
    where: str,
    waits: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[PlannedRun]:
    runs = []
    for label, run_cfg in expanded:
        if entry.name:
            label = entry.name if len(expanded) == 1 else f"{entry.name}-{label}"
        if point:
            label = f"{label}({_point_label(point)})"
        # Recipes copy configs without validation: validate the result.
        run_cfg = validate(RunConfig, run_cfg.model_dump(mode="json"), where)
        text = f"{base_name}\n{run_cfg.experiment_yaml()}"
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
                waits_for_tuning=any(
                    spec.name in waits for stage in run_cfg.stages for spec in stage.methods
                ),
                config=run_cfg,
            )
        )
    return runs


TUNE_GROUP = "tune"


def _tune_runs(
    sweep: SweepConfig,
    sweep_path: Path,
    out: Path,
    base_name: str,
    base_raw: dict[str, Any],
    seed: int,
) -> list[PlannedRun]:
    """One single-method run per (method, β) of ``sweep.tune`` on one base and seed."""
    assert sweep.tune is not None
    where = f"{sweep_path}: tune on {base_name}"
    try:
        cfg = load_config(copy.deepcopy(base_raw), [*sweep.set, f"seed={seed}"])
    except (UserError, ValueError) as err:
        raise UserError(f"{where}: {err}") from None
    if cfg.data.is_text:
        raise UserError(
            f"{where}: tune chooses β by validation accuracy, not yet perplexity: "
            "drop tune: for a language-model sweep and set the weights in the recipes"
        )
    if not cfg.data.has_validation:
        raise UserError(
            f"{where}: tune chooses β on the validation split, and the base config has "
            "none; set data.val_split (e.g. 0.1) in it or in the sweep's set:"
        )
    runs = []
    entry = RecipeEntry(kind="single", group=TUNE_GROUP)
    for method, grid in sweep.tune.weights.items():
        for beta in grid:
            try:
                weighted = with_weights(cfg, {method: beta})
                expanded = expand(weighted, "single", method=method)
            except ValueError as err:
                raise UserError(f"{where}: {err}") from None
            labelled = [(f"tune-{method}", c) for _, c in expanded]
            runs += _planned(labelled, entry, {"β": beta}, seed, base_name, out, where)
    return runs


def _weight_overrides(
    base_raw: dict[str, Any], overrides: Sequence[str], weights: dict[str, float]
) -> list[str]:
    """``stages.i.methods.j.weight=β`` for every use of a tuned method in the base."""
    cfg = load_config(copy.deepcopy(base_raw), list(overrides))
    return [
        f"stages.{i}.methods.{j}.weight={weights[spec.name]}"
        for i, stage in enumerate(cfg.stages)
        for j, spec in enumerate(stage.methods)
        if spec.name in weights
    ]


def with_weights(cfg: RunConfig, weights: dict[str, float]) -> RunConfig:
    """``cfg`` with method ``m`` weighted by ``weights[m]`` in every stage that uses it."""
    stages = [
        stage.model_copy(
            update={
                "methods": [
                    spec.model_copy(update={"weight": weights[spec.name]})
                    if spec.name in weights
                    else spec
                    for spec in stage.methods
                ]
            }
        )
        for stage in cfg.stages
    ]
    return cfg.model_copy(update={"stages": stages})


def tuning_table(runs: Sequence[PlannedRun]) -> dict[str, dict[str, dict[str, Any]]]:
    """base → method → {β: mean last-epoch validation accuracy over the tuning seeds
    that finished}, with the chosen β once every tuning run has finished. Only
    validation numbers are read: the test split never chooses."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run.group != TUNE_GROUP:
            continue
        method = run.label.removeprefix("tune-").partition("(")[0]
        entry = table.setdefault(run.base, {}).setdefault(
            method, {"val_acc": {}, "seeds": {}, "chosen": None, "complete": True}
        )
        beta = run.label.rpartition("β=")[2].rstrip(")")
        score = _last_val_acc(Path(run.same_as or run.dir))
        entry["val_acc"].setdefault(beta, [])
        entry["seeds"].setdefault(beta, [])
        if score is None:
            entry["complete"] = False
        else:
            entry["val_acc"][beta].append(score)
            entry["seeds"][beta].append(run.seed)
    for methods in table.values():
        for entry in methods.values():
            means = {b: sum(v) / len(v) for b, v in entry["val_acc"].items() if v}
            entry["val_acc"] = means
            if entry["complete"] and means:
                entry["chosen"] = float(max(means, key=lambda b: means[b]))  # grid order on ties
    return table


def tuned_weights(runs: Sequence[PlannedRun]) -> dict[str, dict[str, float]] | None:
    """base → method → chosen β, or None while a tuning run is unfinished (or none exist)."""
    table = tuning_table(runs)
    if not table or any(e["chosen"] is None for m in table.values() for e in m.values()):
        return None
    return {base: {m: e["chosen"] for m, e in methods.items()} for base, methods in table.items()}


def _last_val_acc(run_dir: Path) -> float | None:
    if not (run_dir / RESULT).is_file():
        return None
    records = MetricsLog(run_dir / "metrics.jsonl").records
    return records[-1].get("val_acc") if records else None


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
            "performance": cfg.performance.without_cache(),  # it has no teacher to cache
        }
    )


def _trains_the_same(stored: Path, trainer: RunConfig) -> bool:
    """Whether the teacher run that wrote ``stored`` is the run ``trainer`` describes, as
    today's schema reads it (a key it lacks has its default) and tracking aside."""
    try:
        saved = read_stored_config(stored)
    except UserError:
        return False

    def what_trains(cfg: RunConfig) -> str:
        return cfg.model_copy(update={"tracking": trainer.tracking}).experiment_yaml()

    return what_trains(saved) == what_trains(trainer)


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
        self.progress, self.log, self.only = progress, log, only
        # The index lists the whole plan; `only` narrows what this call trains.
        self.runs = plan(sweep, sweep_path, out)
        self.selected = select(self.runs, only)
        self.teachers: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        self.commit = git_commit(Path(__file__).parent)  # once: the code that ran
        # Every commit that made a run of this sweep: earlier invocations' too.
        self.commits: list[str] = []
        self.sizes: dict[str, str] = {}
        previous = out / INDEX
        if previous.is_file():
            old = json.loads(previous.read_text())
            self.commits = old.get("commits") or ([old["commit"]] if "commit" in old else [])
            self.sizes = dict(old.get("sizes") or {})

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
        name = _slug(teacher.model.label)
        place = self.out / "teachers" / f"{name}-{sha}"
        if not place.exists():
            # One trained before a config key existed has another name, but is this teacher.
            for earlier in sorted(place.parent.glob(f"{name}-*")):
                if _trains_the_same(earlier / "config.yaml", trainer):
                    return trainer, earlier
        return trainer, place

    def _with_teachers(self, cfg: RunConfig, wait: bool) -> RunConfig | None:
        """``cfg`` with its teachers' weights, each trained here unless it is already; one
        another worker is training is waited for (``wait``), or None."""
        resolved = teachers_among_workers(
            cfg,
            self._shared_teacher,
            progress=self.progress,
            root=self.out,
            log=self.log,
            wait=wait,
        )
        if resolved is None:
            return None
        for teacher in resolved.all_teachers:
            self._list_teacher(teacher)
        return resolved

    def _list_teacher(self, teacher: TeacherConfig) -> None:
        """Put a teacher in ``index.json``, once: one the sweep trained, or one given by
        its checkpoint (its accuracy is known if its run directory is beside it)."""
        assert teacher.checkpoint is not None
        teacher_dir = Path(teacher.checkpoint).parent
        if str(teacher_dir) in self.teachers:
            return
        records = MetricsLog(teacher_dir / "metrics.jsonl").records
        self.teachers[str(teacher_dir)] = {
            "model": teacher.model.label,
            "dir": str(teacher_dir),
            "epochs": len(records) if records else teacher.epochs,
            "final_acc": records[-1]["test_acc"] if records else None,
        }
        self._write_index()

    def _write_index(self) -> None:
        for run in self.runs:  # other workers' results too
            if run.same_as is None:
                _refresh(run)
        index = {
            "sweep": self.sweep.name,
            "sweep_file": str(self.sweep_path),
            "bases": self.sweep.bases,
            "seeds": self.sweep.seeds,
            "commits": self.commits,
            "sizes": self.sizes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "teachers": list(self.teachers.values()),
            "tuning": tuning_table(self.runs),
            "runs": [run.record() for run in self.runs],
        }
        atomic_write_text(self.out / INDEX, json.dumps(index, indent=1) + "\n")

    def execute(self) -> list[PlannedRun]:
        rundir.claim(self.out, rundir.SWEEP)
        atomic_write_text(self.out / "sweep.yaml", self.sweep_path.read_text(encoding="utf-8"))
        waiting = [r for r in self.runs if r.waits_for_tuning and r.dir in self.selected]
        said = False
        while waiting:  # tuning first: the other runs' β depend on it
            tuning = [r for r in self.runs if r.group == TUNE_GROUP and r.same_as is None]
            failed = self._train(tuning, everything=True)
            if failed:
                raise UserError(
                    f"tuning run {failed[0].label} seed {failed[0].seed} failed "
                    f"({failed[0].error}); the other runs' β depend on it"
                )
            self.runs = plan(self.sweep, self.sweep_path, self.out)
            self.selected = select(self.runs, self.only)
            waiting = [r for r in self.runs if r.waits_for_tuning and r.dir in self.selected]
            if waiting:
                if not said:
                    self.log("waiting for the tuning runs that other workers train")
                    said = True
                time.sleep(WAIT_SECONDS)
        failed = self._train([r for r in self.runs if r.same_as is None])
        by_dir = {r.dir: r for r in self.runs if r.same_as is None}
        for run in self.runs:
            if run.same_as is not None:
                first = by_dir[run.same_as]
                for key in ("status", "final_acc", "best_acc", "selected_acc", "val_acc"):
                    setattr(run, key, getattr(first, key))
                run.wall_time, run.error = first.wall_time, first.error
        self._write_index()
        elsewhere = [r for r in self.runs if r.status == ELSEWHERE]
        if elsewhere:
            self.log(f"{len(elsewhere)} runs are being trained by other workers")
        if failed:
            raise UserError(
                f"{len(failed)} runs failed (first: {failed[0].label} seed "
                f"{failed[0].seed}: {failed[0].error}); see {self.out / INDEX}"
            )
        return self.runs

    def _train(self, distinct: list[PlannedRun], everything: bool = False) -> list[PlannedRun]:
        """Train the runs of ``distinct`` that ``--only`` selected (all of them with
        ``everything``) and are not finished; return those that failed."""
        from smskd.experiment import distill

        for run in distinct:
            _refresh(run)
        todo = [
            r for r in distinct if (everything or r.dir in self.selected) and r.status != "done"
        ]
        what = "tuning runs" if everything else "runs"
        self.log(
            f"sweep {self.sweep.name}: {len(self.runs)} runs, {len(distinct)} distinct configs, "
            f"{len(todo)} {what} to train, into {self.out}"
        )
        for run in distinct:  # finished runs name theirs in their stored config (data)
            stored = Path(run.dir) / "config.yaml"
            if run.status == "done" and stored.is_file():
                for teacher in read_stored_config(stored).all_teachers:
                    if teacher.checkpoint is not None:
                        self._list_teacher(teacher)
        for base in dict.fromkeys(r.base for r in todo):
            self.sizes[base] = describe_sizes([r.config for r in todo if r.base == base])
        for base in dict.fromkeys(r.base for r in distinct if r.base not in self.sizes):
            sized = [r.config for r in distinct if r.base == base and r.config is not None]
            if sized:  # a finished base written before its sizes were described
                self.sizes[base] = describe_sizes(sized)
        self._write_index()
        spent: list[float] = []  # seconds per run trained by this call, for the ETA
        position = 0
        # A run whose teacher another worker is training waits until the runs that can
        # train now have trained; its teacher is there by then, or is waited for.
        later: list[PlannedRun] = []
        for run, wait in itertools.chain(((r, False) for r in todo), ((r, True) for r in later)):
            tag = f"[{position + 1}/{len(todo)}] {run.label} seed {run.seed}"
            if _refresh(run):  # another worker finished it meanwhile
                position += 1
                continue
            assert run.config is not None
            cfg = self._with_teachers(run.config, wait=wait)
            if cfg is None:
                self.log(f"{tag}: waiting for a teacher that another worker trains: later")
                later.append(run)
                continue
            position += 1
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
            except RunInUse:
                run.status = ELSEWHERE
                self.log(f"{tag}: another worker is training it")
                continue
            except UserError as err:
                run.status, run.error = "failed", str(err)
                self.log(f"{tag}: FAILED: {err}")
                self._write_index()
                continue
            # What the run's epochs took, resumes included; the same whoever writes it
            # (two workers may both reach a finished run: the second trains nothing).
            outcome = {
                "final_acc": result.final_accuracy,
                "best_acc": result.best_accuracy,
                "selected_acc": result.selected_accuracy,
                "val_acc": result.history[-1].get("val_acc"),
                "wall_time": sum(r["epoch_time"] for r in result.history),
            }
            atomic_write_text(Path(run.dir) / RESULT, json.dumps(outcome) + "\n")
            run.__dict__.update(outcome)
            run.status = "done"
            if not result.epochs_trained:
                self.log(f"{tag}: finished by another worker")
                continue
            spent.append(time.perf_counter() - started)
            left = len(todo) - position
            eta = f", about {_duration(sum(spent) / len(spent) * left)} left" if left else ""
            val = f"{run.val_acc:.2f}% val, " if run.val_acc is not None else ""
            self.log(
                f"{tag}: {val}{run.final_acc:.2f}% test (last epoch), "
                f"{spent[-1]:.0f}s; {left} to go{eta}"
            )
            self._write_index()
        return [r for r in todo if r.status == "failed"]


ELSEWHERE = "running elsewhere"


def teachers_among_workers(
    cfg: RunConfig,
    place: Callable[[RunConfig, int, TeacherConfig], tuple[RunConfig, Path]],
    *,
    progress: bool,
    root: Path,
    log: Callable[[str], None],
    wait: bool = True,
) -> RunConfig | None:
    """``resolve_teachers`` for one of several workers: a teacher another worker is
    training is waited for, and its weights are used once they are there (without
    ``wait``: None instead)."""
    from smskd.experiment import resolve_teachers

    while True:
        try:
            return resolve_teachers(
                cfg, place, resume=True, progress=progress, tracking_root=root, log=log
            )
        except RunInUse as err:
            if not wait:
                return None
            log(f"waiting for a teacher that another worker trains ({err})")
            time.sleep(WAIT_SECONDS)


def _refresh(run: PlannedRun) -> bool:
    """Take a finished run's outcome from its ``result.json`` (written by this worker or
    another); whether it is finished. A run whose β still waits for tuning is planned
    with the base's β, so another worker's finished run in its place (with the tuned β)
    is not compared with it yet."""
    if run.status == "done":
        return True
    if run.waits_for_tuning:
        return False
    result = Path(run.dir) / RESULT
    if not result.exists():
        return False
    _check_same_config(run)
    run.__dict__.update(json.loads(result.read_text()))
    run.status = "done"
    return True


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
    if saved.experiment_yaml() != run.config.experiment_yaml():
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
    unit = "images" if data.corpus is None else f"windows of {data.corpus.seq_len} tokens"
    val = f"{len(data.val.labels)} validation {unit}, " if data.val is not None else ""
    student = make_model(cfg.student.model, data)
    models = [f"student {cfg.student.model.label} ({parameter_count(student):,} parameters)"]
    teachers = {t.model.label: t.model for c in configs for t in c.all_teachers}
    models += [
        f"teacher {name} ({parameter_count(make_model(spec, data)):,})"
        for name, spec in teachers.items()
    ]
    return (
        f"{cfg.data.name}, {data.num_train} training {unit}, {val}{test} test {unit}, batch "
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
