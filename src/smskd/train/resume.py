"""Resuming a run: what its checkpoints hold, reading them back, refusing another run's.

    checkpoints/last.pt      the training state: student, the stage's helpers, optimizer,
                             schedule, loss scale, RNG states, and the point it was taken
                             (stage, epoch, step, the partly done epoch's metric sums)
    checkpoints/stage{k}.pt  the student as stage k left it: a run resumed midway through
                             stage k+1 rebuilds that stage's reference from it
    checkpoints/stage{k}-best.pt     the student at stage k's best validation epoch
                             (reference.snapshot: best)
    checkpoints/stage{k}-methods.pt  stage k's trained method helpers (the forgetting
                             measures of later stage ends read them)

The stage loop decides when to write them; this module decides what they hold. Each
``last.pt`` records its run's identity (seed, stage layout, config): a resume refuses a
checkpoint whose identity differs and names the first difference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smskd.config import CACHE_SETTINGS, Stage
from smskd.errors import UserError
from smskd.store.checkpoint import (
    atomic_save,
    has_checkpoint,
    load_latest,
    load_state_dict,
    misfit,
    rng_state,
    safe_load,
    set_rng_state,
)
from smskd.train.epoch import EpochProgress
from smskd.train.stage import BuiltStage

CHECKPOINT_FORMAT = 1  # the newest layout of last.pt this version reads and writes


@dataclass
class ResumePoint:
    """Where training starts: stage index ``stage``, after ``epoch`` of its epochs."""

    stage: int = 0
    epoch: int = 0
    global_step: int = 0  # steps done before this point (the trackers' x-axis)
    state: dict[str, Any] | None = None  # last.pt, when the stage is resumed midway
    # At a stage's start: the optimizer state the stage before ended with
    # (schedule_across_stages: continue carries the student's part on).
    previous_optimizer: dict[str, Any] | None = None

    def __str__(self) -> str:
        text = f"stage {self.stage + 1}, epoch {self.epoch + 1}"
        step = self.state.get("step") if self.state is not None else None
        return f"{text}, step {step + 1}" if step else text


class Checkpoints:
    """The ``checkpoints/`` folder of one run directory, for the run that ``seed``,
    ``stages`` and ``hparams`` describe."""

    def __init__(
        self, folder: Path, stages: Sequence[Stage], seed: int, hparams: Mapping[str, Any]
    ) -> None:
        self.folder = folder
        self.stages = list(stages)
        self.identity = _identity(seed, stages, hparams)
        self.snapshots: dict[int, str] = {}  # stage k → SHA-256 of stage{k}.pt, as written
        self.best_snapshots: dict[int, str] = {}  # stage k → SHA-256 of stage{k}-best.pt
        self.helper_snapshots: dict[int, str] = {}  # stage k → SHA-256 of stage{k}-methods.pt
        self.threads: int | None = None  # CPU threads of the run's first process

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def stage_end(self, stage: int) -> Path:
        """``stage{stage}.pt``, numbered from 1 as users read stages."""
        return self.folder / f"stage{stage}.pt"

    def stage_best(self, stage: int) -> Path:
        return self.folder / f"stage{stage}-best.pt"

    def stage_helpers(self, stage: int) -> Path:
        return self.folder / f"stage{stage}-methods.pt"

    def stage_end_weights(self, stage: int) -> dict[str, Tensor]:
        return load_state_dict(self.stage_end(stage), sha256=self.snapshots.get(stage))

    def save_helpers(self, stage: int, methods: Sequence[nn.Module]) -> None:
        """Stage ``stage``'s method helpers, if any method has state to keep."""
        states = [m.state_dict() for m in methods]
        if any(states):
            self.helper_snapshots[stage] = atomic_save(
                {"methods": states}, self.stage_helpers(stage)
            )

    def helpers(self, stage: int) -> list[dict[str, Any]] | None:
        """What :meth:`save_helpers` kept of stage ``stage``, or None."""
        path = self.stage_helpers(stage)
        if stage not in self.helper_snapshots or not path.is_file():
            return None
        return safe_load(path, sha256=self.helper_snapshots[stage])["methods"]

    def state(
        self,
        stage: int,
        epoch: int,
        progress: EpochProgress | None,
        global_step: int,
        student: nn.Module,
        built: BuiltStage,
        stage_best: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What ``last.pt`` holds after ``epoch`` completed epochs of stage index ``stage``
        (and ``progress`` of the next); ``stage_best``: the running stage's best-validation
        student (``reference.snapshot: best``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "snapshots": dict(self.snapshots),
            "best_snapshots": dict(self.best_snapshots),
            "helper_snapshots": dict(self.helper_snapshots),
            "num_stages": len(self.stages),
            "stage": stage,
            "epoch": epoch,
            "step": progress.steps if progress else 0,
            "global_step": global_step,
            "skipped": progress.skipped if progress else 0,
            "sums": {key: v.cpu() for key, v in progress.sums.items()} if progress else {},
            "student": student.state_dict(),
            "methods": [m.state_dict() for m in built.methods],
            "optimizer": built.optimizer.state_dict(),
            "scheduler": built.scheduler.state_dict(),
            "scaler": built.scaler.state_dict() if built.scaler is not None else None,
            "rng": rng_state(),
            "stage_best": stage_best,
            "threads": self.threads or torch.get_num_threads(),
        }

    def resume_point(
        self,
        student: nn.Module,
        steps_per_epoch: int | None,
        log: Callable[[str], None],
        on_cpu: bool = True,
    ) -> ResumePoint:
        """Load the newest checkpoint's student into ``student``; where to go on from.
        ``on_cpu``: the run trains on the CPU, where its thread count sets the last bits."""
        if not has_checkpoint(self.folder):
            return ResumePoint()
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies to the device.
        # A damaged last.pt (size or checksum) falls back to last.prev.pt, saying so.
        state, path = load_latest(self.folder, "cpu", log=log, check=self._check_ours)
        try:
            student.load_state_dict(state["student"])
        except RuntimeError as err:
            raise UserError(
                f"checkpoint {str(path)!r} does not fit this run's student "
                f"({misfit(err)}); resume the run it came from, or start over with --force"
            ) from None
        self.snapshots = dict(state.get("snapshots", {}))
        self.best_snapshots = dict(state.get("best_snapshots", {}))
        self.helper_snapshots = dict(state.get("helper_snapshots", {}))
        stage, epoch = state["stage"], state["epoch"]
        global_step = state.get("global_step")
        if global_step is None:  # written before checkpoints recorded it: count it
            epochs = sum(s.epochs for s in self.stages[:stage]) + epoch
            global_step = epochs * (steps_per_epoch or 0) + state.get("step", 0)
        if epoch >= self.stages[stage].epochs:  # that stage was complete
            point = ResumePoint(stage + 1, 0, global_step, previous_optimizer=state["optimizer"])
        else:
            point = ResumePoint(stage, epoch, global_step, state)
        self.threads = threads = state.get("threads")
        ours = torch.get_num_threads()
        if on_cpu and threads not in (None, ours) and point.stage < len(self.stages):
            # torch splits a float sum by thread: other splits, other last bits.
            log(
                f"note: {path} was written with {threads} CPU threads and this process has "
                f"{ours}; on the CPU the run goes on, not bit-identically to an uninterrupted "
                f"one (OMP_NUM_THREADS={threads} would make it so)"
            )
        return point

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


def restore_stage(state: Mapping[str, Any], built: BuiltStage) -> EpochProgress | None:
    """Put a mid-stage checkpoint into its rebuilt stage: helpers, optimizer, schedule,
    loss scale and RNG states; return the partly done epoch, if it stopped in one."""
    for method, method_state in zip(built.methods, state["methods"], strict=True):
        method.load_state_dict(method_state)
    built.optimizer.load_state_dict(state["optimizer"])
    built.scheduler.load_state_dict(state["scheduler"])
    if built.scaler is not None and state.get("scaler"):
        built.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if not state.get("step"):
        return None
    return EpochProgress(
        steps=state["step"],
        skipped=state.get("skipped", 0),
        sums={key: v.to(built.device) for key, v in state["sums"].items()},
        rng=state["rng"],
    )


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
    found = _first_change(_uncached(config), _uncached(json.loads(ours["config"])), "")
    if found is None:
        return None
    key, their_value, our_value = found
    return f"{key} is {_short(their_value)}; this run has {_short(our_value)}"


def _uncached(config: Any) -> Any:
    """A recorded config without the output cache's settings, which change how fast a
    run goes, not what it computes: a run resumes with them changed."""
    performance = config.get("performance") if isinstance(config, dict) else None
    if not isinstance(performance, dict):
        return config
    kept = {k: v for k, v in performance.items() if k not in CACHE_SETTINGS}
    return {**config, "performance": kept}


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
