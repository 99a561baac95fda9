"""The stage loop of SMSKD (DESIGN.md §1) for any models and any batch iterables.

    for each stage k:
        R ← frozen copy of the student (k ≥ 2)
        build the stage's methods (taps, helpers sized by one probe batch)
        train with CE + Σ β·L_method + TCP-weighted reference loss
        carry the student (only the student) into stage k+1

Baselines are other stage lists through the same loop (see :mod:`smskd.recipes`).
Each epoch ends with an atomic checkpoint; a run restarted with ``resume=True``
continues after the last completed epoch, bit-identical on CPU for the same seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from smskd.checkpoint import atomic_save, load_state_dict, safe_load
from smskd.config import OptimizerConfig, ReferenceConfig, ScheduleConfig, Stage
from smskd.engine import (
    StageModels,
    StageObjective,
    evaluate,
    forward_outputs,
    train_epoch,
    unpack_batch,
)
from smskd.errors import UserError
from smskd.methods.base import DistillMethod, StageContext
from smskd.methods.registry import build_method
from smskd.reference import make_reference
from smskd.taps import FeatureTaps, layout_of
from smskd.tracking import MetricsLog

CHECKPOINT_FORMAT = 1


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
    models = StageModels(student, teacher, reference, student_taps, teacher_taps, methods)
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
    """Size each method's helpers from one probe forward (no grad, BN statistics kept)."""
    student = models.student
    if methods:
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
        for method in methods:
            method.setup(probe, context)
            method.to(device)


