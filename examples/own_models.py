"""Bring your own models and DataLoaders: SMSKD with plain PyTorch objects.

Shows: a teacher and a student written as ordinary ``nn.Module``s (nothing from the
smskd model zoo), plain ``DataLoader``s over scikit-learn's 8×8 digits, the teacher
trained on labels, then the student distilled KD → FitNets → RKD with ``run_stages``,
and the per-stage test accuracy read from the returned ``RunResult``.

Run:  python examples/own_models.py            (about 10 s on 2 CPU cores)
      python examples/own_models.py --epochs 1 (a smoke run)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smskd import ModelLayout, Stage, run_stages
from smskd.data import ArraySplit, load_dataset


class SmallCNN(nn.Module):
    # smskd taps layers by module name with forward hooks, so forward() stays plain.
    # A foreign model declares its stage outputs (shallow to deep) and the vector its
    # classifier reads; feature/relation methods take their default layers from it.
    # Without it, only the embedding (input of the last nn.Linear) is found, and
    # FitNets/AT would ask for explicit options such as student_layer="block1".
    tap_layout = ModelLayout(features=("block1", "block2"), embedding="fc:input")

    def __init__(self, width: int) -> None:
        super().__init__()
        self.block1 = nn.Sequential(  # 8×8 → 4×4
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(  # 4×4 → 2×2
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(x)).flatten(1))


def loaders() -> tuple[DataLoader, DataLoader]:
    # smskd's embedded copy of sklearn's digits: present on every machine, no download.
    digits = load_dataset("digits")

    def tensors(split: ArraySplit) -> TensorDataset:  # uint8 pixels 0..16 → floats around 0
        return TensorDataset(split.images.float() / 16.0 - 0.5, split.labels)

    train = DataLoader(tensors(digits.train), batch_size=64, shuffle=True)
    return train, DataLoader(tensors(digits.test), batch_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per student stage")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)  # the shuffling DataLoader and both models' initial weights
    train, test = loaders()
    teacher, student = SmallCNN(width=32), SmallCNN(width=8)

    # No teacher and a stage without methods = plain cross-entropy training.
    taught = run_stages(
        teacher, None, [Stage(epochs=args.teacher_epochs)], train, test, name="teacher"
    )
    print(f"teacher: test acc {taught.final_accuracy:.2f}%")

    stages = [
        Stage(methods=["kd"], epochs=args.epochs),
        # A dict gives options: "weight" is β (default 1; 10 as configs/quickstart.yaml uses
        # for tiny nets). The hint layers come from tap_layout (the middle feature, "block1"
        # on both sides); FitNets builds a 1×1 conv to map the student's 8 channels to 32.
        Stage(methods=[{"name": "fitnets", "weight": 10.0}], epochs=args.epochs),
        Stage(methods=["rkd"], epochs=args.epochs),  # relations between "fc:input" vectors
    ]
    result = run_stages(student, teacher, stages, train, test)
    for k, stage in enumerate(stages, start=1):
        last = [r for r in result.history if r["stage"] == k][-1]  # one record per epoch
        print(f"stage {k} {stage.label}: test acc {last['test_acc']:.2f}%")
    print(f"student: test acc {result.final_accuracy:.2f}% in {result.wall_time:.1f}s")


if __name__ == "__main__":
    main()
