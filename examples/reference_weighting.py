"""The reference term's per-sample weight, compared: inverse_tcp vs tcp vs fixed vs none.

From stage 2 on, SMSKD keeps the student from the end of the previous stage as a frozen
reference and adds ``mean_i(w_i · KL(reference_i ‖ student_i))`` to the loss, with
``w_i = λ·(1 − TCP_i)`` (inverse_tcp, the default), ``λ·TCP_i`` (tcp), ``λ`` (fixed) or
no term at all (none); TCP_i is the teacher's probability of sample i's true class.
This script runs the same two-stage KD → RKD schedule once per weighting, from the same
initial student and the same teacher, and prints the mean weight and the accuracy.
It uses the smskd zoo (convnet-m → convnet-xs) and smskd's in-memory digits loader.

Run:  python examples/reference_weighting.py              (about 13 s on 2 CPU cores)
      python examples/reference_weighting.py --epochs 1 --teacher-epochs 2
"""

from __future__ import annotations

import argparse
import copy

import torch

from smskd import ReferenceConfig, Stage, run_stages
from smskd.data import InMemoryLoader, load_dataset
from smskd.models.registry import build_model

WEIGHTINGS = ("inverse_tcp", "tcp", "fixed", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--lam", type=float, default=1.0, help="λ, the weights' scale")
    args = parser.parse_args()

    digits = load_dataset("digits")  # embedded in smskd: the same 1438/359 split everywhere
    # smskd's loader yields (x, y, index) and normalizes on the fly; its order depends only
    # on (seed, epoch), so every run below sees the same batches in the same order.
    train = InMemoryLoader(digits.train, digits, batch_size=64, shuffle=True, drop_last=True)
    test = InMemoryLoader(digits.test, digits, batch_size=512, shuffle=False)

    torch.manual_seed(0)
    teacher = build_model("convnet-m", digits.num_classes, digits.in_channels)
    run_stages(teacher, None, [Stage(epochs=args.teacher_epochs)], train, test, name="teacher")
    torch.manual_seed(1)
    initial = build_model("convnet-xs", digits.num_classes, digits.in_channels)

    stages = [Stage(methods=["kd"], epochs=args.epochs), Stage(methods=["rkd"], epochs=args.epochs)]
    rows = []
    for weighting in WEIGHTINGS:
        # A fresh copy each time: run_stages trains the student it is given in place.
        # Stage 1 has no reference, so it ends identically in every run; only stage 2 differs.
        result = run_stages(
            copy.deepcopy(initial),
            teacher,
            stages,
            train,
            test,
            reference=ReferenceConfig(weighting=weighting, lam=args.lam),
            seed=0,
            name=weighting,
        )
        stage1 = [r for r in result.history if r["stage"] == 1][-1]["test_acc"]
        # Logged per epoch as the mean of w_i over that epoch's samples; absent for "none".
        weights = [r.get("train_ref_weight_mean") for r in result.history if r["stage"] == 2]
        mean_w = "-" if None in weights else f"{sum(weights) / len(weights):.4f}"
        rows.append((weighting, mean_w, f"{stage1:.2f}", f"{result.final_accuracy:.2f}"))

    header = ("weighting", "mean w_i (stage 2)", "acc after stage 1", "final acc")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
