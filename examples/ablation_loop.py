"""Scripting an ablation from Python: every order of the stages × several seeds.

Shows the pattern a sweep file automates (``smskd sweep``), written as a plain loop:
one config as a dict, the teacher trained once with ``train_teacher`` and shared by
every run through ``teacher.checkpoint``, one ``distill`` run directory per
(order, seed), and the final accuracies gathered into a table with plain Python.
Runs that already finished in --out are reused, so an interrupted loop picks up
where it stopped.

Run:  python examples/ablation_loop.py                     (about 15 s on 2 CPU cores)
      python examples/ablation_loop.py --methods kd fitnets rkd --seeds 0 1 2
      python examples/ablation_loop.py --epochs 1 --teacher-epochs 2 --out /tmp/abl
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any

from smskd import distill, load_config, train_teacher


def base_config(teacher_epochs: int) -> dict[str, Any]:
    # The same keys as a YAML file (configs/digits-options.yaml lists them all).
    return {
        "data": {"name": "digits", "batch_size": 64},
        "teacher": {"model": "convnet-m", "epochs": teacher_epochs},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],  # replaced per run below
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["kd", "rkd"], help="one per stage")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-loop"))
    args = parser.parse_args()

    base = base_config(args.teacher_epochs)
    # One teacher for all runs: the orders must differ only in the student's schedule.
    teacher_pt = args.out / "teacher" / "teacher.pt"
    if not teacher_pt.exists():
        # resume=True: a teacher run cut short continues instead of being refused.
        train_teacher(load_config(base), teacher_pt.parent, resume=True, progress=False)
    base["teacher"]["checkpoint"] = str(teacher_pt)

    table: dict[str, dict[int, float]] = {}
    for order in itertools.permutations(args.methods):
        label = " → ".join(order)
        for seed in args.seeds:  # the seed sets the student's init and the batch order
            raw = {
                **base,
                "seed": seed,
                "stages": [{"methods": [m], "epochs": args.epochs} for m in order],
            }
            run_dir = args.out / "-".join(order) / f"seed-{seed}"
            # resume=True: a finished run is read back, not trained again.
            name = f"{'-'.join(order)} seed {seed}"  # prefixes the run's log lines
            result = distill(load_config(raw), run_dir, resume=True, progress=False, name=name)
            table.setdefault(label, {})[seed] = result.final_accuracy

    header = ["order", *(f"seed {s}" for s in args.seeds), "mean"]
    rows = [
        [label, *(f"{accs[s]:.2f}" for s in args.seeds), f"{statistics.mean(accs.values()):.2f}"]
        for label, accs in table.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"final test accuracy (%), {args.epochs} epochs per stage:")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
