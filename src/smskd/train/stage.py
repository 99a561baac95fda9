"""One stage built: its methods with their taps and helpers, what it minimizes, and the
optimizer, schedule and loss scaler over the student and those helpers.

    with build_stage(stage, student, teacher, reference, probe_batch, device) as built:
        train_epoch(built.models, built.objective, batches, built.optimizer, device)

Leaving the block (or :meth:`BuiltStage.close`) removes the stage's forward hooks from
student and teacher: the next stage taps other layers, and the next reference is a deep
copy of the student, which must not copy them.
"""

from __future__ import annotations

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
        _remove(self.models.student_taps, self.models.teacher_taps)

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
) -> BuiltStage:
    """Build ``stage`` for ``student`` and ``teacher``: its methods, their taps, their
    helpers sized by one forward of ``probe_batch`` (a training batch), the objective
    with ``reference`` (the frozen previous student, or None in stage 1) weighted as
    ``reference_config`` says, and a fresh optimizer and schedule. ``num_samples``, the
    training set's size, is for the methods that keep a bank per sample (CRD).
    """
    if stage.methods and teacher is None:
        raise UserError(f"stage {stage.label!r} uses KD methods but no teacher was given")
    student_layout = layout_of(student)
    teacher_layout = layout_of(teacher) if teacher is not None else student_layout
    methods = [
        build_method(spec.name, spec.options, student_layout, teacher_layout)
        for spec in stage.methods
    ]
    student_taps = FeatureTaps(student, [t for m in methods for t in m.student_taps()], "student")
    teacher_taps = None
    try:
        if teacher is not None:
            teacher_taps = FeatureTaps(
                teacher, [t for m in methods for t in m.teacher_taps()], "teacher"
            )
        models = StageModels(
            student,
            teacher,
            reference,
            student_taps,
            teacher_taps,
            methods,
            acceleration or Acceleration(device.type),
        )
        _setup_methods(models, methods, stage, probe_batch, device, num_samples)
    except BaseException:
        _remove(student_taps, teacher_taps)
        raise
    objective = StageObjective(
        stage.ce_weight,
        [
            (m, spec.weight if spec.weight is not None else m.default_weight)
            for m, spec in zip(methods, stage.methods, strict=True)
        ],
        reference_config or ReferenceConfig(),
    )
    params = list(student.parameters()) + [p for m in methods for p in m.parameters()]
    optimizer = build_optimizer(stage.optimizer, params)
    return BuiltStage(
        stage,
        models,
        methods,
        objective,
        optimizer,
        build_scheduler(stage.schedule, optimizer, stage.epochs),
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
    cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def _remove(*taps: FeatureTaps | None) -> None:
    for tap in taps:
        if tap is not None:
            tap.remove()


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
