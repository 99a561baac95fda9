"""One training epoch and one evaluation pass; the loss of one SMSKD step.

Everything here works per batch and knows nothing of stages or configs. Losses
are accumulated on the device and read back once per epoch, so the loop makes
no host synchronization per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.config import ReferenceConfig
from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs
from smskd.reference import reference_term
from smskd.taps import FeatureTaps


@dataclass
class StageObjective:
    """``ce_weight·CE + Σ β_m·L_m + mean_i(w_i·L_ref,i)`` — what one stage minimizes."""

    ce_weight: float
    methods: list[tuple[DistillMethod, float]]
    reference: ReferenceConfig


@dataclass
class StageModels:
    """The networks of one stage. Teacher and reference are frozen and in eval mode."""

    student: nn.Module
    teacher: nn.Module | None = None
    reference: nn.Module | None = None
    student_taps: FeatureTaps | None = None
    teacher_taps: FeatureTaps | None = None
    trainable: list[nn.Module] = field(default_factory=list)

    def train(self) -> None:
        self.student.train()
        for module in self.trainable:
            module.train()
        # Frozen networks stay in eval mode: BN statistics and dropout must not move.
        for frozen in (self.teacher, self.reference):
            if frozen is not None:
                frozen.eval()


def unpack_batch(batch: object, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """Accept ``(x, y)`` or ``(x, y, index)`` as any DataLoader yields them."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise UserError(
            "each batch must be (inputs, labels) or (inputs, labels, sample_index); "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    x = batch[0].to(device, non_blocking=True)
    y = batch[1].to(device, non_blocking=True)
    index = batch[2].to(device, non_blocking=True) if len(batch) == 3 else None
    return x, y, index


def forward_outputs(models: StageModels, x: Tensor, y: Tensor, index: Tensor | None) -> Outputs:
    """Run teacher, then student; the teacher under ``no_grad``.

    ``no_grad`` rather than ``inference_mode``: a method may keep a teacher tensor
    for its backward (``s * t``), which autograd refuses for inference tensors.
    """
    teacher_logits = None
    if models.teacher is not None:
        with torch.no_grad():
            teacher_logits = models.teacher(x)
    student_logits = models.student(x)
    return Outputs(
        student_logits=student_logits,
        teacher_logits=teacher_logits,  # type: ignore[arg-type]
        labels=y,
        student_features=dict(models.student_taps.features) if models.student_taps else {},
        teacher_features=dict(models.teacher_taps.features) if models.teacher_taps else {},
        index=index,
    )


def step_loss(
    models: StageModels, objective: StageObjective, x: Tensor, y: Tensor, index: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The stage's total loss for one batch and its detached terms (for logging)."""
    out = forward_outputs(models, x, y, index)
    terms: dict[str, Tensor] = {}
    total = out.student_logits.new_zeros((), dtype=torch.float32)
    if objective.ce_weight:
        terms["ce"] = F.cross_entropy(out.student_logits.float(), y)
        total = total + objective.ce_weight * terms["ce"]
    for method, weight in objective.methods:
        value = method.loss(out)
        value = value.mean() if value.dim() else value
        terms[method.name] = value
        total = total + weight * value
    if models.reference is not None:
        with torch.no_grad():
            reference_logits = models.reference(x)
        terms["reference"], weights = reference_term(
            objective.reference, out.student_logits, reference_logits, out.teacher_logits, y
        )
        total = total + terms["reference"]
        terms["ref_weight_mean"] = weights.mean()
        terms["ref_weight_sq_mean"] = weights.pow(2).mean()
    terms["loss"] = total
    return total, {k: v.detach() for k, v in terms.items()}


def train_epoch(
    models: StageModels,
    objective: StageObjective,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_step: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns the mean of every loss term."""
    models.train()
    sums: dict[str, Tensor] = {}
    steps = 0
    for batch in batches:
        x, y, index = unpack_batch(batch, device)
        total, terms = step_loss(models, objective, x, y, index)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for key, value in terms.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
        steps += 1
        if on_step is not None:
            on_step(terms)
    if steps == 0:
        raise UserError("the training data yielded no batches; is the dataset empty?")
    means = {key: (value / steps).item() for key, value in sums.items()}
    if "ref_weight_sq_mean" in means:
        variance = max(means.pop("ref_weight_sq_mean") - means["ref_weight_mean"] ** 2, 0.0)
        means["ref_weight_std"] = variance**0.5
    return means


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``batches``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    count = 0
    for batch in batches:
        x, y, _ = unpack_batch(batch, device)
        logits = model(x).float()
        correct += (logits.argmax(dim=1) == y).sum()
        loss += F.cross_entropy(logits, y, reduction="sum")
        count += len(y)
    model.train(was_training)
    if count == 0:
        raise UserError("the evaluation data yielded no batches; is the dataset empty?")
    return {"acc": 100.0 * correct.item() / count, "loss": loss.item() / count}
