"""Per-sample outputs of a frozen network, computed once and read by sample and view.

The teacher is frozen and in eval mode, so a training image always gives it the same
logits and features. Without augmentation an image is the same tensor every epoch;
with crop-and-flip augmentation it is one of a few dozen *views* (50 for padding 2
with flips, :attr:`~smskd.data.augment.Augment.views`). Either way the teacher's
outputs on every (sample, view) can be computed once and gathered by the batch's
sample indices and views, which takes the teacher's forward (most of a distillation
step when the teacher is ten times the student) out of every step.

Within one run that pays only without augmentation (one view, reused every epoch of
the stage). With augmentation there are more views than epochs, so the outputs are
kept in a directory (``performance.cache_dir``) and shared: every run with the same
teacher weights, training images, augmentation, normalization, precision and torch
version finds the same files (a folder named by a digest of all that), and several
processes fill them together: each view is claimed by one process (a lock, as run
directories have) and written atomically; the others take other views, then wait.
The files are data: loaded with ``weights_only``, checked against their checksums and
the shapes expected.

The frozen reference changes with every run: its outputs are cached in memory only,
and only without augmentation.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.models.taps import FeatureTaps, layout_of
from smskd.store import rundir
from smskd.store.checkpoint import atomic_save, atomic_write_text, safe_load
from smskd.store.runlock import LOCK_NAME, RunInUse, run_lock
from smskd.train.acceleration import Acceleration
from smskd.version import __version__

BATCH = 256  # per-sample outputs do not depend on the batch they were computed in
WAIT_SECONDS = 5.0  # between looks at views another process is computing
REMIND = 600.0  # seconds between two notes that views are still waited for
LOGITS = "logits"


@dataclass
class CachedOutputs:
    """``logits[i, v]`` and ``features[name][i, v]``: sample ``i``'s outputs as view ``v``
    (stored as the forward made them)."""

    logits: Tensor
    features: dict[str, Tensor]

    def take(self, index: Tensor, view: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        at = (index, 0) if view is None else (index, view)
        return self.logits[at], {name: value[at] for name, value in self.features.items()}

    @property
    def nbytes(self) -> int:
        tensors = [self.logits, *self.features.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def samples(self) -> int:
        return len(self.logits)

    @property
    def views(self) -> int:
        return self.logits.shape[1]

    disk_bytes = 0


@dataclass
class MappedOutputs:
    """Outputs too large for memory, read from their files as the steps need them:
    ``per_view[v][name]`` is sample-major and memory-mapped; a batch's rows are gathered
    on the CPU, view by view, and moved to ``device``."""

    per_view: list[dict[str, Tensor]]
    device: torch.device

    def take(self, index: Tensor, view: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        rows = index.cpu()
        views = view.cpu() if view is not None else torch.zeros_like(rows)
        present = views.unique().tolist()
        taken = {}
        for name, like in self.per_view[0].items():
            values = like.new_empty((len(rows), *like.shape[1:]))
            for v in present:
                at = views == v
                values[at] = self.per_view[v][name][rows[at]]
            # Asynchronous only where a copy from pageable memory is safe to be.
            taken[name] = values.to(self.device, non_blocking=self.device.type == "cuda")
        return taken.pop(LOGITS), taken

    nbytes = 0  # in memory: the page cache holds what it can

    @property
    def disk_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for o in self.per_view for t in o.values())

    @property
    def samples(self) -> int:
        return len(self.per_view[0][LOGITS])

    @property
    def views(self) -> int:
        return len(self.per_view)


FrozenOutputs = CachedOutputs | MappedOutputs


class FillStopped(Exception):
    """A stop was asked for while views were being computed (those written are kept)."""


def cache_outputs(
    model: nn.Module,
    taps: FeatureTaps | None,
    loader: object,
    acceleration: Acceleration,
    *,
    max_bytes: float,
    directory: Path | None = None,
    disk_bytes: float = 0.0,
    what: str = "teacher",
    log: Callable[[str], None] = print,
    stop: Callable[[], bool] = lambda: False,
) -> FrozenOutputs | None:
    """``model``'s outputs (no grad, eval mode) on every training sample of ``loader``
    as every view it can make of it, computed here or read from ``directory``.

    ``loader`` must offer ``every_sample(batch_size, view)``, ``views`` and ``labels``,
    as :class:`~smskd.data.memory.InMemoryLoader` does. Outputs that need more than
    ``max_bytes`` of memory are read from their files in ``directory`` as the steps need
    them (:class:`MappedOutputs`) if they fit ``disk_bytes``; otherwise None, said in
    ``log``: the network then runs every step. Raises :class:`FillStopped` between two
    views once ``stop()`` says so.
    """
    if getattr(loader, "every_sample", None) is None:
        raise UserError(
            "performance.cache_teacher needs an in-memory training set (smskd.data.memory."
            f"InMemoryLoader), not a {type(loader).__name__}; turn the cache off"
        )
    views: int = loader.views  # type: ignore[attr-defined]
    if views > 1 and directory is None:
        raise UserError(
            f"performance.cache_teacher: the training images are augmented ({views} views "
            "of each), more than a run has epochs; set performance.cache_dir so that the "
            "runs sharing this teacher compute them once, or turn the cache off"
        )
    model.eval()
    first = _forward(model, taps, acceleration, next(iter(loader.every_sample(2, 0))))  # type: ignore[attr-defined]
    total = len(loader.labels)  # type: ignore[attr-defined]
    per_sample = sum(t[0].numel() * t.element_size() for t in first.values()) * views
    size = per_sample * total
    mapped = size > max_bytes
    if mapped and (directory is None or size > disk_bytes):
        disk = f" and the {disk_bytes / 2**30:.2f} GiB of performance.cache_disk_gib"
        log(
            f"the {what}'s outputs for {total} samples × {views} views need "
            f"{size / 2**30:.2f} GiB, more than the {max_bytes / 2**30:.2f} GiB left of "
            f"performance.cache_max_gib{disk if directory is not None else ''}: the {what} "
            "runs every step of this stage"
        )
        return None
    if directory is None:
        outputs = [_view_outputs(model, taps, loader, 0, acceleration)]
    else:
        shared = SharedOutputs.open(directory, model, loader, acceleration)
        outputs = shared.fill(model, taps, loader, acceleration, first, what, log, stop, mapped)
    if mapped:
        return MappedOutputs(outputs, first[LOGITS].device)
    stacked = {name: torch.stack([o[name] for o in outputs], dim=1) for name in first}
    logits = stacked.pop(LOGITS)
    return CachedOutputs(logits, stacked)


def _forward(
    model: nn.Module, taps: FeatureTaps | None, acceleration: Acceleration, batch: Any
) -> dict[str, Tensor]:
    x, _ = batch
    with torch.no_grad(), acceleration.autocast():
        logits = model(acceleration.inputs(x))
    features = dict(taps.features) if taps is not None else {}
    return {LOGITS: logits, **features}


def _view_outputs(
    model: nn.Module,
    taps: FeatureTaps | None,
    loader: Any,
    view: int,
    acceleration: Acceleration,
    names: list[str] | None = None,
    extra: FeatureTaps | None = None,
) -> dict[str, Tensor]:
    """Every sample's outputs as view ``view`` (those in ``names``; all by default),
    and the features ``extra`` taps."""
    parts: dict[str, list[Tensor]] = {}
    for batch in loader.every_sample(BATCH, view):
        outputs = _forward(model, taps, acceleration, batch)
        if extra is not None:
            outputs.update(extra.features)
        for name, value in outputs.items():
            if names is None or name in names or (extra is not None and name in extra.taps):
                parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


@dataclass(frozen=True)
class SharedOutputs:
    """One teacher's outputs on one training set, a file per view and output, in
    ``DIR/KEY/view-VVV/NAME.pt``; ``DIR/KEY/about.json`` says what ``KEY`` stands for."""

    folder: Path
    views: int

    @classmethod
    def open(
        cls, directory: Path, model: nn.Module, loader: Any, acceleration: Acceleration
    ) -> SharedOutputs:
        claim_cache_dir(directory)
        about = _describe(model, loader, acceleration)
        key = hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:16]
        folder = directory / key
        folder.mkdir(exist_ok=True)
        if not (folder / "about.json").exists():
            atomic_write_text(folder / "about.json", json.dumps(about, indent=1) + "\n")
        return cls(folder, loader.views)

    def path(self, view: int, name: str) -> Path:
        return self.view_folder(view) / (re.sub(r"[^\w.-]", "_", name) + ".pt")

    def view_folder(self, view: int) -> Path:
        return self.folder / f"view-{view:03d}"

    def fill(
        self,
        model: nn.Module,
        taps: FeatureTaps | None,
        loader: Any,
        acceleration: Acceleration,
        like: dict[str, Tensor],
        what: str,
        log: Callable[[str], None],
        stop: Callable[[], bool],
        mapped: bool = False,
    ) -> list[dict[str, Tensor]]:
        """Every view's outputs named in ``like``: each missing one computed by whichever
        process locks its view first, those another process holds waited for."""
        self._check_space(like, loader)
        pending, waiting_since = list(range(self.views)), None
        while pending:
            held = []
            for view in pending:
                missing = self._missing(view, like)
                if not missing:
                    continue
                if stop():
                    raise FillStopped
                try:
                    with run_lock(self.view_folder(view), log=log):
                        self._compute(model, taps, loader, acceleration, view, like, what, log)
                except RunInUse:
                    held.append(view)
            if held and (waiting_since is None or time.monotonic() - waiting_since > REMIND):
                # Again every REMIND seconds: a lock whose owner hangs is never taken over.
                log(
                    f"waiting for {len(held)} views of the {what}'s outputs that another "
                    f"process computes into {self.folder} (locks: "
                    f"{self.view_folder(held[0]) / LOCK_NAME}, ...)"
                )
                waiting_since = time.monotonic()
            if held:
                if stop():
                    raise FillStopped
                time.sleep(WAIT_SECONDS)
            pending = held
        return [
            {name: self._load(view, name, like[name], mapped) for name in like}
            for view in range(self.views)
        ]

    def _check_space(self, like: dict[str, Tensor], loader: Any) -> None:
        """Refuse in one line, before computing, outputs the disk has no room for."""
        per_sample = {name: t[0].numel() * t.element_size() for name, t in like.items()}
        needed = len(loader.labels) * sum(
            per_sample[name] for view in range(self.views) for name in self._missing(view, like)
        )
        free = shutil.disk_usage(self.folder).free
        if needed > free:
            raise UserError(
                f"performance.cache_dir: the teacher's outputs need {needed / 2**30:.1f} GiB "
                f"more in {self.folder}, and its disk has {free / 2**30:.1f} GiB free; free "
                "space there, choose another cache_dir, or lower performance.cache_disk_gib"
            )

    def _missing(self, view: int, like: dict[str, Tensor]) -> list[str]:
        return [name for name in like if not self.path(view, name).is_file()]

    def _compute(
        self,
        model: nn.Module,
        taps: FeatureTaps | None,
        loader: Any,
        acceleration: Acceleration,
        view: int,
        like: dict[str, Tensor],
        what: str,
        log: Callable[[str], None],
    ) -> None:
        missing = self._missing(view, like)  # again: another process may have just written it
        if not missing:
            return
        started = time.perf_counter()
        # The same forward keeps the teacher's embedding too, which relation methods and
        # an anchored reference read: a run's later stages then need no second pass.
        embedding = layout_of(model).embedding
        wanted = [embedding] if embedding and not self.path(view, embedding).is_file() else []
        with FeatureTaps(model, [t for t in wanted if t not in like], what) as extra:
            outputs = _view_outputs(model, taps, loader, view, acceleration, missing, extra)
        for name, value in outputs.items():
            atomic_save(value, self.path(view, name))
        log(
            f"computed the {what}'s {', '.join(outputs)} on view {view + 1} of {self.views} "
            f"in {time.perf_counter() - started:.1f}s ({self.folder})"
        )

    def _load(self, view: int, name: str, like: Tensor, mapped: bool) -> Tensor:
        path = self.path(view, name)
        # In memory where the training runs, or memory-mapped (on the CPU).
        value = safe_load(path, map_location=like.device, mmap=mapped)
        if (
            not isinstance(value, Tensor)
            or value.dtype != like.dtype
            or tuple(value.shape[1:]) != tuple(like.shape[1:])
        ):
            raise UserError(
                f"{path} does not hold the {name} outputs this teacher gives "
                f"({like.dtype}, {tuple(like.shape[1:])} a sample); delete {self.folder}"
            )
        return value


def claim_cache_dir(directory: Path, *, write: bool = True) -> None:
    """``directory`` as smskd's teacher-output folder, or one line saying why not: never
    into someone else's folder (``write`` False: only the checks, before a run trains)."""
    try:
        rundir.claim(directory, rundir.TEACHER_OUTPUTS, write=write)
    except UserError as err:
        raise UserError(
            f"performance.cache_dir: {str(err).replace('--out', 'performance.cache_dir')}"
        ) from None


def _describe(model: nn.Module, loader: Any, acceleration: Acceleration) -> dict[str, Any]:
    """Everything the outputs depend on: the folder's key is a digest of it."""
    weights = hashlib.sha256(repr(model).encode())  # the architecture, then its weights
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    images = hashlib.sha256(loader.images.cpu().contiguous().numpy().tobytes())
    normalize = loader.normalize
    device = acceleration.device_type
    if device == "cuda":  # another GPU model may round differently
        device = f"cuda ({torch.cuda.get_device_name()})"
    return {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights_sha256": weights.hexdigest(),
        "images_sha256": images.hexdigest(),
        "images": len(loader.labels),
        "augment": repr(loader.augment),
        "views": loader.views,
        "normalize": [normalize.shift.flatten().tolist(), normalize.scale.flatten().tolist()]
        if hasattr(normalize, "shift")
        else type(normalize).__name__,
        "device": device,
        "smskd": __version__,
        "precision": acceleration.precision,
        "channels_last": acceleration.channels_last,
        "torch": torch.__version__,
    }
