"""End-to-end distillation epoch: our epoch / the anchor loop's, same models and data.

The anchor (``anchor_loop.py``) is the loop of torchdistill / mdistiller / RepDistiller:
per-image transforms in a DataLoader, teacher and student called each step, KD + CE,
``.item()`` per step. Ours is the library's epoch: the in-memory loader and
:func:`smskd.train.epoch.train_epoch`, first with its defaults (fp32), then with the
switches a user of this pair would set (``performance``: bf16 autocast, channels_last,
and, as Fashion-MNIST trains without augmentation, the teacher-output cache). The cache
is filled once per stage; its cost is reported, and the ratio amortized over a stage of
``--stage-epochs`` epochs too. Data: the real Fashion-MNIST files when installed
(Debian package dataset-fashion-mnist), random images of the same shape otherwise.

    python benchmarks/epoch_speedup.py            # 4096 training images, 5 repeats
    python benchmarks/epoch_speedup.py --quick    # 1024 images
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from anchor_loop import PerImageTransforms, train_one_epoch
from harness import (
    PAIRS,
    RESULTS,
    apply_threads,
    common_arguments,
    environment,
    fill_teacher_cache,
    interleaved,
    models_of,
    stage_step,
    summary,
    sync,
    write_json,
)
from torch.utils.data import DataLoader

from smskd.config import PerformanceConfig
from smskd.data.memory import ArrayDataset, ArraySplit, InMemoryLoader, stratified_subset
from smskd.data.registry import load_dataset
from smskd.errors import UserError
from smskd.train.epoch import train_epoch
from smskd.train.stage import BuiltStage

TARGET = 1.5
FAST = PerformanceConfig(precision="bf16", channels_last=True, cache_teacher=True)


def fashion_mnist(images: int) -> tuple[ArrayDataset, str]:
    try:
        data = load_dataset("fashion-mnist")
        source = "Fashion-MNIST idx files"
    except UserError:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (images,), generator=generator)
        split = ArraySplit(pixels, labels)
        data = ArrayDataset("random", split, split, 10, 255.0, (0.286,), (0.353,))
        source = "random 28x28 images (Fashion-MNIST not installed)"
    train = stratified_subset(data.train, images)
    return ArrayDataset(data.name, train, data.test, 10, 255.0, data.mean, data.std), source


def ours(step: BuiltStage, loader: InMemoryLoader) -> float:
    sync(step.device)
    started = time.perf_counter()
    train_epoch(
        step.models, step.objective, loader, step.optimizer, step.device, scaler=step.scaler
    )
    sync(step.device)
    return time.perf_counter() - started


def anchor(student, teacher, loader: DataLoader, device: torch.device) -> float:
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sync(device)
    started = time.perf_counter()
    train_one_epoch(student, teacher, loader, optimizer, device)
    sync(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "epoch_speedup.json")
    parser.add_argument("--images", type=int, default=None, help="default 4096 (1024 quick)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="the anchor's DataLoader workers")
    parser.add_argument("--stage-epochs", type=int, default=12, help="for the amortized ratio")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    pair = PAIRS["fashion-mnist"]
    data, source = fashion_mnist(args.images or (1024 if args.quick else 4096))
    n = len(data.train)

    student, teacher = models_of(pair)
    teacher.to(device)
    loader = InMemoryLoader(
        data.train, data, args.batch, shuffle=True, drop_last=True, device=device
    )
    per_image = PerImageTransforms(data.train.images, data.train.labels, data.mean, data.std)
    anchor_loader = DataLoader(
        per_image, args.batch, shuffle=True, drop_last=True, num_workers=args.workers
    )
    probe = [next(iter(loader))]
    default = stage_step(student, teacher, ["kd"], probe, device)
    fast = stage_step(student, teacher, ["kd"], probe, device, performance=FAST)
    cache_started = time.perf_counter()
    fill_teacher_cache(fast, loader)
    cache_seconds = time.perf_counter() - cache_started
    paths = {
        "anchor_dataloader_loop": lambda: anchor(
            copy.deepcopy(student).to(device), teacher, anchor_loader, device
        ),
        "ours_default": lambda: ours(default, loader),
        "ours_fast": lambda: ours(fast, loader),
    }
    for measure in paths.values():  # warm-up
        measure()
    times = interleaved(paths, args.repeats)
    default.close()
    fast.close()
    rows = {name: summary(t) for name, t in times.items()}
    anchor_s = rows["anchor_dataloader_loop"]["median"]
    fast_s = rows["ours_fast"]["median"]
    amortized = fast_s + cache_seconds / args.stage_epochs
    result = {
        "benchmark": "epoch_speedup",
        "definition": "median epoch seconds of the anchor loop / median epoch seconds of ours "
        "(fast: bf16 + channels_last + teacher-output cache; default: fp32, no cache)",
        "target": f">= {TARGET}",
        "ratio": anchor_s / fast_s,
        "ratio_default_settings": anchor_s / rows["ours_default"]["median"],
        "ratio_fast_amortized": anchor_s / amortized,
        "cache_fill_seconds": cache_seconds,
        "stage_epochs_for_amortized": args.stage_epochs,
        "fast_settings": FAST.model_dump(),
        "teacher": pair.teacher,
        "student": pair.student,
        "data": source,
        "train_images": n,
        "batch": args.batch,
        "anchor_workers": args.workers,
        "quick": args.quick,
        "repeats": args.repeats,
        "epoch_seconds": rows,
        "environment": environment(device),
    }
    print(
        f"one KD epoch, {pair.teacher} -> {pair.student}, {n} images ({source}), batch {args.batch}"
    )
    for name, row in rows.items():
        print(f"  {name:<24}{row['median']:>8.2f} s  ({n / row['median']:,.0f} img/s)")
    print(f"  cache fill (once per stage): {cache_seconds:.2f} s")
    print(
        f"epoch_speedup: {result['ratio']:.2f}x fast, {result['ratio_default_settings']:.2f}x "
        f"default, {result['ratio_fast_amortized']:.2f}x fast amortized over "
        f"{args.stage_epochs} epochs (target {result['target']})"
    )
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
