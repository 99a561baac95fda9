"""Total cost: SMSKD (3 stages × E epochs) wall time / joint (one stage, 3E epochs).

Both runs go through :func:`smskd.train.stages.run_stages` end to end (stage set-up,
probe, taps, per-epoch evaluation) on the same data and models, with the stages of
``configs/fashion-mnist.yaml`` (KD → FitNets → RKD, reference from stage 2) and the
joint baseline that sums the three (:func:`smskd.study.recipes.recipe`). Timed with the
defaults and (not in ``--quick``) with bf16 + channels_last + the teacher-output cache,
which also caches the reference's logits in SMSKD's stages 2 and 3. One untimed round
first warms every path up.

    python benchmarks/smskd_vs_joint.py            # E = 2, 4096 training images
    python benchmarks/smskd_vs_joint.py --quick    # E = 1, 1024 images, default settings
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from epoch_speedup import FAST, fashion_mnist
from harness import (
    PAIRS,
    RESULTS,
    apply_threads,
    common_arguments,
    environment,
    interleaved,
    models_of,
    summary,
    write_json,
)

from smskd.config import PerformanceConfig, Stage, load_config
from smskd.data.memory import InMemoryLoader, stratified_subset
from smskd.study.recipes import recipe
from smskd.train.stages import run_stages

CONFIG = Path(__file__).parents[1] / "configs" / "fashion-mnist.yaml"
TARGET = 1.0


def stage_lists(epochs: int) -> dict[str, list[Stage]]:
    cfg = load_config(CONFIG, [f"stages.*.epochs={epochs}"])
    return {"smskd": cfg.stages, "joint": recipe(cfg, "joint").stages}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "smskd_vs_joint.json")
    parser.add_argument("--epochs", type=int, default=None, help="E per stage (default 2, quick 1)")
    parser.add_argument("--images", type=int, default=None, help="default 4096 (1024 quick)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    epochs = args.epochs or (1 if args.quick else 2)
    images = args.images or (1024 if args.quick else 4096)
    data, source = fashion_mnist(images)
    test = stratified_subset(data.test, 512 if args.quick else 2048)
    train_loader = InMemoryLoader(
        data.train, data, 128, shuffle=True, drop_last=True, device=device
    )
    test_loader = InMemoryLoader(test, data, 512, shuffle=False, device=device)
    student, teacher = models_of(PAIRS["fashion-mnist"])
    stages = stage_lists(epochs)
    settings = {"default": PerformanceConfig()}
    if not args.quick:
        settings["fast"] = FAST

    def run(recipe_name: str, performance: PerformanceConfig) -> float:
        result = run_stages(
            copy.deepcopy(student),
            copy.deepcopy(teacher),
            stages[recipe_name],
            train_loader,
            test_loader,
            device=device,
            progress=False,
            log=lambda _: None,
            performance=performance,
        )
        return result.wall_time

    paths = {
        f"{name}_{setting}": (lambda n=name, p=performance: run(n, p))
        for setting, performance in settings.items()
        for name in stages
    }
    interleaved(paths, 1)  # warm-up
    times = interleaved(paths, args.repeats)
    rows = {name: summary(t) for name, t in times.items()}
    ratios = {
        setting: rows[f"smskd_{setting}"]["median"] / rows[f"joint_{setting}"]["median"]
        for setting in settings
    }
    result = {
        "benchmark": "smskd_vs_joint",
        "definition": "median wall seconds of SMSKD (3 stages x E epochs) / median wall "
        "seconds of joint (1 stage, 3E epochs), default settings",
        "target": f"<= {TARGET}",
        "ratio": ratios["default"],
        "ratio_fast_settings": ratios.get("fast"),
        "fast_settings": FAST.model_dump(),
        "epochs_per_stage": epochs,
        "stages": {name: [s.label for s in stage_list] for name, stage_list in stages.items()},
        "data": source,
        "train_images": len(data.train),
        "test_images": len(test),
        "quick": args.quick,
        "repeats": args.repeats,
        "wall_seconds": rows,
        "environment": environment(device),
    }
    print(f"SMSKD vs joint, {epochs} epoch(s) per stage, {len(data.train)} images ({source})")
    for name, row in rows.items():
        print(f"  {name:<16}{row['median']:>8.2f} s")
    shown = ", ".join(f"{ratio:.3f} {setting}" for setting, ratio in ratios.items())
    print(f"smskd_vs_joint: {shown} (target {result['target']})")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
