"""The stage loop of SMSKD (DESIGN.md §1) for any models and any batch iterables.

    for each stage k:
        R ← frozen copy of the student (k ≥ 2)
        build the stage's methods (taps, helpers sized by one probe batch)
        train with CE + Σ β·L_method + TCP-weighted reference loss
        carry the student (only the student) into stage k+1

Baselines are other stage lists through the same loop (see :mod:`smskd.study.recipes`).
Each epoch ends with an atomic checkpoint (and, if asked, every N steps; always on
SIGINT/SIGTERM); a run restarted with ``resume=True`` continues from the last one,
mid-epoch included, bit-identical on CPU for the same seed.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from smskd.config import (
    OptimizerConfig,
    PerformanceConfig,
    ReferenceConfig,
    ScheduleConfig,
    Stage,
    TrackingConfig,
)
from smskd.errors import UserError
from smskd.methods.base import DistillMethod, StageContext, check_batch_memory
from smskd.methods.registry import build_method
from smskd.models.taps import FeatureTaps, layout_of
from smskd.store.checkpoint import (
    atomic_save,
    has_checkpoint,
    load_latest,
    load_state_dict,
    misfit,
    rng_state,
    set_rng_state,
)
from smskd.store.tracking import MetricsLog, RunTracker, check_backends
from smskd.train import distributed
from smskd.train.acceleration import Acceleration
from smskd.train.epoch import (
    EpochProgress,
    NonFiniteLoss,
    StageModels,
    StageObjective,
    evaluate,
    forward_outputs,
    train_epoch,
    unpack_batch,
)
from smskd.train.interrupt import RunStopped, StopRequest
from smskd.train.output_cache import cache_outputs
from smskd.train.reference import make_reference

CHECKPOINT_FORMAT = 1  # the newest layout of last.pt this version reads and writes


@dataclass
class RunResult:
    student: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_acc"]

    @property
    def best_accuracy(self) -> float:
        return max(r["test_acc"] for r in self.history)


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


def build_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _set_epoch(batches: Iterable, epoch: int) -> None:
    """Give every part of a loader that can reshuffle or re-augment the epoch number
    (our loader; a DataLoader's sampler and dataset), as with ``DistributedSampler``."""
    owners = [batches]
    for attribute in ("sampler", "batch_sampler", "dataset"):
        owners.append(getattr(batches, attribute, None))
    for owner in owners:
        if owner is not None and hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)


class _Progress:
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


def _num_samples(batches: Iterable) -> int | None:
    dataset = getattr(batches, "dataset", None)
    for source in (dataset, getattr(batches, "labels", None)):
        if source is not None and hasattr(source, "__len__"):
            return len(source)
    return None


def _build_stage(
    stage: Stage,
    student: nn.Module,
    teacher: nn.Module | None,
    reference: nn.Module | None,
    probe_batch: Any,
    device: torch.device,
    num_samples: int | None = None,
    acceleration: Acceleration | None = None,
) -> tuple[StageModels, list[DistillMethod]]:
    """Methods, taps and helpers of one stage; helpers sized by a probe forward."""
    if stage.methods and teacher is None:
        raise UserError(f"stage {stage.label!r} uses KD methods but no teacher was given")
    student_layout = layout_of(student)
    teacher_layout = layout_of(teacher) if teacher is not None else student_layout
    methods = [
        build_method(spec.name, spec.options, student_layout, teacher_layout)
        for spec in stage.methods
    ]
    student_taps = FeatureTaps(student, [t for m in methods for t in m.student_taps()], "student")
    try:
        teacher_taps = (
            FeatureTaps(teacher, [t for m in methods for t in m.teacher_taps()], "teacher")
            if teacher is not None
            else None
        )
    except BaseException:
        student_taps.remove()
        raise
    models = StageModels(
        student,
        teacher,
        reference,
        student_taps,
        teacher_taps,
        methods,
        acceleration or Acceleration(device.type),
    )
    try:
        _setup_methods(models, methods, stage, probe_batch, device, num_samples)
    except BaseException:
        _remove_taps(models)
        raise
    return models, methods


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
        models, _ = _build_stage(stage, student, teacher, None, probe_batch, device, num_samples)
        _remove_taps(models)


