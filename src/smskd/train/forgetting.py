"""Forgetting, measured: at each stage end, what the student still holds of every
stage's knowledge, on a fixed probe set of validation images.

SMSKD's premise is that a later stage overwrites what an earlier one taught and that
the frozen reference prevents it. Row ``k`` of the matrix describes the student ``S_k``
that stage ``k`` left, on the probe:

    loss:<method>       the method's own loss of S_k against the teacher (lower: closer),
                        for every method anywhere in the run, with the options of the
                        stage that uses it. A method with trained helpers (FitNets'
                        regressor) is measured with those its own stage trained, so from
                        that stage on; before it the cell is empty. A method used by
                        several stages has a column per stage, loss:<method>@<stage>, so
                        that a column means one loss all the way down.
    teacher_agreement   % of probe images where S_k's argmax is the teacher's
    probe_acc           S_k's accuracy on the probe's labels
    kl_to_stage<j>      mean_i KL(softmax(S_j) ‖ softmax(S_k)) for each earlier stage end j

Reading down a ``loss:`` column from the method's own stage shows how much of it the
later stages took away. Methods that key on training-sample indices (CRD's memory
bank) are not measured: a probe image has no training index.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.config import Stage
from smskd.methods.registry import METHODS
from smskd.train.epoch import forward_outputs, in_loss, sequence_mask, unpack_batch
from smskd.train.stage import build_stage


@dataclass
class ForgettingProbe:
    """The stage × measure matrix of one run, a row per finished stage.

    ``stage_end`` and ``helpers``, if given, read a finished stage's student weights and
    its methods' helper states back (a resumed run no longer holds them in memory).
    """

    batches: Iterable
    stages: list[Stage]
    teacher: nn.Module | None
    device: torch.device
    stage_end: Callable[[int], dict[str, Tensor]] | None = None
    helpers: Callable[[int], list[dict[str, Any]] | None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    _logits: dict[int, Tensor] = field(default_factory=dict)  # stage number → probe logits
    _trained: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def finished(self, number: int, student: nn.Module, methods: list[nn.Module]) -> dict:
        """Measure the student stage ``number`` (from 1) left, whose stage trained
        ``methods``; return the row, which is also appended to :attr:`rows`."""
        if methods:  # else (a resumed run) ``helpers`` reads them back
            self._trained[number] = [m.state_dict() for m in methods]
        # Building probe helpers draws random numbers: training must not see that.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            was_training = student.training
            student.eval()
            try:
                measures = self._measure(number, student)
            finally:
                student.train(was_training)
        stage = self.stages[number - 1]
        row = {
            "stage": number,
            "label": stage.label,
            "methods": [spec.name for spec in stage.methods],
            "measures": measures,
        }
        self.rows = [r for r in self.rows if r["stage"] < number] + [row]
        return row

    def _measure(self, number: int, student: nn.Module) -> dict[str, float | None]:
        logits, labels, teacher_logits = self._forward(student)
        self._logits[number] = logits
        measures: dict[str, float | None] = {
            "probe_acc": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
        }
        if teacher_logits is not None:
            agree = logits.argmax(1) == teacher_logits.argmax(1)
            measures["teacher_agreement"] = 100.0 * agree.float().mean().item()
        measures.update(self._method_losses(number, student))
        for earlier in range(1, number):
            before = self._earlier_logits(earlier, student)
            kl = F.kl_div(
                F.log_softmax(logits, 1),
                F.log_softmax(before, 1),
                log_target=True,
                reduction="none",
            ).sum(1)
            measures[f"kl_to_stage{earlier}"] = kl.mean().item()
        return measures

    @torch.no_grad()
    def _forward(self, student: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
        outputs, labels, teacher = [], [], []
        for batch in self.batches:
            x, y, _, _ = unpack_batch(batch, self.device)
            token_mask = sequence_mask(y)  # sequences: every token is a probe sample
            outputs.append(in_loss(student(x).float(), token_mask))
            labels.append(in_loss(y, token_mask))
            if self.teacher is not None:
                teacher.append(in_loss(self.teacher(x).float(), token_mask))
        return torch.cat(outputs), torch.cat(labels), torch.cat(teacher) if teacher else None

    def _earlier_logits(self, number: int, student: nn.Module) -> Tensor:
        if number not in self._logits:
            assert self.stage_end is not None, "a stage end neither measured nor saved"
            earlier = copy.deepcopy(student)
            earlier.load_state_dict(self.stage_end(number))
            self._logits[number] = self._forward(earlier.eval())[0]
        return self._logits[number]

    def _method_losses(self, number: int, student: nn.Module) -> dict[str, float | None]:
        """Each stage's methods, measured with that stage's options (and its helpers as
        trained, once it has run)."""
        uses = Counter(spec.name for stage in self.stages for spec in stage.methods)
        losses: dict[str, float | None] = {}
        for k, stage in enumerate(self.stages, 1):
            names = [spec.name for spec in stage.methods]
            measured = self._stage_losses(k, names, trained=k <= number, student=student)
            for name in names:
                losses[f"loss:{name}" if uses[name] == 1 else f"loss:{name}@{k}"] = measured[name]
        return losses

    def _stage_losses(
        self, k: int, names: list[str], trained: bool, student: nn.Module
    ) -> dict[str, float | None]:
        stage = self.stages[k - 1]
        # A method keyed on training-sample indices is not measured (and not built: its
        # memory bank needs the training set's size).
        # Helper states are saved for every method of the stage, kept or not.
        saved_at = [i for i, spec in enumerate(stage.methods) if not METHODS[spec.name].needs_index]
        kept = [stage.methods[i] for i in saved_at]
        if not kept:
            return dict.fromkeys(names)
        stage = stage.model_copy(update={"methods": kept})
        probe = next(iter(self.batches))
        with build_stage(stage, student, self.teacher, None, probe, self.device) as built:
            states = self._trained.get(k) if trained else None
            if trained and states is None and self.helpers is not None:
                states = self.helpers(k)
            usable: dict[str, Any] = {}
            for method in built.methods:
                if method.name not in names:
                    continue
                has_helpers = any(True for _ in method.parameters()) or any(
                    True for _ in method.buffers()
                )
                if has_helpers:
                    if states is None:
                        continue  # helpers not trained yet (or not saved): no honest value
                    method.load_state_dict(states[saved_at[built.methods.index(method)]])
                method.start_epoch(stage.epochs - 1, stage.epochs)
                usable[method.name] = method.eval()
            sums = dict.fromkeys(usable, 0.0)
            count = 0
            with torch.no_grad():
                for batch in self.batches:
                    x, y, index, _ = unpack_batch(batch, self.device)
                    out = forward_outputs(built.models, x, y, index)
                    # Images: equal batches, a mean of batch means. Sequences: batches
                    # hold different numbers of tokens, so every token weighs the same.
                    weight = 1 if out.token_mask is None else len(out.labels)
                    for name, method in usable.items():
                        sums[name] += method.loss(out).mean().item() * weight
                    count += weight
        return {name: (sums[name] / count if name in usable else None) for name in names}
