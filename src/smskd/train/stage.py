"""One stage built: its methods with their taps and helpers, what it minimizes, and the
optimizer, schedule and loss scaler over the student and those helpers.

    with build_stage(stage, student, teacher, reference, probe_batch, device) as built:
        train_epoch(built.models, built.objective, batches, built.optimizer, device)

Leaving the block (or :meth:`BuiltStage.close`) removes the stage's forward hooks from
student and teacher: the next stage taps other layers, and the next reference is a deep
copy of the student, which must not copy them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smskd.config import OptimizerConfig, ReferenceConfig, ScheduleConfig, Stage
from smskd.errors import UserError
from smskd.methods.base import DistillMethod, StageContext, check_batch_memory
from smskd.methods.registry import build_method
from smskd.models.taps import FeatureTaps, layout_of
from smskd.train.acceleration import Acceleration
from smskd.train.epoch import StageModels, StageObjective, forward_outputs, unpack_batch
from smskd.train.reference import tap_target


@dataclass(frozen=True)
class ScheduleSpan:
    """Where a stage's epochs sit in one LR schedule over the whole run
    (``schedule_across_stages: continue``): after ``offset`` of its ``total`` epochs."""

    offset: int
    total: int


@dataclass
class BuiltStage:
    """One stage ready to train; its taps stay on student and teacher until :meth:`close`."""

    stage: Stage
    models: StageModels
    methods: list[DistillMethod]
    objective: StageObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device

    def close(self) -> None:
        _remove(self.models.student_taps, self.models.teacher_taps, self.models.reference_taps)

    def __enter__(self) -> BuiltStage:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def build_stage(
    stage: Stage,
    student: nn.Module,
    teacher: nn.Module | None,
    reference: nn.Module | None,
    probe_batch: Any,
    device: torch.device,
    num_samples: int | None = None,
    acceleration: Acceleration | None = None,
    reference_config: ReferenceConfig | None = None,
    span: ScheduleSpan | None = None,
) -> BuiltStage:
    """Build ``stage`` for ``student`` and ``teacher``: its methods, their taps, their
    helpers sized by one forward of ``probe_batch`` (a training batch), the objective
    with ``reference`` (the frozen previous student, or None in stage 1) weighted as
    ``reference_config`` says, and a fresh optimizer and schedule (the stage's part of
    one schedule over the run, with ``span``). ``num_samples``, the training set's
    size, is for the methods that keep a bank per sample (CRD).
    """
    if stage.methods and teacher is None:
        raise UserError(f"stage {stage.label!r} uses KD methods but no teacher was given")
    reference_config = reference_config or ReferenceConfig()
    student_layout = layout_of(student)
    teacher_layout = layout_of(teacher) if teacher is not None else student_layout
    methods = [
        build_method(spec.name, spec.options, student_layout, teacher_layout)
        for spec in stage.methods
    ]
    embedding = None
    if reference is not None and reference_config.anchor == "logits+embedding":
        embedding = student_layout.embedding
        if embedding is None:
            raise UserError(
                "reference.anchor 'logits+embedding' needs the student's embedding, and the "
                "student declares none (give it taps.embedding) or use anchor: logits"
            )
    student_tapped = [t for m in methods for t in m.student_taps()]
    student_taps = FeatureTaps(student, [*student_tapped, *filter(None, [embedding])], "student")
    teacher_taps = reference_taps = None
    try:
        if teacher is not None:
            teacher_taps = FeatureTaps(
                teacher, [t for m in methods for t in m.teacher_taps()], "teacher"
            )
        if embedding is not None:
            reference_taps = FeatureTaps(tap_target(reference), [embedding], "reference")
        models = StageModels(
            student,
            teacher,
            reference,
            student_taps,
            teacher_taps,
            reference_taps,
            methods,
            acceleration or Acceleration(device.type),
        )
        _setup_methods(models, methods, stage, probe_batch, device, num_samples)
    except BaseException:
        _remove(student_taps, teacher_taps, reference_taps)
        raise
    objective = StageObjective(
        stage.ce_weight,
        [
            (m, spec.weight if spec.weight is not None else m.default_weight)
            for m, spec in zip(methods, stage.methods, strict=True)
        ],
        reference_config,
        embedding,
    )
    params = list(student.parameters()) + [p for m in methods for p in m.parameters()]
    optimizer = build_optimizer(stage.optimizer, params)
    return BuiltStage(
        stage,
        models,
        methods,
        objective,
        optimizer,
        build_scheduler(stage.schedule, optimizer, stage.epochs, span),
        models.acceleration.grad_scaler(),
        device,
    )


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
    cfg: ScheduleConfig,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    span: ScheduleSpan | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The stage's LR schedule over its ``epochs``, or, with ``span``, its part of one
    schedule over the whole run (milestones then count the run's epochs)."""
    if span is not None:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: lr_factor(cfg, span.offset + epoch, span.total)
        )
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def lr_factor(cfg: ScheduleConfig, epoch: int, total: int) -> float:
    """The fraction of the base LR that schedule ``cfg`` gives epoch ``epoch`` (0-based)
    of ``total``: the closed forms of the per-stage schedulers."""
    if cfg.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / total))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(milestone <= epoch for milestone in cfg.milestones)
    return 1.0


def carry_student_state(
    previous: dict[str, Any], optimizer: torch.optim.Optimizer, count: int
) -> None:
    """Give ``optimizer`` the state (momentum, Adam moments) that ``previous``, the state
    dict of the stage before's optimizer, holds for the first ``count`` parameters: the
    student's, which come first in every stage's optimizer. The helpers of the stage
    before are gone; this stage's start fresh."""
    current = optimizer.state_dict()
    for i in range(count):
        if i in previous["state"]:
            current["state"][i] = previous["state"][i]
    optimizer.load_state_dict(current)


def _remove(*taps: FeatureTaps | None) -> None:
    for tap in taps:
        if tap is not None:
            tap.remove()


def _check_sequences(methods: list[DistillMethod], probe_batch: Any) -> None:
    """Sequences (labels ``[B, T]``) take response methods, which see one row per token,
    and the language-model feature methods, which mask padding; an image feature or
    relation method would read padded positions as data. Images take no LM method."""
    labels = probe_batch[1] if isinstance(probe_batch, (tuple, list)) else None
    sequences = isinstance(labels, torch.Tensor) and labels.dim() > 1
    for method in methods:
        if sequences and method.family != "response" and not method.needs_sequences:
            raise UserError(
                f"method {method.name!r} is for images: on sequences it would average over "
                "padding; use response methods (lm-kd, kd, ...), lm-hidden or lm-attention"
            )
        if not sequences and method.needs_sequences:
            raise UserError(
                f"method {method.name!r} matches a language model's per-token features; "
                "these batches have one label per sample"
            )


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
    _check_sequences(methods, probe_batch)
    student = models.student
    if any(
        type(m).setup is not DistillMethod.setup
        or type(m).batch_memory is not DistillMethod.batch_memory
        or m.needs_index
        for m in methods
    ):
        x, y, index, _ = unpack_batch(probe_batch, device)
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
