"""One training epoch and one evaluation pass; the loss of one SMSKD step.

Everything here works per batch and knows nothing of stages or configs. Losses
are accumulated on the device and read back once per epoch, so the loop makes
no host synchronization per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.config import ReferenceConfig
from smskd.data.text import IGNORE_INDEX
from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs
from smskd.models.taps import FeatureTaps
from smskd.store.checkpoint import set_rng_state
from smskd.train import distributed
from smskd.train.acceleration import Acceleration, as_float
from smskd.train.distributed import all_reduce_sum
from smskd.train.output_cache import FrozenOutputs, cache_outputs
from smskd.train.reference import reference_term, weight_histogram

MAX_LOG_PERPLEXITY = 700.0  # exp() of more overflows a float; such a model is broken anyway


@dataclass
class StageObjective:
    """``ce_weight·CE + Σ β_m·L_m + mean_i(w_i·L_ref,i)`` — what one stage minimizes."""

    ce_weight: float
    methods: list[tuple[DistillMethod, float]]
    reference: ReferenceConfig
    embedding_tap: str | None = None  # anchored by the reference too (anchor: logits+embedding)


@dataclass
class StageModels:
    """The networks of one stage and how they run. Teacher and reference are frozen
    and in eval mode; their outputs may come from a cache instead of a forward."""

    student: nn.Module
    teacher: nn.Module | None = None
    reference: nn.Module | None = None
    student_taps: FeatureTaps | None = None
    teacher_taps: FeatureTaps | None = None
    reference_taps: FeatureTaps | None = None
    trainable: list[nn.Module] = field(default_factory=list)
    acceleration: Acceleration = field(default_factory=Acceleration)
    teacher_cache: FrozenOutputs | None = None
    reference_cache: FrozenOutputs | None = None

    def train(self) -> None:
        self.student.train()
        for module in self.trainable:
            module.train()
        # Frozen networks stay in eval mode: BN statistics and dropout must not move.
        for frozen in (self.teacher, self.reference):
            if frozen is not None:
                frozen.eval()

    def cache_frozen_outputs(
        self,
        loader: object,
        max_bytes: float,
        directory: Path | None = None,
        disk_bytes: float = 0.0,
        log: Callable[[str], None] = print,
        stop: Callable[[], bool] = lambda: False,
    ) -> list[FrozenOutputs]:
        """Fill the teacher's cache (outputs at the stage's taps; shared through
        ``directory``) and, without augmentation, the reference's (logits, and its
        anchored embedding), within ``max_bytes`` together; return the caches filled.
        A network whose outputs would not fit keeps running every step (``log`` says so)."""
        budget = max_bytes
        if self.teacher is not None:
            self.teacher_cache = cache_outputs(
                self.teacher,
                self.teacher_taps,
                loader,
                self.acceleration,
                max_bytes=budget,
                directory=directory,
                disk_bytes=disk_bytes,
                log=log,
                stop=stop,
            )
            budget -= self.teacher_cache.nbytes if self.teacher_cache is not None else 0
        if self.reference is not None and getattr(loader, "views", 1) == 1:
            self.reference_cache = cache_outputs(
                self.reference,
                self.reference_taps,
                loader,
                self.acceleration,
                max_bytes=budget,
                what="reference",
                log=log,
            )
        return [c for c in (self.teacher_cache, self.reference_cache) if c is not None]

    def compile(self) -> None:
        """``torch.compile`` what runs a forward, if the acceleration asks for it: the
        student, and teacher and reference unless their outputs come from a cache. Only
        once the taps exist: compiled hooks are traced, later ones never fire."""
        self.student = self.acceleration.compiled(self.student)
        if self.teacher_cache is None:
            self.teacher = self.acceleration.compiled(self.teacher)
        if self.reference_cache is None:
            self.reference = self.acceleration.compiled(self.reference)


def unpack_batch(
    batch: object, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Accept ``(x, y)`` or ``(x, y, index)`` as any DataLoader yields them, and
    ``(x, y, index, view)`` as an augmented :class:`~smskd.data.memory.InMemoryLoader`
    does (which view of each sample ``x`` holds: what a cache of outputs is read by)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3, 4):
        raise UserError(
            "each batch must be (inputs, labels) or (inputs, labels, sample_index); "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    x = batch[0].to(device, non_blocking=True)
    y = batch[1].to(device, non_blocking=True)
    index = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
    view = batch[3].to(device, non_blocking=True) if len(batch) > 3 else None
    return x, y, index, view


def forward_outputs(
    models: StageModels, x: Tensor, y: Tensor, index: Tensor | None, view: Tensor | None = None
) -> Outputs:
    """Run teacher (or read its cache), then student; outputs in fp32 for the losses."""
    acceleration = models.acceleration
    x = acceleration.inputs(x)
    with acceleration.autocast():
        teacher_logits, teacher_features = frozen_outputs(
            models.teacher, models.teacher_taps, models.teacher_cache, x, index, view
        )
        student_logits = models.student(x)
    student_features = dict(models.student_taps.features) if models.student_taps else {}
    token_mask = sequence_mask(y)
    return Outputs(
        student_logits=as_float(in_loss(student_logits, token_mask)),
        teacher_logits=as_float(in_loss(teacher_logits, token_mask)),  # type: ignore[arg-type]
        labels=in_loss(y, token_mask),
        student_features={k: as_float(v) for k, v in student_features.items()},
        teacher_features={k: as_float(v) for k, v in teacher_features.items()},
        index=index,
        token_mask=token_mask,
    )


def sequence_mask(labels: Tensor) -> Tensor | None:
    """For a batch of sequences (labels ``[B, T]``), the positions inside the losses
    (label ≠ ``IGNORE_INDEX``: padding is out of every loss and every mean); None for
    one label per sample."""
    return labels != IGNORE_INDEX if labels.dim() > 1 else None


def in_loss(value: Tensor | None, token_mask: Tensor | None) -> Tensor | None:
    """``value`` at the tokens inside the losses (``[B, T, ...]`` → ``[N, ...]``): each
    token is then a sample to every per-sample loss, the reference's and TCP's too."""
    if value is None or token_mask is None:
        return value
    return value[token_mask]


def frozen_outputs(
    model: nn.Module | None,
    taps: FeatureTaps | None,
    cache: FrozenOutputs | None,
    x: Tensor,
    index: Tensor | None,
    view: Tensor | None = None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Logits and tapped features of a frozen network: from ``cache`` by sample index
    and view, or from a forward under ``inference_mode`` (no autograd bookkeeping)."""
    if cache is not None and index is not None:
        return cache.take(index, view)
    if model is None:
        return None, {}
    with torch.inference_mode():
        logits = model(x)
        features = dict(taps.features) if taps is not None else {}
    # Inference tensors cannot be saved for backward, which a loss like s·t needs;
    # a copy made outside inference mode is an ordinary tensor (and costs little).
    return logits.clone(), {name: value.clone() for name, value in features.items()}


