"""The stage loop of SMSKD (DESIGN.md §1) for any models and any batch iterables.

    for each stage k:
        R ← frozen copy of the student (k ≥ 2)
        build the stage's methods (taps, helpers sized by one probe batch)
        train with CE + Σ β·L_method + TCP-weighted reference loss
        carry the student (only the student) into stage k+1

Baselines are other stage lists through the same loop (see :mod:`smskd.study.recipes`).
Each epoch ends with an atomic checkpoint (and, if asked, every N steps; always on
SIGINT/SIGTERM); a run restarted with ``resume=True`` continues from the last one,
mid-epoch included, bit-identical on CPU for the same seed and thread count.

The loop only says when things happen. What they are lives beside it: a stage's parts
(:mod:`~smskd.train.stage`), checkpoints and resuming (:mod:`~smskd.train.resume`), the
output cache, DDP, signals and progress reports in their own modules.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from smskd.config import (
    PerformanceConfig,
    ReferenceConfig,
    Stage,
    TrackingConfig,
    check_one_schedule,
    why_teacher_needed,
)
from smskd.errors import UserError
from smskd.store.checkpoint import atomic_save, atomic_write_text
from smskd.store.tracking import MetricsLog, RunTracker, check_backends
from smskd.train import distributed
from smskd.train.acceleration import Acceleration
from smskd.train.epoch import EpochProgress, NonFiniteLoss, evaluate, train_epoch
from smskd.train.forgetting import ForgettingProbe
from smskd.train.interrupt import RunStopped, StopRequest
from smskd.train.output_cache import FillStopped
from smskd.train.progress import ProgressBar, Reporting
from smskd.train.reference import make_reference
from smskd.train.resume import Checkpoints, ResumePoint, restore_stage
from smskd.train.selection import StageBest, best_epoch, selection_score
from smskd.train.stage import BuiltStage, ScheduleSpan, build_stage, carry_student_state

FORGETTING = "forgetting.json"


class LossNotFinite(UserError):
    """Training diverged (a NaN/Inf loss with ``nonfinite: stop``): the settings, not the
    input, are at fault; a search records such a plan as failed and goes on."""


@dataclass
class RunResult:
    """The trained student, its per-epoch records and, with a probe set, the forgetting
    matrix (one row per stage end, see :mod:`smskd.train.forgetting`)."""

    student: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0
    forgetting: list[dict[str, Any]] = field(default_factory=list)
    epochs_trained: int = 0  # by this call: fewer after a resume, 0 for a finished run

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_acc"]

    @property
    def best_accuracy(self) -> float:
        """The best test accuracy of any epoch: chosen on test, so optimistic."""
        return max(r["test_acc"] for r in self.history)

    @property
    def selected_record(self) -> dict[str, Any] | None:
        """The record of the best validation epoch; None without a validation split."""
        return best_epoch(self.history)

    @property
    def selected_accuracy(self) -> float | None:
        """Test accuracy at the best validation epoch; None without a validation split."""
        chosen = self.selected_record
        return chosen["test_acc"] if chosen is not None else None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(
            f"device {device!r} is not a device name (try 'auto', 'cpu', 'cuda')"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available; use 'cpu'")
    return resolved


def check_stages(
    student: nn.Module,
    teacher: nn.Module | None,
    stages: Sequence[Stage],
    probe_batch: Any,
    num_samples: int | None = None,
) -> None:
    """Build every stage once and drop it: bad tap names, shapes that no helper can
    bridge and missing indices surface before any training, not after stage 1."""
    device = next(student.parameters()).device
    for stage in stages:
        build_stage(stage, student, teacher, None, probe_batch, device, num_samples).close()


def run_stages(
    student: nn.Module,
    teacher: nn.Module | None,
    stages: Sequence[Stage],
    train_data: Iterable,
    eval_data: Iterable,
    *,
    reference: ReferenceConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    name: str = "smskd",
    log: Callable[[str], None] = tqdm.write,
    checkpoint_every_steps: int | None = None,
    nonfinite: str = "stop",
    performance: PerformanceConfig | None = None,
    tracking: TrackingConfig | Sequence[str] | None = None,
    hparams: Mapping[str, Any] | None = None,
    val_data: Iterable | None = None,
    probe_data: Iterable | None = None,
    schedule_across_stages: str = "restart",
    continues: tuple[int, int] | None = None,
) -> RunResult:
    """Train ``student`` through ``stages``; return it with its per-epoch history.

    ``train_data`` and ``eval_data`` are any iterables of ``(x, y)`` or
    ``(x, y, index)`` batches (a ``DataLoader`` works). With ``out_dir`` the run
    writes ``metrics.jsonl``, ``checkpoints/`` (after every epoch, and every
    ``checkpoint_every_steps`` steps if set) and the final ``student.pt``;
    SIGINT/SIGTERM then finish the current step, write a checkpoint and raise
    :class:`~smskd.train.interrupt.RunStopped`. ``nonfinite``: ``"stop"`` ends the run
    at a NaN/Inf loss naming stage, epoch and step (keeping the last good
    checkpoint); ``"skip"`` leaves such batches out and counts them.
    ``performance`` sets mixed precision, channels_last, ``torch.compile`` and the
    teacher-output cache (:class:`~smskd.config.PerformanceConfig`). ``tracking``
    adds TensorBoard / MLflow to the CSV and JSONL logs (``["tensorboard", "mlflow"]``
    or a :class:`~smskd.config.TrackingConfig`; they need ``out_dir``), with
    ``hparams`` as the run's hyper-parameters (default: seed, stages and reference).
    Checkpoints record the seed, the stages and ``hparams`` (but its ``tracking``);
    ``resume`` refuses one that another run wrote.

    ``val_data``: a validation split, evaluated after every epoch (``val_acc``); what
    the run chooses (``reference.snapshot: best``, :attr:`RunResult.selected_accuracy`)
    is chosen on it, never on ``eval_data``, the test split. ``probe_data``: fixed
    validation batches on which every stage end's forgetting is measured
    (``OUT/forgetting.json``, :attr:`RunResult.forgetting`). ``schedule_across_stages``:
    ``"restart"`` (a fresh optimizer and LR schedule per stage) or ``"continue"`` (one
    schedule over every stage's epochs, the student's optimizer state carried on).
    ``continues``: ``(stages, epochs)`` of an earlier staged run whose end ``student``
    is: the first stage here is its stage ``stages + 1``, anchored to ``student`` as
    given, and seeds and data order go on after ``epochs`` epochs, so the stages train
    exactly as in the whole run.
    """
    if not stages:
        raise UserError("the stage list is empty: give at least one Stage")
    if nonfinite not in ("stop", "skip"):
        raise UserError(f"nonfinite must be 'stop' or 'skip', not {nonfinite!r}")
    reference_cfg = reference or ReferenceConfig()
    if reference_cfg.snapshot == "best" and len(stages) > 1 and val_data is None:
        raise UserError(
            "reference snapshot 'best' takes each stage's best validation epoch: pass "
            "val_data (or set data.val_split)"
        )
    if schedule_across_stages not in ("restart", "continue"):
        raise UserError(
            "schedule_across_stages must be 'restart' or 'continue', not "
            f"{schedule_across_stages!r}"
        )
    if schedule_across_stages == "continue":
        try:
            check_one_schedule(stages)
        except ValueError as err:
            raise UserError(str(err)) from None
    if continues is not None and schedule_across_stages == "continue":
        raise UserError("continues: use schedule_across_stages 'restart'")
    needed = why_teacher_needed(stages, reference_cfg, continues is not None)
    if teacher is None and needed is not None:
        raise UserError(f"no teacher was given, but one is required because {needed}")
    if not isinstance(tracking, TrackingConfig):  # ["tensorboard"], as in a config file
        tracking = TrackingConfig.model_validate(tracking or [])
    if tracking.backends and out_dir is None:
        raise UserError(f"tracking {tracking.backends} writes into the run directory; pass out_dir")
    check_backends(tracking)
    if hparams is None:
        hparams = {
            "seed": seed,
            "stages": [s.model_dump(mode="json") for s in stages],
            "reference": reference_cfg.model_dump(mode="json"),
            "schedule_across_stages": schedule_across_stages,
        }
    device = resolve_device(device)
    performance = performance or PerformanceConfig()
    acceleration = Acceleration.of(performance, device)
    acceleration.prepare(student.to(device))
    if teacher is not None:
        if teacher is student:
            raise UserError("teacher and student are the same module object; pass two models")
        acceleration.prepare(teacher.to(device).eval().requires_grad_(False))
    training = _Training(
        student,
        teacher,
        list(stages),
        train_data,
        eval_data,
        reference_cfg,
        seed,
        val_data,
        probe_data,
        schedule_across_stages == "continue",
        continues or (0, 0),
        _snapshot(student) if continues is not None else None,
    )
    execution = _Execution(
        device,
        acceleration,
        performance.cache_max_gib * 2**30 if performance.cache_teacher else None,
        Path(performance.cache_dir) if performance.cache_dir is not None else None,
        performance.cache_disk_gib * 2**30,
        nonfinite,
        distributed.current(),
    )
    bookkeeping = _Bookkeeping(
        Path(out_dir) if out_dir is not None else None,
        name,
        log,
        progress,
        checkpoint_every_steps,
        tracking,
        dict(hparams),
    )
    return _train(training, execution, bookkeeping, resume)


@dataclass(frozen=True)
class _Training:
    """What :func:`run_stages` trains: the student through the stages, on these data."""

    student: nn.Module
    teacher: nn.Module | None
    stages: list[Stage]
    train_data: Iterable
    eval_data: Iterable  # the test split: evaluated and reported, never chosen on
    reference: ReferenceConfig
    seed: int
    val_data: Iterable | None  # what every choice is made on
    probe_data: Iterable | None  # the forgetting measures' validation images
    one_schedule: bool  # schedule_across_stages: continue
    before: tuple[int, int]  # stages and epochs of the staged run this one continues
    start_weights: dict[str, torch.Tensor] | None  # its end: the first stage's reference

    def epochs_before(self, stage: int, epoch: int) -> int:
        """Epochs of the run before epoch index ``epoch`` of stage index ``stage``."""
        return sum(s.epochs for s in self.stages[:stage]) + epoch


@dataclass(frozen=True)
class _Execution:
    """How the steps run: where, how fast, and what a NaN/Inf loss does."""

    device: torch.device
    acceleration: Acceleration
    cache_bytes: float | None  # the frozen-output cache's limit; None: no cache
    cache_dir: Path | None  # where the teacher's outputs are shared between runs
    cache_disk_bytes: float  # how much of them may be read from there, not memory
    nonfinite: str
    job: distributed.Dist  # this process among a torchrun job's ranks


@dataclass(frozen=True)
class _Bookkeeping:
    """What the run writes and says, and where."""

    out: Path | None
    name: str
    log: Callable[[str], None]
    progress: bool
    checkpoint_every_steps: int | None
    tracking: TrackingConfig
    hparams: dict[str, Any]


def _train(
    training: _Training, execution: _Execution, bookkeeping: _Bookkeeping, resume: bool
) -> RunResult:
    """Pick up where the last checkpoint left off, run the loop, keep the final student."""
    # Under DDP every rank trains and reads checkpoints; only rank 0 writes or talks.
    if not execution.job.is_main:
        bookkeeping = replace(bookkeeping, log=lambda _message: None, progress=False)
    out = bookkeeping.out
    saves = out is not None and execution.job.is_main
    if saves:
        out.mkdir(parents=True, exist_ok=True)
    checkpoints = None
    if out is not None:
        checkpoints = Checkpoints(
            out / "checkpoints", training.stages, training.seed, bookkeeping.hparams
        )
    start = ResumePoint()
    if resume and checkpoints is not None:
        steps = _steps_per_epoch(training.train_data)
        on_cpu = execution.device.type == "cpu"
        start = checkpoints.resume_point(training.student, steps, bookkeeping.log, on_cpu)
    reporting = _reporting(training, bookkeeping, start, saves, resume)
    stage_best = None
    if training.reference.snapshot == "best" and training.val_data is not None:
        stage_best = StageBest(checkpoints.stage_best if checkpoints else None, saves)
        if checkpoints is not None:
            stage_best.hashes = checkpoints.best_snapshots  # one record, kept in last.pt
            saved = start.state.get("stage_best") if start.state is not None else None
            stage_best.restore(saved, start.stage + 1, reporting.metrics.records)
    probe = None
    if training.probe_data is not None and execution.job.is_main:
        probe = ForgettingProbe(
            training.probe_data,
            training.stages,
            training.teacher,
            execution.device,
            stage_end=checkpoints.stage_end_weights if checkpoints else None,
            helpers=checkpoints.helpers if checkpoints else None,
        )
        if saves and resume and (out / FORGETTING).is_file():
            rows = json.loads((out / FORGETTING).read_text()).get("rows", [])
            probe.rows = [r for r in rows if r["stage"] <= start.stage]
    loop = _StageLoop(
        training,
        execution,
        reporting,
        checkpoints,
        saves,
        bookkeeping.checkpoint_every_steps,
        stage_best,
        probe,
        start.previous_optimizer,
    )
    started = time.perf_counter()
    status = "FAILED"
    try:
        loop.run(start)
        status = "FINISHED"
    except (RunStopped, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        reporting.close(status)
    if saves:
        atomic_save(training.student.state_dict(), out / "student.pt")
    history = list(reporting.metrics.records)
    rows = probe.rows if probe is not None else []
    total = training.epochs_before(len(training.stages), 0)
    trained = total - training.epochs_before(start.stage, start.epoch)
    return RunResult(training.student, history, time.perf_counter() - started, rows, trained)


def _reporting(
    training: _Training,
    bookkeeping: _Bookkeeping,
    start: ResumePoint,
    saves: bool,
    resume: bool,
) -> Reporting:
    """The run's reports, continued from ``start``: records past it are dropped, as the
    run trains them again."""
    name, log = bookkeeping.name, bookkeeping.log
    if start.stage == len(training.stages):
        log(f"{name}: already complete; nothing to train")
    elif start.stage > 0 or start.state is not None:
        log(f"{name}: resuming at {start}")
    metrics = MetricsLog(bookkeeping.out / "metrics.jsonl" if saves else None)
    done = training.epochs_before(start.stage, start.epoch)
    metrics.keep_until(done)
    if saves:
        tracker = RunTracker(
            bookkeeping.tracking,
            bookkeeping.out,
            name=name,
            hparams=bookkeeping.hparams,
            resume_step=start.global_step,
            resume=resume,
        )
    else:  # other ranks, and runs without a directory, track nothing
        tracker = RunTracker(TrackingConfig(), None)
    steps = _steps_per_epoch(training.train_data)
    remaining = training.epochs_before(len(training.stages), 0) - done
    total = steps * remaining if steps else None
    bar = ProgressBar(name, total, bookkeeping.progress)
    return Reporting(name, log, metrics, tracker, bar)


@dataclass
class _StageLoop:
    """Stage → epoch → step, as DESIGN.md §1 writes them; all else a run does is a call
    to an object beside the loop."""

    training: _Training
    execution: _Execution
    reporting: Reporting
    checkpoints: Checkpoints | None  # every rank reads them, to resume
    saves: bool  # this rank writes them: rank 0 of a run with a directory
    every_steps: int | None  # a checkpoint every this many steps, besides each epoch's
    stage_best: StageBest | None  # each stage's best-validation student (snapshot: best)
    probe: ForgettingProbe | None  # measures each stage end
    carried: dict[str, Any] | None  # the stage before's optimizer state (one schedule)
    stop: StopRequest = field(default_factory=StopRequest)

    def run(self, start: ResumePoint) -> None:
        with self.stop:
            self._measure_missed(start.stage)
            for k in range(start.stage, len(self.training.stages)):
                self._stage(start if k == start.stage else ResumePoint(k))

    def _stage(self, start: ResumePoint) -> None:
        """One stage from ``start``, its beginning or a checkpoint midway: R ← the frozen
        student, the stage built, its epochs trained. Only the student goes on."""
        t, x = self.training, self.execution
        k, stage = start.stage, t.stages[start.stage]
        started = time.perf_counter()
        reference = self._reference(k, midway=start.state is not None)
        # Helpers' init does not depend on history, only on the stage's place in the run.
        torch.manual_seed(t.seed * 7919 + t.before[0] + k)
        probe = next(iter(t.train_data))
        span = None
        if t.one_schedule:
            span = ScheduleSpan(t.epochs_before(k, 0), t.epochs_before(len(t.stages), 0))
        with build_stage(
            stage,
            t.student,
            t.teacher,
            reference,
            probe,
            x.device,
            num_samples=_num_samples(t.train_data),
            acceleration=x.acceleration,
            reference_config=t.reference,
            span=span,
        ) as built:
            if x.cache_bytes is not None:
                self._cache_frozen_outputs(built)
            partial = restore_stage(start.state, built) if start.state is not None else None
            if span is not None and start.state is None and self.carried is not None:
                count = sum(1 for _ in t.student.parameters())
                carry_student_state(self.carried, built.optimizer, count)
            if x.job.enabled:
                built.models.student = distributed.data_parallel(t.student, built.methods, x.device)
            built.models.compile()
            for epoch in range(start.epoch, stage.epochs):
                self._epoch(k, built, epoch, partial)
                partial = None
            self.carried = built.optimizer.state_dict() if span is not None else None
        seconds = time.perf_counter() - started
        self.reporting.end_stage(k + 1, len(t.stages), stage.label, seconds)
        if self.probe is not None:
            self._measure(k + 1, t.student, built.methods)

    def _measure(self, number: int, student: nn.Module, methods: list) -> None:
        """Stage ``number``'s row of the forgetting matrix, logged and saved."""
        assert self.probe is not None
        row = self.probe.finished(number, student, methods)
        measures = row["measures"]
        shown = ", ".join(
            f"{key} {value:.3f}" for key, value in measures.items() if value is not None
        )
        self.reporting.log(f"{self.reporting.name}: stage {number} end on the probe: {shown}")
        if self.saves and self.checkpoints is not None:
            out = self.checkpoints.folder.parent
            text = json.dumps({"split": "validation", "rows": self.probe.rows}, indent=1)
            atomic_write_text(out / FORGETTING, text + "\n")

    def _measure_missed(self, finished: int) -> None:
        """Rows of stages that finished before a kill let them be measured."""
        if self.probe is None or self.checkpoints is None:
            return
        measured = {row["stage"] for row in self.probe.rows}
        for number in range(1, finished + 1):
            if number not in measured:
                student = copy.deepcopy(self.training.student)
                student.load_state_dict(self.checkpoints.stage_end_weights(number))
                self._measure(number, student, [])

    def _reference(self, k: int, midway: bool) -> nn.Module | None:
        """R for stage index ``k``: the student as the stage before left it (or at its
        best validation epoch), frozen."""
        t = self.training
        if t.reference.weighting == "none" or (k == 0 and t.start_weights is None):
            return None
        if k == 0:
            return make_reference(t.student, t.start_weights, fold=t.reference.anchor == "logits")
        fold = t.reference.anchor == "logits"  # an anchored embedding keeps its module
        if self.stage_best is not None:
            return make_reference(t.student, self.stage_best.of(k), fold=fold)
        # Midway through stage k the student has moved on: the stage before's end is on disk.
        stage_end = None
        if midway and self.checkpoints is not None:
            stage_end = self.checkpoints.stage_end_weights(k)
        # Before the stage's taps exist: a deep copy would copy the hooks.
        return make_reference(self.training.student, stage_end, fold=fold)

    def _epoch(self, k: int, built: BuiltStage, epoch: int, partial: EpochProgress | None) -> None:
        """One epoch: train (``partial`` done already), step the schedule, evaluate,
        record, checkpoint."""
        t, x, stage = self.training, self.execution, built.stage
        global_epoch = t.epochs_before(k, epoch) + 1
        _set_epoch(t.train_data, t.before[1] + global_epoch)
        for method in built.methods:
            method.start_epoch(epoch, stage.epochs)
        lr = built.optimizer.param_groups[0]["lr"]
        # A stage's first epoch resumed midway is no boundary: that was marked before.
        first = epoch == 0 and partial is None
        self.reporting.start_epoch(k + 1, len(t.stages), stage, epoch + 1, lr, first)
        started = time.perf_counter()
        try:
            train = train_epoch(
                built.models,
                built.objective,
                t.train_data,
                built.optimizer,
                x.device,
                self.reporting.step,
                progress=partial,
                after_step=functools.partial(self._after_step, k, built, epoch),
                nonfinite=x.nonfinite,
                scaler=built.scaler,
            )
        except NonFiniteLoss as err:
            raise self._nonfinite(k, built, epoch, err.step) from None
        built.scheduler.step()
        distributed.sync_buffers(t.student)
        val = {}
        if t.val_data is not None:
            scores = evaluate(t.student, t.val_data, x.device, x.acceleration)
            val = {f"val_{key}": value for key, value in scores.items()}
        test = evaluate(t.student, t.eval_data, x.device, x.acceleration)
        self.reporting.end_epoch(
            {
                "stage": k + 1,
                "stage_name": stage.label,
                "epoch": epoch + 1,
                "global_epoch": global_epoch,
                "lr": lr,
                **{f"train_{key}": value for key, value in train.items()},
                **val,
                **{f"test_{key}": value for key, value in test.items()},
                "epoch_time": time.perf_counter() - started,
            }
        )
        if self.stage_best is not None:
            self.stage_best.offer(k + 1, selection_score(val), t.student)  # type: ignore[arg-type]
        if epoch + 1 == stage.epochs:
            self._save_stage_end(k, built)
        self._save(k, built, epoch + 1, None)
        if self.stop.requested:
            raise self._stopped(f"after {_where(k, built, epoch)}")

    def _after_step(self, k: int, built: BuiltStage, epoch: int, progress: EpochProgress) -> None:
        """Between two steps: the periodic checkpoint, and a stop that was asked for."""
        periodic = self.every_steps is not None and progress.steps % self.every_steps == 0
        stop = self.stop.agreed(self.execution.device)
        if not (stop or periodic):
            return
        if (bad := progress.nonfinite_step()) is not None:
            raise self._nonfinite(k, built, epoch, bad)
        self._save(k, built, epoch, progress)
        if stop:
            raise self._stopped(f"in {_where(k, built, epoch)}, after step {progress.steps}")

    def _save(self, k: int, built: BuiltStage, epoch: int, progress: EpochProgress | None) -> None:
        """``last.pt`` after ``epoch`` completed epochs (and ``progress`` of the next)."""
        if not self.saves:
            return
        assert self.checkpoints is not None
        tracker = self.reporting.tracker
        # A logged point ends here, so a resumed run's points average the same steps.
        tracker.flush()
        student = self.training.student
        best = self.stage_best.running(k + 1) if self.stage_best is not None else None
        state = self.checkpoints.state(
            k, epoch, progress, tracker.global_step, student, built, best
        )
        atomic_save(state, self.checkpoints.last, keep_previous=True)

    def _save_stage_end(self, k: int, built: BuiltStage) -> None:
        if not self.saves:
            return
        assert self.checkpoints is not None
        # Before last.pt: a resume in stage k+2 rebuilds its reference from it.
        self.checkpoints.snapshots[k + 1] = atomic_save(
            self.training.student.state_dict(), self.checkpoints.stage_end(k + 1)
        )
        if self.probe is not None:  # later stage ends measure this stage's method with them
            self.checkpoints.save_helpers(k + 1, built.methods)
        if self.stage_best is not None:
            self.stage_best.finish(k + 1)

    def _cache_frozen_outputs(self, built: BuiltStage) -> None:
        assert self.execution.cache_bytes is not None
        started = time.perf_counter()
        try:
            cached = built.models.cache_frozen_outputs(
                self.training.train_data,
                self.execution.cache_bytes,
                self.execution.cache_dir,
                self.execution.cache_disk_bytes,
                lambda line: self.reporting.log(f"{self.reporting.name}: {line}"),
                # Under DDP a stop is agreed by every rank at a step; not here.
                lambda: self.stop.requested and not self.execution.job.enabled,
            )
        except FillStopped:
            raise self._stopped("while computing the teacher's outputs") from None
        if cached:
            views = cached[0].views
            shown = f"{cached[0].samples} samples" + (f" × {views} views" if views > 1 else "")
            on_disk = sum(c.disk_bytes for c in cached)
            where = f", {on_disk / 2**30:.1f} GiB read from disk" if on_disk else ""
            self.reporting.log(
                f"{self.reporting.name}: cached the frozen outputs of {shown} "
                f"({sum(c.nbytes for c in cached) / 2**20:.1f} MiB{where}) in "
                f"{time.perf_counter() - started:.1f}s"
            )

    def _nonfinite(self, k: int, built: BuiltStage, epoch: int, step: int) -> LossNotFinite:
        kept = (
            "the last good checkpoint is kept"
            if self.checkpoints is not None
            else "nothing was saved"
        )
        return LossNotFinite(
            f"{self.reporting.name}: the loss became NaN/Inf in {_where(k, built, epoch)}, "
            f"step {step}; lower the learning rate or the method weights, or set nonfinite: "
            f"skip ({kept})"
        )

    def _stopped(self, when: str) -> RunStopped:
        saved = "a checkpoint is written" if self.checkpoints is not None else "nothing is saved"
        return RunStopped(
            f"{self.reporting.name}: stopped by {self.stop.name} {when}; {saved}",
            self.stop.signum or 0,
        )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _where(k: int, built: BuiltStage, epoch: int) -> str:
    return f"stage {k + 1} ({built.stage.label}), epoch {epoch + 1}"


def _set_epoch(batches: Iterable, epoch: int) -> None:
    """Give every part of a loader that can reshuffle or re-augment the epoch number
    (our loader; a DataLoader's sampler and dataset), as with ``DistributedSampler``."""
    owners = [batches]
    for attribute in ("sampler", "batch_sampler", "dataset"):
        owners.append(getattr(batches, attribute, None))
    for owner in owners:
        if owner is not None and hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)


def _steps_per_epoch(batches: Iterable) -> int | None:
    return len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]


def _num_samples(batches: Iterable) -> int | None:
    dataset = getattr(batches, "dataset", None)
    for source in (dataset, getattr(batches, "labels", None)):
        if source is not None and hasattr(source, "__len__"):
            return len(source)
    return None
