"""Augmented KD epoch: the teacher's forward every step / its outputs read from the shared cache.

With crop + flip augmentation (padding 2: 50 views of each image) the teacher's outputs on
every view can be computed once into ``performance.cache_dir`` and read by every run that
shares the teacher (:mod:`smskd.train.output_cache`). This measures, on the study's pair
(resnet56 → resnet8, random weights: speed does not depend on them) and Fashion-MNIST
images, one KD epoch both ways, interleaved, and what filling the cache costs: the ratio
live / cached, and after how many epochs (summed over every run sharing the cache) the
fill has paid for itself. Not part of ``run_all``: the fill alone is 50 epochs' worth of
teacher forwards.

    python benchmarks/augmented_cache.py            # 2048 training images, 3 repeats
    python benchmarks/augmented_cache.py --quick    # 512 images
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from epoch_speedup import fashion_mnist, ours
from harness import (
    RESULTS,
    Pair,
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
from smskd.data.augment import Augment
from smskd.data.memory import InMemoryLoader

PAIR = Pair("fashion-mnist-study", "resnet56", "resnet8", (1, 28, 28), 10)
AUGMENT = Augment(crop_padding=2, flip=True)
TARGET = 2.0  # the teacher, 11x the student, is most of a live step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "augmented_cache.json")
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
    live = stage_step(student, teacher, ["kd"], probe, device)
    cached = stage_step(student, teacher, ["kd"], probe, device, performance=PerformanceConfig())
    with tempfile.TemporaryDirectory() as shared:
        started = time.perf_counter()
        fill_teacher_cache(cached, loader, Path(shared), log=lambda _line: None)
        fill_seconds = time.perf_counter() - started
    paths = {
        "live_teacher": lambda: ours(live, loader),
        "cached_teacher": lambda: ours(cached, loader),
    }
    for measure in paths.values():  # warm-up
        measure()
    times = interleaved(paths, args.repeats)
    live.close()
    cached.close()
    rows = {name: summary(t) for name, t in times.items()}
    live_s, cached_s = rows["live_teacher"]["median"], rows["cached_teacher"]["median"]
    result = {
        "benchmark": "augmented_cache",
        "definition": "median KD epoch seconds with the teacher's forward / with its outputs "
        "read from the shared cache (crop 2 + flip: 50 views)",
        "target": f">= {TARGET}",
        "ratio": live_s / cached_s,
        "fill_seconds": fill_seconds,
        "views": AUGMENT.views,
        "break_even_epochs": fill_seconds / (live_s - cached_s) if live_s > cached_s else None,
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
    print(f"one augmented KD epoch, {PAIR.teacher} -> {PAIR.student}, {n} images ({source})")
    for name, row in rows.items():
        print(f"  {name:<16}{row['median']:>8.2f} s  ({n / row['median']:,.0f} img/s)")
    print(f"  cache fill, {AUGMENT.views} views: {fill_seconds:.1f} s")
    even = result["break_even_epochs"]
    print(
        f"augmented_cache: {result['ratio']:.2f}x (target {result['target']}); the fill "
        f"pays for itself after {even:.1f} epochs across the runs sharing it"
        if even is not None
        else f"augmented_cache: {result['ratio']:.2f}x (no gain)"
    )
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
