"""The study's KD epoch in fp32 / in bf16 autocast with channels-last, teacher outputs cached.

The SMSKD study (``configs/study/fashion-mnist.yaml``) reads the teacher's outputs from the
shared cache, so a step is the resnet8 student's forward and backward; on a CPU with
bf16 matrix units (AMX) autocast and channels-last make that step cheaper. This measures,
on the study's pair (random weights: speed does not depend on them), Fashion-MNIST images
with crop 2 + flip, one augmented KD epoch each way, interleaved: the ratio fp32 / bf16.
Not part of ``run_all``: each precision fills its own 50-view cache first.

    python benchmarks/study_precision.py            # 2048 training images, 3 repeats
    python benchmarks/study_precision.py --quick    # 512 images
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from augmented_cache import AUGMENT, PAIR
from epoch_speedup import fashion_mnist, ours
from harness import (
    RESULTS,
    apply_threads,
    common_arguments,
    environment,
    fill_teacher_cache,
    interleaved,
    models_of,
    stage_step,
    summary,
    write_json,
)

from smskd.config import PerformanceConfig
from smskd.data.memory import InMemoryLoader

SETTINGS = {
    "fp32": PerformanceConfig(),
    "bf16_channels_last": PerformanceConfig(precision="bf16", channels_last=True),
}
TARGET = 1.5


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "study_precision.json")
    parser.add_argument("--images", type=int, default=None, help="default 2048 (512 quick)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    data, source = fashion_mnist(args.images or (512 if args.quick else 2048))
    n = len(data.train)
    student, teacher = models_of(PAIR)
    loader = InMemoryLoader(
        data.train, data, args.batch, shuffle=True, drop_last=True, device=device, augment=AUGMENT
    )
    probe = [next(iter(loader))]
    steps = {
        name: stage_step(student, teacher, ["kd"], probe, device, performance=performance)
        for name, performance in SETTINGS.items()
    }
    with tempfile.TemporaryDirectory() as shared:
        for name, step in steps.items():
            fill_teacher_cache(step, loader, Path(shared) / name, log=lambda _line: None)
    paths = {name: (lambda step=step: ours(step, loader)) for name, step in steps.items()}
    for measure in paths.values():  # warm-up
        measure()
    times = interleaved(paths, args.repeats)
    for step in steps.values():
        step.close()
    rows = {name: summary(t) for name, t in times.items()}
    result = {
        "benchmark": "study_precision",
        "definition": "median seconds of a cached, augmented KD epoch of the study's pair in "
        "fp32 / in bf16 autocast with channels-last",
        "target": f">= {TARGET}",
        "ratio": rows["fp32"]["median"] / rows["bf16_channels_last"]["median"],
        "teacher": PAIR.teacher,
        "student": PAIR.student,
        "data": source,
        "train_images": n,
        "batch": args.batch,
        "quick": args.quick,
        "repeats": args.repeats,
        "epoch_seconds": rows,
        "environment": environment(device),
    }
    print(f"one cached, augmented KD epoch, {PAIR.teacher} -> {PAIR.student}, {n} images")
    for name, row in rows.items():
        print(f"  {name:<20}{row['median']:>8.2f} s  ({n / row['median']:,.0f} img/s)")
    print(f"study_precision: {result['ratio']:.2f}x (target {result['target']})")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
