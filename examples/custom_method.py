"""Your own KD method as one stage of a sequence, next to the built-in ones.

A method is a small ``DistillMethod`` subclass with one job: turn the batch's
``Outputs`` (student/teacher logits, labels, the features it asked for) into a
per-sample loss. ``register_method`` makes it usable by name in ``Stage`` and in
configs loaded in this process, with its constructor's options checked like the
built-ins'. Here: a cosine-similarity match of the logits, used between KD and RKD.

Run:  python examples/custom_method.py              (about 10 s on 2 CPU cores)
      python examples/custom_method.py --epochs 1 --teacher-epochs 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from smskd import DistillMethod, Outputs, Stage, register_method, run_stages
from smskd.data import InMemoryLoader, load_dataset
from smskd.models.registry import build_model


@register_method
class CosineLogits(DistillMethod):
    """1 − cos(student logits, teacher logits) per sample: the direction of the teacher's
    logits, not their scale (which KD's temperature otherwise has to tame)."""

    name = "cosine-logits"
    family = "response"
    citation = "this example"

    def __init__(self, eps: float = 1e-8) -> None:  # options need type hints: they are checked
        super().__init__()
        self.eps = eps

    def loss(self, out: Outputs) -> Tensor:
        # Shape [B]: the stage averages it; a batch-level method would return a scalar.
        return 1 - F.cosine_similarity(out.student_logits, out.teacher_logits, eps=self.eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    args = parser.parse_args()

    digits = load_dataset("digits")
    train = InMemoryLoader(digits.train, digits, batch_size=64, shuffle=True, drop_last=True)
    test = InMemoryLoader(digits.test, digits, batch_size=512, shuffle=False)
    torch.manual_seed(0)
    teacher = build_model("convnet-m", digits.num_classes, digits.in_channels)
    run_stages(teacher, None, [Stage(epochs=args.teacher_epochs)], train, test, name="teacher")
    student = build_model("convnet-xs", digits.num_classes, digits.in_channels)

    stages = [
        Stage(methods=["kd"], epochs=args.epochs),
        Stage(methods=[{"name": "cosine-logits", "weight": 2.0}], epochs=args.epochs),
        Stage(methods=["rkd"], epochs=args.epochs),
    ]
    result = run_stages(student, teacher, stages, train, test, name="student")
    for record in result.history:
        if record["epoch"] == stages[record["stage"] - 1].epochs:  # each stage's last epoch
            loss = record.get("train_cosine-logits")
            term = f", cosine-logits loss {loss:.4f}" if loss is not None else ""
            print(
                f"stage {record['stage']} {record['stage_name']}: test acc "
                f"{record['test_acc']:.2f}%{term}"
            )


if __name__ == "__main__":
    main()
