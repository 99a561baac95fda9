"""Run every benchmark and write their headline ratios to ``benchmarks/results.json``.

    python benchmarks/run_all.py --quick     # all five in under 2 minutes on 2 CPU cores
    python benchmarks/run_all.py             # the full sizes -> benchmarks/results-full.json
    python benchmarks/run_all.py --device cuda

Each benchmark also writes its detailed JSON (every repeat's time) under
``benchmarks/results/quick/`` or ``benchmarks/results/full/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import compute_bound
import epoch_speedup
import pipeline_speedup
import reference_overhead
import smskd_vs_joint
import torch
from harness import RESULTS, environment, write_json

BENCHMARKS = {
    "reference_overhead": (reference_overhead, "<= 1.10"),
    "pipeline_speedup": (pipeline_speedup, ">= 3"),
    "epoch_speedup": (epoch_speedup, ">= 1.5"),
    "compute_bound_ratio": (compute_bound, "<= 1.2"),
    "smskd_vs_joint": (smskd_vs_joint, "<= 1.0"),
}
HERE = Path(__file__).parent


def meets(value: float, target: str) -> bool:
    sign, bound = target.split()
    return value <= float(bound) if sign == "<=" else value >= float(bound)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=None, help="default results.json (quick)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = args.out or HERE / ("results.json" if args.quick else "results-full.json")
    common = ["--device", args.device, *(["--quick"] if args.quick else [])]
    started = time.perf_counter()
    details: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for key in args.only:
        module, target = BENCHMARKS[key]
        print(f"\n== {key} ({module.__name__}.py)")
        begun = time.perf_counter()
        detail = RESULTS / mode / f"{module.__name__}.json"
        result = module.main([*common, "--out", str(detail)])
        summary[key] = result["ratio"]
        details[key] = {
            "target": target,
            "meets_target": meets(result["ratio"], target),
            "seconds": round(time.perf_counter() - begun, 1),
            "details": str(detail.relative_to(HERE.parent)),
            **{k: v for k, v in result.items() if k.startswith("ratio")},
        }
    total = time.perf_counter() - started
    output = {
        **summary,
        "targets": {key: BENCHMARKS[key][1] for key in summary},
        "benchmarks": details,
        "quick": args.quick,
        "total_seconds": round(total, 1),
        "command": "python benchmarks/run_all.py" + (" --quick" if args.quick else ""),
        "environment": environment(torch.device(args.device)),
    }
    print("\n== summary")
    for key, value in summary.items():
        verdict = "meets" if details[key]["meets_target"] else "MISSES"
        print(f"  {key:<22}{value:>8.3f}   target {BENCHMARKS[key][1]:<8} {verdict}")
    print(f"  total {total:.0f} s")
    write_json(output, out)
    return output


if __name__ == "__main__":
    main()
