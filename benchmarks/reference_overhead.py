"""Cost of the reference model: an SMSKD stage-k step / a plain KD step, and their memory.

Both steps train the same student with KD from the same teacher on the same batches;
the stage-k step (k ≥ 2) also runs the frozen reference (eval mode, ``inference_mode``)
and adds the TCP-weighted reference loss. Steps go through the library's own epoch
loop (:func:`smskd.train.epoch.train_epoch`) over ready-made batches on the device, so the
input pipeline is not in the figure. The reference's forward is also timed alone, in its
inference form and as a plain eval-mode copy: ``1 + forward / KD step`` is the floor
that any implementation of the stage-k step has on this machine. Peak memory of each
step is measured in a fresh process per path (peak resident set on the CPU, peak allocated on CUDA).

    python benchmarks/reference_overhead.py            # batch 64, 5 steps, 5 repeats
    python benchmarks/reference_overhead.py --quick    # smaller batch and fewer steps
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    PAIRS,
    RESULTS,
    Pair,
    apply_threads,
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

PATHS = {"kd": False, "smskd_stage_k": True}  # path → with the reference model
TARGET = 1.10


def sizes(pair: Pair, quick: bool) -> tuple[int, int]:
    """(batch, steps per measurement): the CIFAR pair costs ~1 s a step on 2 CPU cores."""
    if pair.name == "cifar":
        return (32, 2) if quick else (64, 5)
    return (128, 5) if quick else (128, 20)


def measure_pair(pair: Pair, quick: bool, repeats: int, device: torch.device) -> dict[str, Any]:
    batch, steps = sizes(pair, quick)
    student, teacher = models_of(pair)
    batches = random_batches(pair, batch, steps, device)
    built = {
        name: stage_step(student, teacher, ["kd"], batches, device, reference=with_reference)
        for name, with_reference in PATHS.items()
    }
    for step in built.values():  # warm-up: allocator, kernels, lazy initialization
        time_steps(step, batches[:1])
    reference = built["smskd_stage_k"].models.reference
    plain = copy.deepcopy(student).to(device).eval()
    paths = {name: lambda s=s: time_steps(s, batches) for name, s in built.items()}
    paths["reference_forward"] = lambda: forward_only(reference, batches, device)
    paths["plain_copy_forward"] = lambda: forward_only(plain, batches, device)
    times = interleaved(paths, repeats)
    for step in built.values():
        step.close()
    rows = {name: summary(t) for name, t in times.items()}
    kd = rows["kd"]["median"]
    ratio = rows["smskd_stage_k"]["median"] / kd
    return {
        "teacher": pair.teacher,
        "student": pair.student,
        "input": list(pair.shape),
        "batch": batch,
        "steps_per_measurement": steps,
        "seconds_per_step": rows,
        "ratio": ratio,
        "floor_one_reference_forward": 1 + rows["reference_forward"]["median"] / kd,
        "floor_plain_copy": 1 + rows["plain_copy_forward"]["median"] / kd,
        "memory": {name: memory_probe(pair.name, name, batch, device) for name in PATHS},
    }


def forward_only(model: torch.nn.Module, batches: list, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for x, _, _ in batches:
            model(x)
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def memory_probe(pair: str, path: str, batch: int, device: torch.device) -> dict[str, float]:
    """Peak memory of a few steps of ``path``, in a process of its own (peaks only rise)."""
    command = [sys.executable, __file__, "--probe", pair, path, str(batch), "--device", str(device)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_probe(pair_name: str, path: str, batch: int, device: torch.device) -> None:
    pair = PAIRS[pair_name]
    student, teacher = models_of(pair)
    batches = random_batches(pair, batch, 3, device)
    step = stage_step(student, teacher, ["kd"], batches, device, reference=PATHS[path])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        time_steps(step, batches)
        peak = torch.cuda.max_memory_allocated(device)
        print(json.dumps({"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}))
        return
    before = _resident_kib("VmRSS")
    time_steps(step, batches)
    peak = _resident_kib("VmHWM")  # the process's peak resident set
    print(json.dumps({"peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, RESULTS / "reference_overhead.json")
    parser.add_argument(
        "--probe", nargs=3, metavar=("PAIR", "PATH", "BATCH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.probe:
        apply_threads(args.threads)
        run_probe(args.probe[0], args.probe[1], int(args.probe[2]), torch.device(args.device))
        return {}
    result = over_pairs(
        args,
        measure_pair,
        "reference_overhead",
        "median s/step of an SMSKD stage-k step (teacher + reference + student, KD + "
        "reference loss) / median s/step of a plain KD step (teacher + student, KD loss)",
        f"<= {TARGET}",
    )
    pairs, worst, device = result["pairs"], result["ratio"], args.device
    print(f"reference overhead, {args.repeats} repeats (median s/step), device {device}")
    print(
        f"{'pair':<15}{'batch':>6}{'KD step':>10}{'stage-k':>10}{'ratio':>8}{'floor':>7}"
        f"{'plain':>7}{'peak MiB KD / stage-k':>24}"
    )
    for name, p in pairs.items():
        s, m = p["seconds_per_step"], p["memory"]
        print(
            f"{name:<15}{p['batch']:>6}{s['kd']['median']:>10.4f}{s['smskd_stage_k']['median']:>10.4f}"
            f"{p['ratio']:>8.3f}{p['floor_one_reference_forward']:>7.3f}"
            f"{p['floor_plain_copy']:>7.3f}{m['kd']['peak_mib']:>13.0f}"
            f" / {m['smskd_stage_k']['peak_mib']:.0f}"
        )
    print(f"reference_overhead (worst pair): {worst:.3f} (target {result['target']})")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
