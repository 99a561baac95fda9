"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 28×28 grey clothing images, 10 classes.

Format: four IDX files (see :mod:`smskd.data.idx`), plain or gzipped:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (60,000 images) and
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (10,000 images).

Where: ``root`` if given; otherwise the first of
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package
``dataset-fashion-mnist``) and ``$SMSKD_DATA/fashion-mnist`` (default
``~/.cache/smskd/fashion-mnist``, where ``--download`` puts it) that exists.

How to get it: ``apt install dataset-fashion-mnist``, or
``smskd.data.download.download("fashion-mnist", root)``, or the four files from
https://github.com/zalandoresearch/fashion-mnist (``data/fashion``). MIT licence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smskd.data.download import data_home
from smskd.data.idx import read_idx_pair
from smskd.data.memory import ArrayDataset, ArraySplit
from smskd.errors import UserError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
HINT = "install the Debian package dataset-fashion-mnist, or pass data.root / --download"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def default_roots() -> tuple[Path, ...]:
    return (DEBIAN_ROOT, data_home() / "fashion-mnist")


def resolve_root(root: str | Path | None) -> Path:
    candidates = (Path(root).expanduser(),) if root is not None else default_roots()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise UserError(f"Fashion-MNIST not found in {looked}; {HINT}")


def _split(root: Path, which: str) -> ArraySplit:
    images, labels = read_idx_pair(root, *FILES[which], HINT)
    if images.shape[1:] != (28, 28):
        raise UserError(
            f"{root / FILES[which][0]}: images are {images.shape[1]}×{images.shape[2]}, "
            f"expected 28×28; {HINT}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise UserError(
            f"{root / FILES[which][1]}: label {labels.max()} outside 0..{NUM_CLASSES - 1}; {HINT}"
        )
    return ArraySplit(
        torch.from_numpy(images[:, None]),  # N×28×28 → N×1×28×28
        torch.from_numpy(labels.astype(np.int64)),
    )


def pixel_moments(images: np.ndarray, pixel_max: float) -> tuple[float, float]:
    """Mean and (unbiased) std of all pixels scaled to [0, 1], exactly, from a 256-bin histogram.

    The histogram avoids a float copy of 47M pixels and any float32 rounding drift.
    """
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / pixel_max
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / (n - 1))
    return mean, var**0.5


def load_fashion_mnist(root: str | None = None) -> ArrayDataset:
    """60,000 train / 10,000 test images, N×1×28×28 uint8; mean/std from the train split.

    On the real files the statistics come out as mean 0.2860, std 0.3530 — the
    values commonly published for Fashion-MNIST.
    """
    folder = resolve_root(root)
    train, test = _split(folder, "train"), _split(folder, "test")
    mean, std = pixel_moments(train.images.numpy(), 255.0)
    return ArrayDataset(
        name="fashion-mnist",
        train=train,
        test=test,
        num_classes=NUM_CLASSES,
        pixel_max=255.0,
        mean=(mean,),
        std=(std,),
    )