def _remove_taps(models: StageModels) -> None:
    for taps in (models.student_taps, models.teacher_taps):
        if taps is not None:
            taps.remove()


def _setup_methods(
    models: StageModels,
    methods: list[DistillMethod],
    stage: Stage,
    probe_batch: Any,
    device: torch.device,
    num_samples: int | None,
) -> None:
    """Size each method's helpers from one probe forward (no grad, BN statistics kept),
    after checking the batch against what the methods estimate they need; no forward
    when no method builds or estimates anything from it (KD, DKD...: nothing to size)."""
    student = models.student
    if any(
        type(m).setup is not DistillMethod.setup
        or type(m).batch_memory is not DistillMethod.batch_memory
        or m.needs_index
        for m in methods
    ):
        x, y, index = unpack_batch(probe_batch, device)
        needing_index = [m.name for m in methods if m.needs_index]
        if needing_index and index is None:
            raise UserError(
                f"method {needing_index[0]!r} needs each sample's dataset index: make the "
                "training loader yield (inputs, labels, index)"
            )
        was_training = student.training
        student.eval()  # the probe must not move BN statistics
        if models.teacher is not None:
            models.teacher.eval()  # frozen for good, whoever calls this
        with torch.no_grad():
            probe = forward_outputs(models, x, y, index)
        student.train(was_training)
        context = StageContext(stage.epochs, num_samples, probe.student_logits.shape[1])
        check_batch_memory(methods, len(x), probe, context)
        for method in methods:
            method.setup(probe, context)
    for method in methods:
        method.to(device)


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
    """
    if not stages:
        raise UserError("the stage list is empty: give at least one Stage")
    if nonfinite not in ("stop", "skip"):
        raise UserError(f"nonfinite must be 'stop' or 'skip', not {nonfinite!r}")
    reference_cfg = reference or ReferenceConfig()
    if teacher is None and len(stages) > 1 and reference_cfg.needs_teacher:
        raise UserError(
            f"reference weighting {reference_cfg.weighting!r} reads the teacher's true-class "
            "probability, but no teacher was given; pass a teacher or use weighting 'fixed'"
        )
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
        }
    device = resolve_device(device)
    performance = performance or PerformanceConfig()
    acceleration = Acceleration.of(performance, device)
    acceleration.prepare(student.to(device))
    if teacher is not None:
        if teacher is student:
            raise UserError("teacher and student are the same module object; pass two models")
        acceleration.prepare(teacher.to(device).eval().requires_grad_(False))
    run = _Run(
        student,
        teacher,
        list(stages),
        train_data,
        eval_data,
        reference_cfg,
        seed,
        device,
        Path(out_dir) if out_dir is not None else None,
        name,
        log,
        checkpoint_every_steps,
        nonfinite,
        acceleration,
        performance.cache_max_gib * 2**30 if performance.cache_teacher else None,
        tracking,
        dict(hparams),
    )
    return run.execute(resume, progress)


@dataclass
class _Run:
    """The state one call of :func:`run_stages` shares across its stages and epochs."""

    student: nn.Module
    teacher: nn.Module | None
    stages: list[Stage]
    train_data: Iterable
    eval_data: Iterable
    reference_cfg: ReferenceConfig
    seed: int
    device: torch.device
    out: Path | None
    name: str
    log: Callable[[str], None]
    every_steps: int | None
    nonfinite: str
    acceleration: Acceleration
    cache_bytes: float | None  # the teacher-output cache's limit; None: no cache
    tracking: TrackingConfig
    hparams: dict[str, Any]

    def execute(self, resume: bool, progress: bool) -> RunResult:
        self.dist = distributed.current()
        self.identity = _identity(self.seed, self.stages, self.hparams)
        self.snapshots: dict[int, str] = {}  # stage k → SHA-256 of stage{k}.pt, as written
        # Under DDP every rank trains and reads checkpoints; only rank 0 writes or talks.
        self.writes = self.out is not None and self.dist.is_main
        if not self.dist.is_main:
            self.log = lambda _message: None
            progress = False
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.out / "checkpoints" if self.out is not None else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.writes else None)
        state = self._resume_state() if resume else None
        resume_step = self._global_step(state) if state else 0
        start_stage, start_epoch = (state["stage"], state["epoch"]) if state else (0, 0)
        if state is not None and start_epoch >= self.stages[start_stage].epochs:
            start_stage, start_epoch, state = start_stage + 1, 0, None  # stage was complete
        if resume and start_stage == len(self.stages):
            self.log(f"{self.name}: already complete; nothing to train")
        elif resume and (state is not None or start_stage > 0):
            step = f", step {state['step'] + 1}" if state and state.get("step") else ""
            self.log(
                f"{self.name}: resuming at stage {start_stage + 1}, epoch {start_epoch + 1}{step}"
            )
        self.global_epoch = sum(s.epochs for s in self.stages[:start_stage]) + start_epoch
        self.metrics.keep_until(self.global_epoch)
        self.tracker = self._tracker(resume_step, resume)
        steps = len(self.train_data) if hasattr(self.train_data, "__len__") else None  # type: ignore[arg-type]
        remaining = sum(s.epochs for s in self.stages) - self.global_epoch
        self.bar = _Progress(self.name, steps * remaining if steps else None, progress)
        started = time.perf_counter()
        status = "FAILED"
        try:
            with StopRequest() as self.stop:
                for k in range(start_stage, len(self.stages)):
                    self._stage(k, start_epoch if k == start_stage else 0, state)
                    state = None
            status = "FINISHED"
        except (RunStopped, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            self.bar.close()
            self.tracker.close(status)
        if self.writes:
            atomic_save(self.student.state_dict(), self.out / "student.pt")
        return RunResult(self.student, list(self.metrics.records), time.perf_counter() - started)

    def _global_step(self, state: dict[str, Any]) -> int:
        """Steps done before the checkpoint ``state``; counted from the epochs for a
        checkpoint written before it recorded them."""
        if "global_step" in state:
            return state["global_step"]
        epochs = sum(s.epochs for s in self.stages[: state["stage"]]) + state["epoch"]
        per_epoch = len(self.train_data) if hasattr(self.train_data, "__len__") else 0  # type: ignore[arg-type]
        return epochs * per_epoch + state.get("step", 0)

    def _tracker(self, resume_step: int, resume: bool) -> RunTracker:
        if not self.writes:  # other ranks, and runs without a directory, log nothing
            return RunTracker(TrackingConfig(), None)
        return RunTracker(
            self.tracking,
            self.out,
            name=self.name,
            hparams=self.hparams,
            resume_step=resume_step,
            resume=resume,
        )

    def _resume_state(self) -> dict[str, Any] | None:
        if self.checkpoints is None or not has_checkpoint(self.checkpoints):
            return None
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies to the device.
        # A damaged last.pt (size or checksum) falls back to last.prev.pt, saying so.
        state, path = load_latest(self.checkpoints, "cpu", log=self.log, check=self._check_ours)
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError as err:
            raise UserError(
                f"checkpoint {str(path)!r} does not fit this run's student "
                f"({misfit(err)}); resume the run it came from, or start over with --force"
            ) from None
        self.snapshots = dict(state.get("snapshots", {}))
        return state

    def _check_ours(self, state: Any, path: Path) -> None:
        """Refuse a checkpoint this run cannot continue: not a run checkpoint, a newer
        format, or another run's (seed, stages or config differ). One written before
        checkpoints recorded their run is trusted for what it cannot tell."""
        where = f"checkpoint {str(path)!r}"
        version = state.get("format", 1) if isinstance(state, dict) else 1
        if type(version) is not int or version < 1:
            raise UserError(
                f"{where} has checkpoint format {version!r}, which no smskd writes; start over "
                "with --force"
            )
        if version > CHECKPOINT_FORMAT:
            raise UserError(
                f"{where} has checkpoint format {version}, from a newer smskd (this one reads "
                f"up to {CHECKPOINT_FORMAT}); upgrade smskd to resume it"
            )
        if not isinstance(state, dict) or not {"student", "stage", "epoch"} <= state.keys():
            raise UserError(
                f"{where} is not a run checkpoint (no training state: weights copied in?); "
                "start over with --force"
            )
        theirs = state.get("identity")
        if not isinstance(theirs, dict):
            if state.get("num_stages") != len(self.stages):
                raise UserError(
                    f"cannot resume from {path}: it was written for "
                    f"{state.get('num_stages')} stages, this run has {len(self.stages)}"
                )
            return
        difference = _difference(theirs, self.identity)
        if difference is not None:
            raise UserError(
                f"{where} belongs to another run ({difference}); resume the run it came "
                "from, or start over with --force"
            )

    def _stage(self, k: int, first_epoch: int, state: dict[str, Any] | None) -> None:
        stage = self.stages[k]
        started = time.perf_counter()
        ref_model = None
        if k > 0 and self.reference_cfg.weighting != "none":
            # Built before the stage's taps exist: a deep copy would copy the hooks.
            stage_end = None
            if state is not None and self.checkpoints is not None:
                snapshot = self.checkpoints / f"stage{k}.pt"
                stage_end = load_state_dict(snapshot, sha256=self.snapshots.get(k))
            ref_model = make_reference(self.student, stage_end)
        torch.manual_seed(self.seed * 7919 + k)  # helpers' init does not depend on history
        models, methods = _build_stage(
            stage,
            self.student,
            self.teacher,
            ref_model,
            next(iter(self.train_data)),
            self.device,
            _num_samples(self.train_data),
            self.acceleration,
        )
        try:
            if self.cache_bytes is not None:
                self._cache_frozen_outputs(models)
            objective = StageObjective(
                stage.ce_weight,
                [
                    (m, spec.weight if spec.weight is not None else m.default_weight)
                    for m, spec in zip(methods, stage.methods, strict=True)
                ],
                self.reference_cfg,
            )
            params = list(self.student.parameters()) + [p for m in methods for p in m.parameters()]
            optimizer = build_optimizer(stage.optimizer, params)
            scheduler = build_scheduler(stage.schedule, optimizer, stage.epochs)
            scaler = self.acceleration.grad_scaler()
            partial = None
            if state is not None:
                for method, method_state in zip(methods, state["methods"], strict=True):
                    method.load_state_dict(method_state)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                set_rng_state(state["rng"])
                if state.get("step"):
                    partial = EpochProgress(
                        steps=state["step"],
                        skipped=state.get("skipped", 0),
                        sums={key: v.to(self.device) for key, v in state["sums"].items()},
                        rng=state["rng"],
                    )
            if self.dist.enabled:
                models.student = _data_parallel(self.student, methods, self.device)
            # After the taps exist (compiled hooks are traced, later ones never fire).
            models.student = self.acceleration.compiled(models.student)
            if models.teacher_cache is None:
                models.teacher = self.acceleration.compiled(models.teacher)
            if models.reference_cache is None:
                models.reference = self.acceleration.compiled(models.reference)
            parts = _StageParts(k, stage, models, methods, objective, optimizer, scheduler, scaler)
            for epoch in range(first_epoch, stage.epochs):
                self._epoch(parts, epoch, partial)
                partial = None
        finally:
            _remove_taps(models)
        records = [r for r in self.metrics.records if r["stage"] == k + 1]
        if records:
            self.log(
                f"{self.name}: stage {k + 1}/{len(self.stages)} {stage.label}: "
                f"test acc {records[-1]['test_acc']:.2f}% "
                f"(best {max(r['test_acc'] for r in records):.2f}%), "
                f"{time.perf_counter() - started:.1f}s"
            )

    def _epoch(self, parts: _StageParts, epoch: int, partial: EpochProgress | None) -> None:
        k, stage = parts.index, parts.stage
        self.global_epoch += 1
        self.bar.describe(k + 1, len(self.stages), stage.label, epoch + 1, stage.epochs)
        _set_epoch(self.train_data, self.global_epoch)
        for method in parts.methods:
            method.start_epoch(epoch, stage.epochs)
        lr = parts.optimizer.param_groups[0]["lr"]
        # A stage's first epoch resumed midway is no boundary: that was marked before.
        first = epoch == 0 and partial is None
        self.tracker.start_epoch(k + 1, stage.label, epoch + 1, lr, first=first)
        started = time.perf_counter()
        where = f"stage {k + 1} ({stage.label}), epoch {epoch + 1}"

        def on_step(terms: dict[str, torch.Tensor]) -> None:
            self.bar.step(terms)
            self.tracker.step(terms)

        def after_step(progress: EpochProgress) -> None:
            periodic = self.every_steps is not None and progress.steps % self.every_steps == 0
            # Ranks receive a signal at different moments: they stop together.
            stop = distributed.any_rank(self.stop.requested, self.device)
            if stop and not self.stop.requested:
                self.stop.signum = signal.SIGTERM
            if not (stop or periodic):
                return
            if (bad := progress.nonfinite_step()) is not None:
                raise self._nonfinite(where, bad)
            if self.writes:
                self._save(parts, epoch, progress)
            if self.stop.requested:
                saved = "a checkpoint is written" if self.checkpoints else "nothing is saved"
                raise RunStopped(
                    f"{self.name}: stopped by {self.stop.name} in {where}, after step "
                    f"{progress.steps}; {saved}",
                    self.stop.signum or 0,
                )

        try:
            train = train_epoch(
                parts.models,
                parts.objective,
                self.train_data,
                parts.optimizer,
                self.device,
                on_step,
                progress=partial,
                after_step=after_step,
                nonfinite=self.nonfinite,
                scaler=parts.scaler,
            )
        except NonFiniteLoss as err:
            raise self._nonfinite(where, err.step) from None
        parts.scheduler.step()
        distributed.sync_buffers(self.student)
        test = evaluate(self.student, self.eval_data, self.device, self.acceleration)
        record = {
            "stage": k + 1,
            "stage_name": stage.label,
            "epoch": epoch + 1,
            "global_epoch": self.global_epoch,
            "lr": lr,
            **{f"train_{key}": value for key, value in train.items()},
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "epoch_time": time.perf_counter() - started,
        }
        # Metrics first: a resume drops records past its checkpoint, never misses one.
        self.metrics.log(record)
        self.tracker.end_epoch(record)
        if self.writes:
            if epoch + 1 == stage.epochs:
                # Before last.pt: a resume in stage k+2 rebuilds its reference from it.
                snapshot = self.checkpoints / f"stage{k + 1}.pt"
                self.snapshots[k + 1] = atomic_save(self.student.state_dict(), snapshot)
            self._save(parts, epoch + 1, None)
        self.bar.epoch_done(train["loss"], test["acc"])
        if self.stop.requested:
            raise RunStopped(
                f"{self.name}: stopped by {self.stop.name} after {where}; "
                + ("a checkpoint is written" if self.checkpoints else "nothing is saved"),
                self.stop.signum or 0,
            )

    def _cache_frozen_outputs(self, models: StageModels) -> None:
        """Teacher outputs (with this stage's taps) and reference logits, once per stage."""
        assert self.cache_bytes is not None
        started = time.perf_counter()
        budget = self.cache_bytes
        if models.teacher is not None:
            models.teacher_cache = cache_outputs(
                models.teacher,
                models.teacher_taps,
                self.train_data,
                self.acceleration,
                max_bytes=budget,
            )
            budget -= models.teacher_cache.nbytes
        if models.reference is not None:
            models.reference_cache = cache_outputs(
                models.reference,
                None,
                self.train_data,
                self.acceleration,
                max_bytes=budget,
                what="reference",
            )
        cached = [c for c in (models.teacher_cache, models.reference_cache) if c is not None]
        if cached:
            self.log(
                f"{self.name}: cached the frozen outputs of {len(cached[0].logits)} samples "
                f"({sum(c.nbytes for c in cached) / 2**20:.1f} MiB) in "
                f"{time.perf_counter() - started:.1f}s"
            )

    def _nonfinite(self, where: str, step: int) -> UserError:
        kept = "the last good checkpoint is kept" if self.checkpoints else "nothing was saved"
        return UserError(
            f"{self.name}: the loss became NaN/Inf in {where}, step {step}; lower the learning "
            f"rate or the method weights, or set nonfinite: skip ({kept})"
        )

    def _save(self, parts: _StageParts, epoch: int, progress: EpochProgress | None) -> None:
        """``last.pt`` after ``epoch`` completed epochs (and ``progress`` of the next)."""
        assert self.checkpoints is not None
        # A logged point ends here, so a resumed run's points average the same steps.
        self.tracker.flush()
        state = {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "snapshots": dict(self.snapshots),
            "num_stages": len(self.stages),
            "stage": parts.index,
            "epoch": epoch,
            "step": progress.steps if progress else 0,
            "global_step": self.tracker.global_step,
            "skipped": progress.skipped if progress else 0,
            "sums": {key: v.cpu() for key, v in progress.sums.items()} if progress else {},
            "student": self.student.state_dict(),
            "methods": [m.state_dict() for m in parts.methods],
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "rng": rng_state(),
        }
        atomic_save(state, self.checkpoints / "last.pt", keep_previous=True)


def _identity(seed: int, stages: Sequence[Stage], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What tells this run's checkpoints from another's: seed, stage layout and config.

    The config goes as canonical JSON text, not a hash: a resume then names the key that
    differs, and a key that only one side has (a newer smskd's) is no difference. Its
    ``tracking`` section is left out: it changes where numbers go, not the training.
    """
    config = {key: value for key, value in hparams.items() if key != "tracking"}
    return {
        "seed": seed,
        "stages": [[stage.label, stage.epochs] for stage in stages],
        "config": json.dumps(config, sort_keys=True, default=_stable_text),
    }


def _stable_text(value: object) -> str:
    # A value JSON cannot hold is compared by its text, less the memory address that
    # a default repr carries and no other process shares.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(value))


def _difference(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str | None:
    """How checkpoint identity ``theirs`` differs from this run's ``ours``, in words."""
    if theirs.get("seed") != ours["seed"]:
        return f"seed {theirs.get('seed')}; this run has seed {ours['seed']}"
    if theirs.get("stages") != ours["stages"]:
        return f"stages {_layout(theirs.get('stages'))}; this run has {_layout(ours['stages'])}"
    try:
        config = json.loads(theirs.get("config", "{}"))
    except (TypeError, ValueError):
        return "its recorded config is unreadable"
    found = _first_change(config, json.loads(ours["config"]), "")
    if found is None:
        return None
    key, their_value, our_value = found
    return f"{key} is {_short(their_value)}; this run has {_short(our_value)}"


def _layout(stages: Any) -> str:
    try:
        return ", ".join(
            f"{label} ({epochs} epoch{'' if epochs == 1 else 's'})" for label, epochs in stages
        )
    except (TypeError, ValueError):  # not pairs: no smskd wrote it
        return repr(stages)


def _first_change(theirs: Any, ours: Any, key: str) -> tuple[str, Any, Any] | None:
    """The first key (``stages.0.optimizer.lr``) whose value differs; keys only one side
    has are skipped, as ``config.yaml`` from before a key existed reads as its default."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        pairs = [(name, theirs[name], ours[name]) for name in sorted(theirs.keys() & ours.keys())]
    elif isinstance(theirs, list) and isinstance(ours, list) and len(theirs) == len(ours):
        pairs = [(str(i), a, b) for i, (a, b) in enumerate(zip(theirs, ours, strict=True))]
    else:
        return None if theirs == ours else (key or "the config", theirs, ours)
    for name, a, b in pairs:
        found = _first_change(a, b, f"{key}.{name}" if key else name)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _StageParts:
    """What one stage builds: its methods, objective, optimizer and schedule."""

    index: int
    stage: Stage
    models: StageModels
    methods: list[DistillMethod]
    objective: StageObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


class _Trainable(nn.Module):
    """Student plus the stage's helpers, as one module for DDP to synchronize.

    Its forward is the student's: the helpers get their gradients in the loss, and
    DDP averages every parameter's gradient as it becomes ready, used in this
    forward or not.
    """

    def __init__(self, student: nn.Module, methods: list[DistillMethod]) -> None:
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(methods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _data_parallel(
    student: nn.Module, methods: list[DistillMethod], device: torch.device
) -> nn.Module:
    """DDP over the student and the stage's helpers; teacher and reference stay plain."""
    from torch.nn.parallel import DistributedDataParallel

    trainable = _Trainable(student, methods)
    # Method buffers (CRD's memory banks) are kept equal by the method itself, which
    # gathers every rank's update; broadcasting them from rank 0 each step would
    # only move megabytes for nothing.
    ignored = [f"methods.{name}" for name, _ in trainable.methods.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(trainable, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(trainable, device_ids=device_ids)
