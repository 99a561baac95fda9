"""Test helpers: writers of tiny files in the exact formats of the real datasets, an
injected crash, and the tiny models and data behind conftest.py's fixtures."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import smskd.train.epoch as engine
from smskd.models.convnet import ConvNet


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes what cPickle (protocol 2) wrote for the official archives under Python 2.

    There, ``str`` is bytes: SHORT_BINSTRING/BINSTRING opcodes, read back as bytes with
    ``encoding="bytes"``; and numpy's ``_reconstruct`` lives in ``numpy.core.multiarray``.
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(
            obj.__module__, obj.__module__
        )
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[type] = save_global
    dispatch[type(len)] = save_global


def dump(path: Path, content: object) -> None:
    with path.open("wb") as file:
        Py2Pickler(file, protocol=2).dump(content)


def cifar_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def make_cifar10(parent: Path, per_batch: int = 2) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"label_names": names})
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        dump(
            folder / name,
            {
                b"batch_label": f"batch {i}".encode(),
                b"labels": [(i + j) % 10 for j in range(per_batch)],
                b"data": cifar_pixels(per_batch, i),
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
    return folder


def make_cifar100(parent: Path, train: int = 4, test: int = 2) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    for i, (name, n) in enumerate([("train", train), ("test", test)]):
        dump(
            folder / name,
            {
                b"filenames": [b"x.png"] * n,
                b"batch_label": name.encode(),
                b"fine_labels": [(99 - k) % 100 for k in range(n)],
                b"coarse_labels": [(19 - k) % 20 for k in range(n)],
                b"data": cifar_pixels(n, 10 + i),
            },
        )
    return folder


def fail_on_call(monkeypatch, target: str, call: int, exc: BaseException) -> None:
    """Make the ``call``-th call of ``smskd.train.epoch.<target>`` raise ``exc`` (a crash
    mid-epoch)."""
    real = getattr(engine, target)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, target, wrapper)


def make_tiny_data() -> tuple[DataLoader, DataLoader]:
    """A learnable 3-class task on 1×8×8 inputs (labels from a fixed linear map)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 8, 8, generator=generator)
    y = (x.flatten(1) @ torch.randn(64, 3, generator=generator)).argmax(1)
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32, shuffle=False)
    test = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=64)
    return train, test


def make_student() -> ConvNet:
    torch.manual_seed(1)
    return ConvNet(num_classes=3, in_channels=1, widths=(4, 8, 8))


def make_live_teacher() -> ConvNet:
    """A teacher as a user hands it over: train mode, gradients on. The pipeline must freeze it."""
    torch.manual_seed(2)
    return ConvNet(num_classes=3, in_channels=1, widths=(8, 16, 16))