def _training_state(
    num_stages: int,
    stage: int,
    epoch: int,
    global_epoch: int,
    student: nn.Module,
    methods: list[DistillMethod],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Everything a resume needs after ``epoch`` (completed) of ``stage`` (0-based)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "num_stages": num_stages,
        "stage": stage,
        "epoch": epoch,
        "global_epoch": global_epoch,
        "student": student.state_dict(),
        "methods": [m.state_dict() for m in methods],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }


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
) -> RunResult:
    """Train ``student`` through ``stages``; return it with its per-epoch history.

    ``train_data`` and ``eval_data`` are any iterables of ``(x, y)`` or
    ``(x, y, index)`` batches (a ``DataLoader`` works). With ``out_dir`` the run
    writes ``metrics.jsonl``, ``checkpoints/`` and the final ``student.pt``.
    """
    if not stages:
        raise UserError("the stage list is empty: give at least one Stage")
    reference_cfg = reference or ReferenceConfig()
    if teacher is None and len(stages) > 1 and reference_cfg.needs_teacher:
        raise UserError(
            f"reference weighting {reference_cfg.weighting!r} reads the teacher's true-class "
            "probability, but no teacher was given; pass a teacher or use weighting 'fixed'"
        )
    device = resolve_device(device)
    student.to(device)
    if teacher is not None:
        if teacher is student:
            raise UserError("teacher and student are the same module object; pass two models")
        teacher.to(device).eval().requires_grad_(False)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    checkpoints = out / "checkpoints" if out is not None else None
    metrics = MetricsLog(out / "metrics.jsonl" if out is not None else None)

    start_stage, start_epoch, state = 0, 0, None
    if resume and checkpoints is not None and (checkpoints / "last.pt").exists():
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies to the device.
        state = safe_load(checkpoints / "last.pt", map_location="cpu")
        if state.get("num_stages") != len(stages):
            raise UserError(
                f"cannot resume from {checkpoints / 'last.pt'}: it was written for "
                f"{state.get('num_stages')} stages, this run has {len(stages)}"
            )
        student.load_state_dict(state["student"])
        start_stage, start_epoch = state["stage"], state["epoch"]
        if start_epoch >= stages[start_stage].epochs:
            start_stage, start_epoch, state = start_stage + 1, 0, None
        log(f"{name}: resuming at stage {start_stage + 1}, epoch {start_epoch + 1}")
    global_epoch = sum(s.epochs for s in stages[:start_stage]) + start_epoch
    metrics.keep_until(global_epoch)

    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else None  # type: ignore[arg-type]
    remaining = sum(s.epochs for s in stages) - global_epoch
    bar = _Progress(name, steps_per_epoch * remaining if steps_per_epoch else None, progress)
    started = time.perf_counter()
    try:
        for k in range(start_stage, len(stages)):
            stage = stages[k]
            stage_started = time.perf_counter()
            ref_model = None
            if k > 0 and reference_cfg.weighting != "none":
                # Built before the stage's taps exist: a deep copy would copy the hooks.
                ref_model = make_reference(student)
                if state is not None and checkpoints is not None:
                    ref_model.load_state_dict(load_state_dict(checkpoints / f"stage{k}.pt"))
            torch.manual_seed(seed * 7919 + k)  # helpers' init does not depend on history
            probe_batch = next(iter(train_data))
            models, methods = _build_stage(
                stage, student, teacher, ref_model, probe_batch, device, _num_samples(train_data)
            )
            objective = StageObjective(
                stage.ce_weight,
                [
                    (m, spec.weight if spec.weight is not None else m.default_weight)
                    for m, spec in zip(methods, stage.methods, strict=True)
                ],
                reference_cfg,
            )
            params = list(student.parameters()) + [p for m in methods for p in m.parameters()]
            optimizer = build_optimizer(stage.optimizer, params)
            scheduler = build_scheduler(stage.schedule, optimizer, stage.epochs)
            if state is not None:
                for method, method_state in zip(methods, state["methods"], strict=True):
                    method.load_state_dict(method_state)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["rng"]["torch"])
                if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            first_epoch, state = (start_epoch if k == start_stage else 0), None
            try:
                for epoch in range(first_epoch, stage.epochs):
                    global_epoch += 1
                    bar.describe(k + 1, len(stages), stage.label, epoch + 1, stage.epochs)
                    _set_epoch(train_data, global_epoch)
                    for method in methods:
                        method.start_epoch(epoch, stage.epochs)
                    lr = optimizer.param_groups[0]["lr"]
                    epoch_started = time.perf_counter()
                    train = train_epoch(models, objective, train_data, optimizer, device, bar.step)
                    if not math.isfinite(train["loss"]):
                        raise UserError(
                            f"{name}: loss became {train['loss']} in stage {k + 1} "
                            f"({stage.label}), epoch {epoch + 1}; lower the learning rate or "
                            "the method weights (the last good checkpoint is kept)"
                        )
                    scheduler.step()
                    test = evaluate(student, eval_data, device)
                    record = {
                        "stage": k + 1,
                        "stage_name": stage.label,
                        "epoch": epoch + 1,
                        "global_epoch": global_epoch,
                        "lr": lr,
                        **{f"train_{key}": value for key, value in train.items()},
                        "test_acc": test["acc"],
                        "test_loss": test["loss"],
                        "epoch_time": time.perf_counter() - epoch_started,
                    }
                    # Metrics first: a resume drops records past its checkpoint, never misses one.
                    metrics.log(record)
                    if checkpoints is not None:
                        if epoch + 1 == stage.epochs:
                            # Before last.pt: a resume in stage k+2 rebuilds its reference from it.
                            atomic_save(student.state_dict(), checkpoints / f"stage{k + 1}.pt")
                        atomic_save(
                            _training_state(
                                len(stages),
                                k,
                                epoch + 1,
                                global_epoch,
                                student,
                                methods,
                                optimizer,
                                scheduler,
                            ),
                            checkpoints / "last.pt",
                        )
                    bar.epoch_done(train["loss"], test["acc"])
            finally:
                _remove_taps(models)
            stage_records = [r for r in metrics.records if r["stage"] == k + 1]
            if stage_records:
                log(
                    f"{name}: stage {k + 1}/{len(stages)} {stage.label}: "
                    f"test acc {stage_records[-1]['test_acc']:.2f}% "
                    f"(best {max(r['test_acc'] for r in stage_records):.2f}%), "
                    f"{time.perf_counter() - stage_started:.1f}s"
                )
            del methods, models, optimizer, scheduler, ref_model
    finally:
        bar.close()
    if out is not None:
        atomic_save(student.state_dict(), out / "student.pt")
    return RunResult(student, list(metrics.records), time.perf_counter() - started)
