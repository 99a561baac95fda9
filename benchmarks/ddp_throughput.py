"""Samples/s of SMSKD training: 2 DDP processes (torchrun, Gloo on CPU) vs 1 process.

Both runs train the same stages on the same data with the same global batch; the
time is the sum of the training epochs' wall time that ``metrics.jsonl`` records
(evaluation excluded). Each figure is the median of ``--repeats`` runs, side by side.

    python benchmarks/ddp_throughput.py            # 5 repeats
    python benchmarks/ddp_throughput.py --quick    # 2 repeats, fewer epochs (< 2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

RESULTS = Path(__file__).parent / "results" / "ddp_throughput.json"


def config(batch: int, epochs: int) -> dict:
    return {
        "seed": 0,
        "data": {"name": "digits", "batch_size": batch},
        "teacher": {"model": "convnet-m", "epochs": 1},
        "student": {"model": "convnet-s"},
        "stages": [{"methods": ["kd"], "epochs": epochs}, {"methods": ["rkd"], "epochs": epochs}],
    }


def samples_per_second(launcher: list[str], batch: int, epochs: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config(batch, epochs)))
        cmd = [
            *launcher,
            "-m",
            "smskd",
            "distill",
            str(path),
            "--out",
            f"{tmp}/run",
            "--no-progress",
        ]
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").open()]
    seen = (1438 // 64) * 64 * len(records)  # 22 global batches of 64 per epoch
    return seen / sum(r["epoch_time"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    epochs = 2 if args.quick else 4
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # One process may use every core; two processes get one thread each (torchrun's
    # default), so the comparison is at equal CPU.
    one_env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    two_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    one, two = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        one.append(samples_per_second([sys.executable], 64, epochs, one_env))
        two.append(samples_per_second(torchrun, 32, epochs, two_env))
    result = {
        "one_process_samples_per_s": statistics.median(one),
        "two_process_samples_per_s": statistics.median(two),
        "ratio_two_over_one": statistics.median(two) / statistics.median(one),
        "repeats": repeats,
        "runs": {"one": one, "two": two},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "workload": "digits, convnet-m → convnet-s, kd → rkd, global batch 64, Gloo on CPU",
    }
    print(f"{'setup':<28}{'samples/s (median)':>20}")
    print(f"{'1 process':<28}{result['one_process_samples_per_s']:>20.0f}")
    print(f"{'2 processes (DDP, Gloo)':<28}{result['two_process_samples_per_s']:>20.0f}")
    print(f"ratio 2/1: {result['ratio_two_over_one']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
