"""How close a KD step is to its compute: our step / (teacher forward + student fwd+bwd alone).

"Alone" means the bare tensor work on the same ready-made batches: the teacher's
forward under ``inference_mode``, and the student's forward, a cross-entropy and
the backward, with nothing else in the loop. Our step is a full stage-1 KD step
through :func:`smskd.train.epoch.train_epoch` (feature taps, KD + CE losses, optimizer
step, loss bookkeeping). The gap is what the library adds.

    python benchmarks/compute_bound.py            # batch 64/128, more steps
    python benchmarks/compute_bound.py --quick
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    RESULTS,
    Pair,
    common_arguments,
    interleaved,
    models_of,
    over_pairs,
    random_batches,
    stage_step,
    summary,
    sync,
    time_steps,
    write_json,
)
from reference_overhead import sizes

TARGET = 1.2


def teacher_forward(teacher: torch.nn.Module, batches: list, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for x, _, _ in batches:
            teacher(x)
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def student_forward_backward(
    student: torch.nn.Module, batches: list, device: torch.device
) -> float:
    sync(device)
    started = time.perf_counter()
    for x, y, _ in batches:
        student.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), y).backward()
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def measure_pair(pair: Pair, quick: bool, repeats: int, device: torch.device) -> dict[str, Any]:
    batch, steps = sizes(pair, quick)
    student, teacher = models_of(pair)
    teacher.to(device)
    bare_student = copy.deepcopy(student).to(device).train()
    batches = random_batches(pair, batch, steps, device)
    ours = stage_step(student, teacher, ["kd"], batches, device)
    paths = {
        "ours_kd_step": lambda: time_steps(ours, batches),
        "teacher_forward": lambda: teacher_forward(teacher, batches, device),
        "student_forward_backward": lambda: student_forward_backward(bare_student, batches, device),
    }
    for measure in paths.values():  # warm-up
        measure()
    times = interleaved(paths, repeats)
    ours.close()
    rows = {name: summary(t) for name, t in times.items()}
    bound = rows["teacher_forward"]["median"] + rows["student_forward_backward"]["median"]
    return {
        "teacher": pair.teacher,
        "student": pair.student,
        "batch": batch,
        "steps_per_measurement": steps,
        "seconds_per_step": rows,
        "bound_seconds": bound,
        "ratio": rows["ours_kd_step"]["median"] / bound,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "compute_bound.json")
    args = parser.parse_args(argv)
    result = over_pairs(
        args,
        measure_pair,
        "compute_bound",
        "median s/step of our KD step / (median teacher forward + median student "
        "forward+backward, each measured alone on the same batches)",
        f"<= {TARGET}",
    )
    pairs, worst, device = result["pairs"], result["ratio"], args.device
    print(f"compute bound, {args.repeats} repeats (median s/step), device {device}")
    print(f"{'pair':<15}{'ours':>9}{'teacher fwd':>13}{'student f+b':>13}{'ratio':>8}")
    for name, p in pairs.items():
        s = p["seconds_per_step"]
        print(
            f"{name:<15}{s['ours_kd_step']['median']:>9.4f}{s['teacher_forward']['median']:>13.4f}"
            f"{s['student_forward_backward']['median']:>13.4f}{p['ratio']:>8.3f}"
        )
    print(f"compute_bound_ratio (worst pair): {worst:.3f} (target {result['target']})")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
