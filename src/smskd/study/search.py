"""``smskd search``: the best stage plan for a teacher–student pair, chosen on validation.

A plan is a sequence of stages, each one method with its weight β and its epochs, and
the reference's λ. The search spec names the base run (teacher, student, data with a
validation split, optimizer), the candidate methods with their β grids, the epoch
choices, the λ choices, the longest plan and a budget::

    name: fm-search
    base: ../study/fashion-mnist.yaml
    methods: {kd: [1], fitnets: [1, 10, 100], rkd: [0.1, 1, 10]}
    epochs: [4, 8]
    lam: [0.5, 1, 2]
    max_stages: 3
    budget: {stage_trainings: 40}
    final: {seeds: [1, 2, 3]}

**Prefix sharing.** SMSKD's stages are sequential: a plan's stage k starts from the
student its first k − 1 stages left, anchored to it. Every distinct prefix (the plan so
far with this stage's settings) is trained once, as a run that continues its parent
(``continues:``, which trains exactly what the whole plan would have), into
``OUT/nodes/``; every plan that extends it starts from its student. Each prefix is
itself a plan, scored by its validation accuracy at its last epoch.

**Optuna** proposes the plans (TPE over the categorical choices, define-by-run, one
stage at a time) and prunes the weak ones after each stage (successive halving on the
stage depth), so the search is a beam over sequences that widens where validation says
it pays. Its SQLite store (``OUT/search.db``) makes the search resumable after a kill,
and lets several workers, run as the same command in several shells or on machines
sharing the directory, share one search: a prefix is claimed by its run directory's
lock and trained by one of them only.

The best prefix becomes ``OUT/best.yaml`` (a config ``smskd distill`` runs), and a
final retrain on the test split compares it with single KD, joint and the base plan
over the ``final`` seeds (a sweep into ``OUT/final``). The test split chooses nothing,
and the final seeds are not the search's: on the search seed the chosen plan's run is
the one that won on validation, and test would share its luck.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from smskd.config import (
    ContinuedRun,
    MethodSpec,
    RunConfig,
    Stage,
    _Strict,
    load_config,
    read_yaml_mapping,
    validate,
)
from smskd.errors import UserError
from smskd.store import rundir, runlock
from smskd.store.checkpoint import atomic_write_text
from smskd.store.runlock import RunInUse
from smskd.study.sweep import RESULT, WAIT_SECONDS, check_weight_grids, teachers_among_workers
from smskd.train.stages import LossNotFinite

STUDY_DB = "search.db"
NODES = "nodes"
BEST = "best.yaml"
FINAL_SWEEP = "final.yaml"
IDLE_TRIALS = 100
HEARTBEAT_SECONDS = 60


class Budget(_Strict):
    """When the search stops: after this many stage trainings, student epochs or
    seconds of training (whichever comes first; counted over every worker)."""

    stage_trainings: int | None = Field(default=None, gt=0)
    student_epochs: int | None = Field(default=None, gt=0)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.stage_trainings is None and self.student_epochs is None and self.seconds is None:
            raise ValueError("give stage_trainings, student_epochs or seconds")
        return self


class FinalRetrain(_Strict):
    seeds: list[int] | None = Field(default=None, min_length=1)  # default: 3 past the seed


class SearchSpec(_Strict):
    name: str
    base: str
    set: list[str] = Field(default_factory=list)
    seed: int = Field(default=0, ge=0)
    methods: dict[str, list[float]] = Field(min_length=1)
    epochs: list[int] = Field(min_length=1)
    lam: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    max_stages: int = Field(default=3, gt=0)
    budget: Budget
    final: FinalRetrain = Field(default_factory=FinalRetrain)

    _grids = field_validator("methods")(check_weight_grids)

    @field_validator("epochs")
    @classmethod
    def _positive(cls, epochs: list[int]) -> list[int]:
        if any(e <= 0 for e in epochs):
            raise ValueError("every epoch choice must be > 0")
        return epochs

    @field_validator("lam")
    @classmethod
    def _non_negative(cls, lam: list[float]) -> list[float]:
        if any(v < 0 for v in lam):
            raise ValueError("every λ must be ≥ 0")
        return lam

    @property
    def final_seeds(self) -> list[int]:
        return self.final.seeds or [self.seed + 1, self.seed + 2, self.seed + 3]

    @model_validator(mode="after")
    def _final_apart(self) -> SearchSpec:
        if self.seed in self.final_seeds:
            raise ValueError(
                f"final.seeds include the search's seed {self.seed}: the plan chosen on it "
                "would start the test comparison ahead; retrain on other seeds, e.g. "
                f"[{self.seed + 1}, {self.seed + 2}, {self.seed + 3}] (the default)"
            )
        return self


@dataclass(frozen=True)
class PlanStage:
    method: str
    beta: float
    epochs: int

    @property
    def label(self) -> str:
        return f"{self.method}(β={self.beta:g},{self.epochs}ep)"


@dataclass
class Node:
    """A trained prefix: its stages, λ (from stage 2 on), directory and score."""

    stages: tuple[PlanStage, ...]
    lam: float | None
    dir: Path
    val_acc: float | None = None
    epochs: int = 0
    seconds: float = 0.0  # its epochs' training and evaluation
    wall_seconds: float = 0.0  # the worker's time on it, setup included (since a resume)

    @property
    def label(self) -> str:
        plan = " → ".join(s.label for s in self.stages)
        return plan + (f", λ={self.lam:g}" if self.lam is not None else "")


def load_search(path: str | Path) -> SearchSpec:
    path = Path(path)
    raw = read_yaml_mapping(path, "search spec", "name, base, methods, epochs, budget")
    return validate(SearchSpec, raw, str(path))


def naive_counts(spec: SearchSpec) -> tuple[int, int]:
    """(plans, stage trainings of a grid that trains every plan from scratch) over the
    search space. A grid that shares prefixes trains one stage per plan: every prefix
    is a plan."""
    per_stage = sum(len(grid) for grid in spec.methods.values()) * len(spec.epochs)
    plans = trainings = 0
    for depth in range(1, spec.max_stages + 1):
        count = per_stage**depth * (len(spec.lam) if depth > 1 else 1)
        plans += count
        trainings += count * depth
    return plans, trainings


@dataclass
class Search:
    """One worker of the search in ``out``."""

    spec: SearchSpec
    spec_path: Path
    out: Path
    progress: bool = False
    log: Callable[[str], None] = print
    base: RunConfig = field(init=False)
    trained_here: int = 0  # prefixes this worker trained

    def __post_init__(self) -> None:
        base_path = (self.spec_path.parent / self.spec.base).resolve()
        raw = read_yaml_mapping(base_path, f"{self.spec_path}: base config", "data, stages")
        try:
            base = load_config(copy.deepcopy(raw), [*self.spec.set, f"seed={self.spec.seed}"])
        except UserError as err:
            raise UserError(f"{self.spec_path}: base config: {err}") from None
        if base.data.is_text:
            raise UserError(
                f"{self.spec_path}: the search ranks plans by validation accuracy, not yet "
                "by perplexity: it searches image classifiers only"
            )
        if not base.data.has_validation:
            raise UserError(
                f"{self.spec_path}: the search chooses on the validation split, and the base "
                "config has none; set data.val_split (e.g. 0.1) in it or in the spec's set:"
            )
        if base.teacher is None:
            raise UserError(f"{self.spec_path}: the base config has no teacher to distil from")
        # A prefix goes on from its parent's last epoch, stage by stage.
        if base.reference.snapshot == "best" or base.schedule_across_stages == "continue":
            raise UserError(
                f"{self.spec_path}: the search trains a plan one stage at a time, each from "
                "the last epoch of the one before: set reference.snapshot: last and "
                "schedule_across_stages: restart in the base config"
            )
        self.base_path = base_path
        self.base = base

    # ------------------------------------------------------------------ prefixes

    def node(self, stages: tuple[PlanStage, ...], lam: float) -> Node:
        """The prefix ``stages`` (λ matters from its second stage on), trained once."""
        lam_used = lam if len(stages) > 1 else None
        identity = json.dumps(
            {
                "base": self._base_identity(),
                "stages": [[s.method, s.beta, s.epochs] for s in stages],
                "lam": lam_used,
            }
        )
        sha = hashlib.sha256(identity.encode()).hexdigest()[:10]
        name = f"{len(stages)}-" + "-".join(s.method for s in stages) + f"-{sha}"
        node = Node(stages, lam_used, self.out / NODES / name)
        self._read(node)
        return node

    def _base_identity(self) -> str:
        """The base config as a prefix's identity: a teacher the search trained is named
        relative to ``OUT``, so the prefixes keep their names if ``OUT`` moves."""
        teacher = self.base.teacher
        assert teacher is not None
        if teacher.checkpoint is not None and Path(teacher.checkpoint).is_relative_to(self.out):
            relative = str(Path(teacher.checkpoint).relative_to(self.out))
            teacher = teacher.model_copy(update={"checkpoint": relative})
        return self.base.model_copy(update={"teacher": teacher}).experiment_yaml()

    def _read(self, node: Node) -> bool:
        result = node.dir / RESULT
        if not result.is_file():
            return False
        data = json.loads(result.read_text())
        node.val_acc, node.epochs, node.seconds = data["val_acc"], data["epochs"], data["seconds"]
        # A result.json from before wall_seconds was written: its epochs' time.
        node.wall_seconds = data.get("wall_seconds", node.seconds)
        return True

    @staticmethod
    def _plan_of(node: Node) -> dict[str, Any]:
        return {"stages": [[s.method, s.beta, s.epochs] for s in node.stages], "lam": node.lam}

    def _stage(self, planned: PlanStage) -> Stage:
        """A plan's stage as a config stage, with the base's first stage's optimizer,
        schedule and CE weight."""
        first = self.base.stages[0]
        return Stage(
            methods=[MethodSpec(name=planned.method, weight=planned.beta)],
            epochs=planned.epochs,
            optimizer=first.optimizer,
            schedule=first.schedule,
            ce_weight=first.ce_weight,
        )

    def node_config(self, node: Node, parent: Node | None) -> RunConfig:
        update: dict[str, Any] = {"stages": [self._stage(node.stages[-1])], "seed": self.spec.seed}
        if parent is not None:
            update["student"] = self.base.student.model_copy(
                update={"checkpoint": str(parent.dir / "student.pt")}
            )
            update["continues"] = ContinuedRun(
                stages=len(parent.stages), epochs=sum(s.epochs for s in parent.stages)
            )
            update["reference"] = self.base.reference.model_copy(update={"lam": node.lam})
        cfg = self.base.model_copy(update=update)
        return validate(RunConfig, cfg.model_dump(mode="json"), str(node.dir))

    def train(self, node: Node, parent: Node | None) -> Node:
        """``node``'s stage from ``parent``'s student, unless it is trained already (by
        this worker or another: a prefix another worker is training is waited for)."""
        from smskd.experiment import distill

        while not self._read(node):
            cfg = self.node_config(node, parent)
            started = time.perf_counter()
            try:
                result = distill(
                    cfg, node.dir, resume=True, progress=self.progress, name=node.label
                )
            except RunInUse:
                self.log(f"waiting for {node.label}, which another worker trains")
                time.sleep(WAIT_SECONDS)
                continue
            except LossNotFinite as err:  # a plan that diverges is a bad plan, not a bad search
                self.log(f"failed {node.label}: {err}")
                failed = {"val_acc": None, "epochs": node.stages[-1].epochs, "seconds": 0.0}
                failed |= {"error": str(err), **self._plan_of(node)}
                atomic_write_text(node.dir / RESULT, json.dumps(failed) + "\n")
                continue
            outcome = {
                "val_acc": result.history[-1]["val_acc"],
                "epochs": node.stages[-1].epochs,
                "seconds": sum(r["epoch_time"] for r in result.history),
                "wall_seconds": time.perf_counter() - started,
                **self._plan_of(node),
            }
            atomic_write_text(node.dir / RESULT, json.dumps(outcome) + "\n")
            if result.epochs_trained:
                self.trained_here += 1
                self.log(
                    f"trained {node.label}: {outcome['val_acc']:.2f}% val "
                    f"({time.perf_counter() - started:.0f}s)"
                )
        return node

    def trained(self) -> list[Node]:
        """Every prefix trained so far, by any worker, with its plan."""
        nodes = []
        for folder in sorted((self.out / NODES).glob("*")):
            if (folder / RESULT).is_file():
                data = json.loads((folder / RESULT).read_text())
                stages = tuple(PlanStage(*s) for s in data["stages"])
                node = Node(stages, data["lam"], folder)
                self._read(node)
                nodes.append(node)
        return nodes

    def spent(self) -> tuple[int, int, float]:
        nodes = self.trained()
        return len(nodes), sum(n.epochs for n in nodes), sum(n.seconds for n in nodes)

    def allows(self, epochs: int) -> bool:
        """Whether the budget has room for one more stage training of ``epochs``."""
        count, student_epochs, seconds = self.spent()
        budget = self.spec.budget
        return not (
            (budget.stage_trainings is not None and count + 1 > budget.stage_trainings)
            or (
                budget.student_epochs is not None
                and student_epochs + epochs > budget.student_epochs
            )
            or (budget.seconds is not None and seconds >= budget.seconds)
        )

    # ------------------------------------------------------------------ Optuna

    def run(self) -> Node:
        """Search until the budget is spent; return the best prefix."""
        optuna = _optuna()
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        rundir.claim(self.out, rundir.SEARCH)
        atomic_write_text(self.out / "search.yaml", self.spec_path.read_text(encoding="utf-8"))
        self._resolve_teacher()
        # Our own log says what trains; Optuna's warnings would repeat a failure's
        # traceback, and its heartbeat is marked experimental.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # A worker killed mid-trial leaves it RUNNING; once its heartbeat is stale the
        # trial is queued again (its trained prefixes are reused, not retrained).
        storage = RDBStorage(
            f"sqlite:///{(self.out / STUDY_DB).resolve()}",
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=3 * HEARTBEAT_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
        try:  # resumed, or joined by another worker: a sampler seeded apart from theirs
            done = len(optuna.load_study(study_name=self.spec.name, storage=storage).trials)
        except KeyError:
            done = 0
        # constant_liar: a worker's proposals count the others' running trials as done
        # (with a pessimistic value), so parallel workers propose other plans.
        sampler = optuna.samplers.TPESampler(
            seed=self.spec.seed + done, n_startup_trials=8, constant_liar=True
        )
        study = optuna.create_study(
            study_name=self.spec.name,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=sampler,
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
        )
        # Trials in a row that trained nothing new (each costs milliseconds): after
        # IDLE_TRIALS the sampler keeps proposing what is known, so the space is used up.
        idle = [0]

        def objective(trial: optuna.Trial) -> float:
            before = self.trained_here
            try:
                return self._plan(trial)
            finally:
                idle[0] = 0 if self.trained_here > before else idle[0] + 1

        def stop_when_done(study: optuna.Study, _trial: object) -> None:
            if not self.allows(min(self.spec.epochs)) or idle[0] >= IDLE_TRIALS:
                study.stop()

        if self.allows(min(self.spec.epochs)):
            study.optimize(objective, callbacks=[stop_when_done], catch=())
        self._wait_for_other_workers()
        best = self.best()
        self._write_best(best)
        return best

    def _wait_for_other_workers(self) -> None:
        """The prefixes other workers are still training count for the choice: waiting
        for them, every worker chooses among the same prefixes, so the same plan (and
        they share one final retrain)."""
        said = False
        while busy := [
            folder
            for folder in sorted((self.out / NODES).glob("*"))
            if not (folder / RESULT).is_file() and runlock.held(folder)
        ]:
            if not said:
                self.log(f"choosing once {', '.join(f.name for f in busy)} (other workers) end")
                said = True
            time.sleep(WAIT_SECONDS)

    def _plan(self, trial: Any) -> float:
        optuna = _optuna()
        lam = trial.suggest_categorical("lam", self.spec.lam)
        stages: tuple[PlanStage, ...] = ()
        parent = None
        score = 0.0
        for depth in range(1, self.spec.max_stages + 1):
            method = trial.suggest_categorical(f"method_{depth}", list(self.spec.methods))
            beta = trial.suggest_categorical(f"beta_{depth}_{method}", self.spec.methods[method])
            epochs = trial.suggest_categorical(f"epochs_{depth}", self.spec.epochs)
            stages = (*stages, PlanStage(method, float(beta), int(epochs)))
            node = self.node(stages, float(lam))
            if node.val_acc is None:
                if not self.allows(node.stages[-1].epochs):
                    raise optuna.TrialPruned()  # no budget left for this prefix
                self.train(node, parent)
            if node.val_acc is None:  # it failed (NaN loss...): nothing extends it
                raise optuna.TrialPruned()
            score = node.val_acc
            trial.set_user_attr(f"node_{depth}", node.dir.name)
            trial.report(score, depth)
            if depth < self.spec.max_stages and trial.should_prune():
                raise optuna.TrialPruned()
            parent = node
        return score

    def _resolve_teacher(self) -> None:
        from smskd.experiment import own_teachers

        resolved = teachers_among_workers(
            self.base, own_teachers(self.out), progress=self.progress, root=self.out, log=self.log
        )
        assert resolved is not None  # it waits
        self.base = resolved

    # ------------------------------------------------------------------ results

    def best(self) -> Node:
        nodes = [n for n in self.trained() if n.val_acc is not None]
        if not nodes:
            raise UserError(f"{self.out}: the budget ended before any stage was trained; raise it")
        # The highest validation accuracy; of equals, the shorter and cheaper plan.
        return max(
            nodes, key=lambda n: (n.val_acc, -len(n.stages), -sum(s.epochs for s in n.stages))
        )

    def plan_config(self, node: Node) -> RunConfig:
        update: dict[str, Any] = {"stages": [self._stage(s) for s in node.stages]}
        if node.lam is not None:
            update["reference"] = self.base.reference.model_copy(update={"lam": node.lam})
        cfg = self.base.model_copy(update=update)
        return validate(RunConfig, cfg.model_dump(mode="json"), BEST)

    def _write_best(self, node: Node) -> None:
        cfg = self.plan_config(node)
        header = (
            f"# The plan smskd search chose (validation accuracy {node.val_acc:.2f}% at seed "
            f"{self.spec.seed}):\n#   {node.label}\n"
            f"#   smskd distill {self.out / BEST} --out runs/best\n"
        )
        atomic_write_text(self.out / BEST, header + cfg.to_yaml())
        stages = [s.model_dump(mode="json", exclude_defaults=True) for s in cfg.stages]
        searched = [f"stages={json.dumps(stages)}"]
        if node.lam is not None:
            searched.append(f"reference.lam={node.lam}")
        final = {
            "name": f"{self.spec.name}-final",
            "base": str(self.base_path),
            "seeds": self.spec.final_seeds,
            # The teacher the plan was chosen with, trained by the search if it had to be.
            "set": [*self.spec.set, f"teacher.checkpoint={self.base.teacher.checkpoint}"],
            "recipes": [
                {"kind": "single", "method": "kd"},
                "joint",
                "smskd",
                {"kind": "smskd", "name": "searched", "group": "search", "set": searched},
            ],
        }
        text = "# The final retrain of smskd search (test split), made by it:\n"
        atomic_write_text(
            self.out / FINAL_SWEEP,
            text + yaml.safe_dump(final, sort_keys=False, allow_unicode=True),
        )


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("smskd search needs Optuna: pip install 'smskd[search]'") from None
    return optuna


def run_search(
    spec_file: str | Path,
    out_dir: str | Path,
    *,
    final: bool = True,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Node:
    """Search ``spec_file``'s space into ``out_dir`` (resuming what is there), write
    ``best.yaml`` and ``final.yaml``, and (``final``) run the final retrain into
    ``OUT/final`` and write ``OUT/report.md``."""
    path = Path(spec_file)
    spec = load_search(path)
    # Resolved: prefixes name their parents' weights by path, whatever the working directory.
    search = Search(spec, path, Path(out_dir).resolve(), progress=progress, log=log)
    best = search.run()
    log(f"best plan: {best.label}: {best.val_acc:.2f}% val; config: {search.out / BEST}")
    if final:
        from smskd.study.sweep import run_sweep

        run_sweep(search.out / FINAL_SWEEP, search.out / "final", progress=progress, log=log)
    from smskd.study.search_report import write_search_report

    write_search_report(search, naive_counts(spec), BEST)
    return best


__all__ = ["Node", "PlanStage", "Search", "SearchSpec", "load_search", "naive_counts", "run_search"]