def step_loss(
    models: StageModels,
    objective: StageObjective,
    x: Tensor,
    y: Tensor,
    index: Tensor | None,
    view: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The stage's total loss for one batch and its detached terms (for logging)."""
    acceleration = models.acceleration
    x = acceleration.inputs(x)  # once: forward_outputs' own call is then free
    out = forward_outputs(models, x, y, index, view)
    terms: dict[str, Tensor] = {}
    total = out.student_logits.new_zeros((), dtype=torch.float32)
    if objective.ce_weight:
        terms["ce"] = F.cross_entropy(out.student_logits.float(), out.labels)
        total = total + objective.ce_weight * terms["ce"]
    for method, weight in objective.methods:
        value = method.loss(out)
        value = value.mean() if value.dim() else value
        terms[method.name] = value
        total = total + weight * value
    if models.reference is not None:
        with acceleration.autocast():
            reference_logits, reference_features = frozen_outputs(
                models.reference, models.reference_taps, models.reference_cache, x, index, view
            )
        embeddings = None
        if objective.embedding_tap is not None:
            tap = objective.embedding_tap
            embeddings = (
                in_loss(out.student_features[tap], out.token_mask),
                in_loss(as_float(reference_features[tap]), out.token_mask),
            )
        terms["reference"], weights = reference_term(
            objective.reference,
            out.student_logits,
            in_loss(reference_logits, out.token_mask),  # type: ignore[arg-type]
            out.teacher_logits,
            out.labels,
            embeddings,  # type: ignore[arg-type]
        )
        total = total + terms["reference"]
        terms["ref_weight_mean"] = weights.mean()
        terms["ref_weight_sq_mean"] = weights.pow(2).mean()
        terms["ref_weight_hist"] = weight_histogram(weights, objective.reference.lam)
    terms["loss"] = total
    # Running accuracy on the training batches as they were trained on (augmented,
    # train-mode BN): the usual "train acc" of a training log, at no extra forward.
    terms["acc"] = (out.student_logits.argmax(dim=1) == out.labels).float().mean() * 100
    return total, {k: v.detach() for k, v in terms.items()}


def token_share(labels: Tensor) -> Tensor | None:
    """Under DDP, for sequences: this rank's share of the step's tokens times the number
    of ranks. DDP averages the ranks' gradients, and each rank's loss is a mean over its
    own tokens, which padding makes unequal; weighed by its share, the step is that of
    the mean over every rank's tokens, as one process with the global batch takes it.
    None in one process and for one label per sample (equal counts)."""
    if labels.dim() < 2 or not distributed.current().enabled:
        return None
    tokens = (labels != IGNORE_INDEX).sum().float()
    every_rank = all_reduce_sum(tokens.clone()).clamp_min(1.0)
    return tokens * distributed.current().world_size / every_rank


@dataclass
class EpochProgress:
    """A partly done epoch: enough to resume it exactly, metrics included."""

    steps: int = 0  # batches consumed, skipped ones included
    skipped: int = 0  # batches whose loss was not finite (nonfinite="skip")
    sums: dict[str, Tensor] = field(default_factory=dict)
    first_nonfinite: int | None = None  # step of the first non-finite loss ("stop")
    rng: dict[str, Any] | None = None  # RNG states to restore once the batches are drawn
    _bad_step: Tensor | None = None  # the same, still on the device

    def nonfinite_step(self) -> int | None:
        """The first non-finite step, if any (one host sync: call it rarely)."""
        if self.first_nonfinite is None and self._bad_step is not None:
            step = int(self._bad_step.item())
            self.first_nonfinite = step if step >= 0 else None
        return self.first_nonfinite


class NonFiniteLoss(Exception):
    """The loss became NaN/Inf at ``step`` (1-based within the epoch)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the loss became non-finite at step {step}")
        self.step = step


def train_epoch(
    models: StageModels,
    objective: StageObjective,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_step: Callable[[dict[str, Tensor]], None] | None = None,
    *,
    progress: EpochProgress | None = None,
    after_step: Callable[[EpochProgress], None] | None = None,
    nonfinite: str = "stop",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """One pass over ``batches``; returns the mean of every loss term.

    ``progress`` resumes a partly done epoch: its first ``progress.steps`` batches are
    drawn and discarded (the loader's order is fixed per epoch) and its sums carried.
    ``nonfinite="stop"`` notes a NaN/Inf loss on the device without a per-step sync
    and raises :class:`NonFiniteLoss` at the end of the epoch (or when
    ``after_step`` asks); ``"skip"`` leaves such a batch out of the update, at the
    price of one host sync per step. ``scaler`` scales the loss for fp16 training.
    """
    models.train()
    progress = progress or EpochProgress()
    already_done = progress.steps
    iterator = iter(batches)
    if progress.rng is not None:
        # After iter(): a DataLoader draws its base seed from the global RNG there, so
        # the state saved mid-epoch (after that draw) must be restored after it too.
        set_rng_state(progress.rng)
        progress.rng = None
    for position, batch in enumerate(iterator):
        if position < already_done:
            continue
        x, y, index, view = unpack_batch(batch, device)
        total, terms = step_loss(models, objective, x, y, index, view)
        share = token_share(y)
        loss = total if share is None else total * share
        progress.steps += 1
        finite = torch.isfinite(total)
        # Decided by every rank together: a rank that skipped alone would miss the
        # others' gradient all-reduce and fall out of step with them.
        if nonfinite == "skip" and distributed.any_rank(not finite.item(), total.device):
            progress.skipped += 1
        else:
            if nonfinite != "skip" and progress.first_nonfinite is None:
                step = torch.tensor(progress.steps, device=total.device)
                earlier = progress._bad_step
                if earlier is None:
                    earlier = torch.tensor(-1, device=total.device)
                progress._bad_step = torch.where(~finite & (earlier < 0), step, earlier)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # skips the step (and lowers the scale) when a gradient overflowed
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            for key, value in terms.items():
                if share is not None:  # logged as the mean over every rank's tokens, too
                    value = value * share
                progress.sums[key] = progress.sums[key] + value if key in progress.sums else value
        if on_step is not None:
            on_step(terms)
        if after_step is not None:
            after_step(progress)
    if progress.steps == 0:
        raise UserError("the training data yielded no batches; is the dataset empty?")
    if (step := progress.nonfinite_step()) is not None:
        raise NonFiniteLoss(step)
    counted = progress.steps - progress.skipped
    if counted == 0:
        raise NonFiniteLoss(1)  # every batch of the epoch was skipped
    means: dict[str, Any] = {}
    keys = sorted(progress.sums)  # the same on every rank: same methods, same terms
    if keys:
        # One all-reduce for every term; vector terms (the weight histogram) are flattened.
        parts = [progress.sums[key].float().reshape(-1) for key in keys]
        packed = torch.cat([*parts, parts[0].new_tensor([counted])])
        reduced = all_reduce_sum(packed)
        counted_all = reduced[-1].item()
        for key, part in zip(keys, reduced[:-1].split([len(p) for p in parts]), strict=True):
            mean = (part / counted_all).tolist()
            means[key] = mean if progress.sums[key].dim() else mean[0]
    if "ref_weight_sq_mean" in means:
        variance = max(means.pop("ref_weight_sq_mean") - means["ref_weight_mean"] ** 2, 0.0)
        means["ref_weight_std"] = variance**0.5
    if nonfinite == "skip":
        means["skipped_batches"] = progress.skipped
    return means


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    acceleration: Acceleration | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``batches`` (summed over ranks
    under DDP, where each rank evaluates its own shard), in the training's precision.
    For sequences both are per token (padding left out) and ``ppl``, the perplexity
    ``exp(loss)``, is added, and ``bpc``, bits per character, when ``batches`` says
    how many characters the split's text has (``batches.characters``)."""
    acceleration = acceleration or Acceleration(device.type)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss, count
    sequences = False
    for batch in batches:
        x, y, _, _ = unpack_batch(batch, device)
        with acceleration.autocast():
            logits = model(acceleration.inputs(x))
        token_mask = sequence_mask(y)
        sequences = token_mask is not None
        logits, y = in_loss(logits.float(), token_mask), in_loss(y, token_mask)
        totals[0] += (logits.argmax(dim=1) == y).sum()
        totals[1] += F.cross_entropy(logits, y, reduction="sum")
        totals[2] += len(y)
    model.train(was_training)
    correct, loss, count = all_reduce_sum(totals).tolist()
    if count == 0:
        raise UserError("the evaluation data yielded no batches; is the dataset empty?")
    scores = {"acc": 100.0 * correct / count, "loss": loss / count}
    if sequences:
        scores["ppl"] = math.exp(min(scores["loss"], MAX_LOG_PERPLEXITY))
        characters = getattr(batches, "characters", None)
        if characters:  # the text the split's tokens spell: a tokenizer-free measure
            scores["bpc"] = loss / characters / math.log(2)
    return scores
