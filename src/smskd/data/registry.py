"""Dataset names → loaders, and where each looks for its files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from smskd.data.digits import load_digits
from smskd.data.memory import ArrayDataset
from smskd.errors import UserError, choices


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[[str | None], ArrayDataset]
    description: str
    location: str


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(
        load_digits,
        "8×8 handwritten digits, 10 classes, 1438 train / 359 test (stratified, seed 0)",
        "embedded in the package (copy of scikit-learn's digits.csv.gz)",
    ),
}


def load_dataset(name: str, root: str | None = None) -> ArrayDataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {choices(DATASETS)}")
    return DATASETS[name].load(root)
