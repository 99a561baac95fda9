"""What the benchmarks share: model pairs, stage set-ups, interleaved timing, JSON out.

Every figure is a ratio of two paths measured side by side in one process: the
repeats alternate between the paths, so load from elsewhere hits both alike, and
the median of the repeats is reported (the raw times are saved as well).
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smskd.config import PerformanceConfig, Stage
from smskd.models.registry import build_model
from smskd.train.acceleration import Acceleration
from smskd.train.epoch import train_epoch
from smskd.train.output_cache import cache_outputs
from smskd.train.reference import make_reference
from smskd.train.stage import BuiltStage, build_stage

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Pair:
    """A teacher → student pair and the inputs it is benchmarked on."""

    name: str
    teacher: str
    student: str
    shape: tuple[int, int, int]
    num_classes: int


PAIRS = {
    "cifar": Pair("cifar", "resnet32x4", "resnet8x4", (3, 32, 32), 100),
    "fashion-mnist": Pair("fashion-mnist", "resnet20", "convnet-xs", (1, 28, 28), 10),
}


def models_of(pair: Pair, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Student and a frozen teacher (random weights: speed does not depend on them)."""
    torch.manual_seed(seed)
    channels = pair.shape[0]
    teacher = build_model(pair.teacher, pair.num_classes, channels, {})
    student = build_model(pair.student, pair.num_classes, channels, {})
    return student, teacher.eval().requires_grad_(False)


def random_batches(
    pair: Pair, batch: int, steps: int, device: torch.device, seed: int = 0
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Ready-made ``(x, y, index)`` batches already on ``device``: the input pipeline
    is not part of a step's time."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        x = torch.randn(batch, *pair.shape, generator=generator)
        y = torch.randint(0, pair.num_classes, (batch,), generator=generator)
        index = torch.arange(step * batch, (step + 1) * batch)
        batches.append((x.to(device), y.to(device), index.to(device)))
    return batches


def fill_teacher_cache(
    step: BuiltStage,
    loader: object,
    directory: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """The teacher's outputs on every view of ``loader``'s images, held by ``step`` (in
    memory, or written to and read from ``directory``), as a run's stage start fills them."""
    step.models.teacher_cache = cache_outputs(
        step.models.teacher,
        step.models.teacher_taps,
        loader,
        step.models.acceleration,
        max_bytes=2**30,
        directory=directory,
        log=log,
    )


def stage_step(
    student: nn.Module,
    teacher: nn.Module | None,
    methods: list[str],
    batches: list,
    device: torch.device,
    *,
    reference: bool = False,
    performance: PerformanceConfig | None = None,
) -> BuiltStage:
    """A stage as :func:`smskd.train.stages.run_stages` builds it; ``reference`` adds the
    frozen reference model of stage k ≥ 2 (a copy of ``student``). Close it when done."""
    acceleration = Acceleration.of(performance, device)
    student = acceleration.prepare(copy.deepcopy(student).to(device))
    if teacher is not None:
        teacher = acceleration.prepare(copy.deepcopy(teacher).to(device))
    ref_model = make_reference(student) if reference else None
    stage = Stage(methods=methods, epochs=1, optimizer={"lr": 0.01})
    built = build_stage(
        stage, student, teacher, ref_model, batches[0], device, acceleration=acceleration
    )
    built.models.compile()
    return built


def time_steps(step: BuiltStage, batches: list) -> float:
    """Seconds per training step over ``batches``, through :func:`smskd.train.epoch.train_epoch`
    (the library's own loop; it reads the losses back once, at the end)."""
    sync(step.device)
    started = time.perf_counter()
    train_epoch(
        step.models, step.objective, batches, step.optimizer, step.device, scaler=step.scaler
    )
    sync(step.device)
    return (time.perf_counter() - started) / len(batches)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(paths: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each path's measurements, ``repeats`` rounds of one measurement per path."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, measure in paths.items():
            times[name].append(measure())
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times), "min": min(times), "all": times}


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def common_arguments(parser: Any, default_out: Path) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer steps (the CI-sized run)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per path (median kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))


def over_pairs(
    args: Any, measure: Callable[..., dict[str, Any]], benchmark: str, definition: str, target: str
) -> dict[str, Any]:
    """``measure(pair, quick, repeats, device)`` for each of ``args.pairs``; the headline
    ratio is the worst pair's (the largest: every per-pair target is an upper bound)."""
    apply_threads(args.threads)
    device = torch.device(args.device)
    pairs = {n: measure(PAIRS[n], args.quick, args.repeats, device) for n in args.pairs}
    return {
        "benchmark": benchmark,
        "definition": definition,
        "target": target,
        "ratio": max(p["ratio"] for p in pairs.values()),
        "quick": args.quick,
        "repeats": args.repeats,
        "pairs": pairs,
        "environment": environment(device),
    }


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
