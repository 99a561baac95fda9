"""The loop users compare us with, as torchdistill / mdistiller / RepDistiller run it.

A ``Dataset`` that converts and normalizes one image per ``__getitem__`` (and, when
asked, pads, crops and flips it, drawing from its own RNG per image), a shuffling
``DataLoader``, teacher and student called in Python every step, Hinton's KD loss
plus cross-entropy, SGD, and the loss read back with ``.item()`` each step for the
running average those loops print. Written here for the comparison; not used by
the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class PerImageTransforms(Dataset):
    """``uint8`` images → normalized float tensors, one image at a time."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.pad, self.flip = pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = self.images[i].float() / 255.0  # ToTensor
        if self.pad:  # RandomCrop(size, padding=pad)
            h, w = image.shape[-2:]
            padded = F.pad(image, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            image = padded[:, dy : dy + h, dx : dx + w]
        if self.flip and torch.rand(()) < 0.5:  # RandomHorizontalFlip
            image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[i]  # Normalize


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def train_one_epoch(
    student: nn.Module,
    teacher: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> float:
    student.train()
    teacher.eval()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        loss = F.cross_entropy(logits, y) + kd_loss(logits, teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)  # the per-step running average of those loops
        count += len(y)
    return total / count
