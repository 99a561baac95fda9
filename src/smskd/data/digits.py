"""scikit-learn's bundled 8×8 handwritten digits: the embedded default dataset.

``resources/digits.csv.gz`` is byte-identical to ``sklearn/datasets/data/digits.csv.gz``
(1797 images of 64 values in 0..16, then the label, one per row; a test checks
it against scikit-learn when that is installed). Shipping it keeps scikit-learn
out of the core dependencies. Source: UCI ML "Optical Recognition of Handwritten
Digits" (Alpaydin & Kaynak, 1998), CC BY 4.0.
"""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

from smskd.data.memory import ArrayDataset, ArraySplit, stratified_split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _read() -> tuple[np.ndarray, np.ndarray]:
    blob = resources.files("smskd").joinpath("resources/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(blob).decode().splitlines(), delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)


def load_digits(root: str | None = None) -> ArrayDataset:
    """Fixed stratified 80/20 split (seed 0): 1438 train / 359 test images."""
    del root  # embedded: nothing to find on disk
    images, labels = _read()
    is_test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    train = ArraySplit(torch.from_numpy(images[~is_test]), torch.from_numpy(labels[~is_test]))
    test = ArraySplit(torch.from_numpy(images[is_test]), torch.from_numpy(labels[is_test]))
    pixels = train.images.float() / 16.0
    return ArrayDataset(
        name="digits",
        train=train,
        test=test,
        num_classes=10,
        pixel_max=16.0,
        mean=(pixels.mean().item(),),
        std=(pixels.std().item(),),
    )
