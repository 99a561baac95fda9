"""Fabricate the binary half of the bad-input corpus: checkpoints, IDX, pickles, images.

The YAML cases in this folder name these files by paths relative to the working
directory (``data.root: fmnist-truncated``, ``teacher.checkpoint: truncated.pt``), so
run the CLI from the folder this script fills:

    python tests/bad_inputs/make_data.py /tmp/bad && cd /tmp/bad
    smskd distill /path/to/tests/bad_inputs/fmnist-truncated.yaml --out run
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

try:
    from fakes import dump, make_cifar10, make_cifar100
except ImportError:  # run as a script: fakes.py lives one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fakes import dump, make_cifar10, make_cifar100

from smskd.models.registry import build_model

PWNED = "pwned"  # what the malicious pickles would create if they were ever executed


class Exploit:
    """Unpickling this runs ``touch <PWNED>``: the crafted payload of the malicious cases."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fmnist(folder: Path, n_train: int = 6, n_test: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return folder


def png_bytes(seed: int, size: int = 8) -> bytes:
    from io import BytesIO

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``layout``: split → class → number of valid PNGs (0 = an empty class folder)."""
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(png_bytes(i))
    return root


def _state_dict(name: str, num_classes: int, in_channels: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(name, num_classes, in_channels).state_dict()


def write_not_checkpoints(work: Path) -> None:
    """Files named where a checkpoint belongs that are none: each must be called what it is,
    never unpickled, never opened if it would block (the FIFO)."""
    (work / "empty.pt").write_bytes(b"")
    (work / "random.pt").write_bytes(np.random.default_rng(0).bytes(256))
    (work / "pickled-object.pt").write_bytes(pickle.dumps(Exploit(work / PWNED)))
    with warnings.catch_warnings():  # TorchScript is deprecated; its files are still about
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(work / "torchscript.pt"))
    os.mkfifo(work / "fifo.pt")


class DeclaredArray:
    """Pickles as what numpy's own reduce writes, but declaring an array of ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        reconstruct = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, wherever it lives
        return (reconstruct, (np.ndarray, self.shape, b"b"))


def write_oversized(work: Path) -> None:
    """Files that declare far more than they hold: a loader must refuse them from their
    size alone, before allocating what they declare."""
    folder = make_cifar10(work / "cifar10-huge-array")
    dump(folder / "data_batch_1", {b"data": DeclaredArray((2**40,)), b"labels": [0]})
    folder = make_cifar10(work / "cifar10-huge-label")
    dump(folder / "data_batch_4", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [2**70, 0]})
    folder = write_fmnist(work / "fmnist-huge-header")
    # 2³¹·2³¹·4 = 2⁶⁴ wraps to 0 in int64: an empty payload would match the header.
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2**31, 2**31, 4)
    (folder / "train-images-idx3-ubyte").write_bytes(header)


def build(work: Path) -> Path:
    """Write every fabricated input under ``work``; return ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / PWNED

    # --- checkpoints
    torch.save(_state_dict("convnet-xs", 10, 1), work / "teacher-digits.pt")  # a good one
    torch.save(_state_dict("convnet-xs", 10, 3), work / "teacher-10cls.pt")  # RGB, 10 classes
    blob = (work / "teacher-digits.pt").read_bytes()
    (work / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    torch.save({"fc.weight": Exploit(marker)}, work / "malicious.pt")
    torch.save([1, 2, 3], work / "not-a-state-dict.pt")
    (work / "not-torch.pt").write_text("these are not the weights you are looking for\n")
    write_not_checkpoints(work)

    # --- Fashion-MNIST (idx)
    folder = write_fmnist(work / "fmnist-truncated")
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    folder = write_fmnist(work / "fmnist-corrupt-gz")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 64)[:20])
    folder = write_fmnist(work / "fmnist-swapped")  # a labels file where images belong
    labels = (folder / "train-labels-idx1-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(labels)
    folder = write_fmnist(work / "fmnist-count-mismatch")
    labels = idx_bytes(np.zeros(5, np.uint8))  # 6 images, 5 labels
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)
    (work / "fmnist-empty").mkdir()

    # --- CIFAR (pickles in the official Python 2 format)
    folder = make_cifar10(work / "cifar10-truncated")
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    folder = make_cifar10(work / "cifar10-missing-key")
    dump(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8)})  # no b"labels"
    folder = make_cifar10(work / "cifar10-malicious")
    with (folder / "test_batch").open("wb") as file:
        pickle.dump({b"data": Exploit(marker), b"labels": [0]}, file, protocol=2)
    # Sound, and at least the default data.batch_size (64) of training images.
    make_cifar10(work / "cifar10", per_batch=13)
    make_cifar100(work / "cifar100", train=64)
    write_oversized(work)
    folder = make_cifar100(work / "cifar100-no-meta")
    (folder / "meta").unlink()

    # --- image folders
    write_images(work / "images-no-train", {"val": {"cat": 1}})
    write_images(work / "images-empty-class", {"train": {"cat": 2, "dog": 0}, "val": {"cat": 1}})
    root = write_images(work / "images-corrupt", {"train": {"cat": 2}, "val": {"cat": 1}})
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 9)
    write_images(work / "images-unknown-val-class", {"train": {"cat": 2}, "val": {"cow": 1}})
    write_images(work / "images-ok", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})

    # --- files the CLI is pointed at directly
    (work / "a-file").write_text("a regular file, so a folder under it cannot be created\n")
    (work / "not-utf8.yaml").write_bytes(b"seed: 0\nstudent: \xff\xfe\x00convnet\n")
    (work / "folder.yaml").mkdir()
    run = work / "broken-run"  # weights beside a config.yaml that no longer validates
    run.mkdir()
    (run / "config.yaml").write_text("student: {model: convnet-xs}\nstages: [{epochs: 0}]\n")
    torch.save(_state_dict("convnet-xs", 10, 1), run / "student.pt")
    return work


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} FOLDER")
    print(build(Path(sys.argv[1])))
