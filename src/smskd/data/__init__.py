"""Datasets, one file per on-disk format, and the in-memory batch loader."""

from smskd.data.memory import ArrayDataset, ArraySplit, InMemoryLoader
from smskd.data.registry import DATASETS, load_dataset

__all__ = ["DATASETS", "ArrayDataset", "ArraySplit", "InMemoryLoader", "load_dataset"]
