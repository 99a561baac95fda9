"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official "python version" archives.

Format: Python 2 pickles of dicts with ``bytes`` keys. ``b"data"`` is a uint8
numpy array N×3072 — per image the 1024 red, then green, then blue pixels of a
32×32 image in row-major order — so it reshapes directly to N×3×32×32.

* CIFAR-10, folder ``cifar-10-batches-py``: ``data_batch_1`` … ``data_batch_5``
  (10,000 images each), ``test_batch``, labels in ``b"labels"``; ``batches.meta``
  has ``b"label_names"`` (10).
* CIFAR-100, folder ``cifar-100-python``: ``train`` (50,000), ``test`` (10,000),
  labels in ``b"fine_labels"`` (100 classes) and ``b"coarse_labels"`` (20
  superclasses); ``meta`` has ``b"fine_label_names"`` and ``b"coarse_label_names"``.

Where: ``root`` may be that folder itself or its parent. Default root:
``$SMSKD_DATA/cifar`` if ``SMSKD_DATA`` is set, else ``~/.cache/smskd/cifar``.

How to get it: ``--download`` (:func:`smskd.data.download.download`), or fetch
``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in the root.

Pickles can run arbitrary code when loaded, so :class:`CifarUnpickler` resolves
only the three globals the official files reference (numpy's ``_reconstruct``,
``ndarray`` and ``dtype``, as a look at their opcodes shows) and refuses the rest.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smskd.data.download import data_home
from smskd.data.memory import ArrayDataset, ArraySplit
from smskd.errors import UserError, choices

try:  # numpy ≥ 2 moved the implementation; the files name the 1.x module path
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32

# Per-channel mean and std over all pixels of the 50,000 training images scaled to
# [0, 1], rounded to 4 places; source: weiaicunzai/pytorch-cifar100,
# conf/global_settings.py (CIFAR-100 there to 16 digits: 0.50707516…, 0.26733429…).
# Not the often-copied CIFAR-10 std (0.2023, 0.1994, 0.2010), an average of per-image
# stds that understates the spread; the (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565,
# 0.2761) seen in many KD repositories for CIFAR-100 differ only in the 3rd–4th decimal.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
LABEL_KINDS = {"fine": 100, "coarse": 20}


def _hint(name: str) -> str:
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    return (
        f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
        "into data.root, or pass --download"
    )


def default_root() -> Path:
    return data_home() / "cifar"


# ----------------------------------------------------------------------------- unpickling


class ForbiddenPickle(pickle.UnpicklingError):
    """The pickle asks for something the official CIFAR files never contain."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy's _reconstruct instantiates ``subtype``: allow plain ndarrays only.
    if subtype is not np.ndarray:
        raise ForbiddenPickle("array subtype other than numpy.ndarray")
    return _np_reconstruct(subtype, shape, dtype)


def _dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    # Object arrays would unpickle arbitrary elements; the data are plain bytes.
    if dtype.hasobject:
        raise ForbiddenPickle("object dtype")
    return dtype


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # what the official files name
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # what numpy ≥ 2 writes
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
}


class CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals of :data:`_ALLOWED`; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise ForbiddenPickle(f"forbidden global {module}.{name}") from None


def unpickle(path: Path, hint: str) -> dict[bytes, Any]:
    """The dict in ``path``, read with :class:`CifarUnpickler` and ``encoding="bytes"``.

    ``encoding="bytes"`` keeps Python 2 ``str`` objects (keys, the pixel buffer)
    as bytes instead of guessing a text encoding for binary pixel data.
    """
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing {path}; {hint}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}; {hint}") from None
    try:
        content = CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except ForbiddenPickle as error:
        raise UserError(
            f"{path}: refusing to unpickle ({error}): not an official CIFAR file, and "
            f"loading it could run code; {hint}"
        ) from None
    # A cut-off file ends the opcode stream early (EOFError) or mid-argument (others).
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as error:
        raise UserError(f"{path}: corrupt or truncated pickle ({error!r}); {hint}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: holds a {type(content).__name__}, expected a dict; {hint}")
    return content


def _field(content: dict[bytes, Any], key: bytes, path: Path, hint: str) -> Any:
    if key not in content:
        keys = ", ".join(repr(k) for k in content)
        raise UserError(f"{path}: missing key {key!r} (has {keys}); {hint}")
    return content[key]


def read_batch(path: Path, label_key: bytes, num_classes: int, hint: str) -> ArraySplit:
    """Images N×3×32×32 uint8 and labels N int64 of one pickled batch, checked."""
    content = unpickle(path, hint)
    data = _field(content, b"data", path, hint)
    labels = _field(content, label_key, path, hint)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: b'data' is {kind}, expected a uint8 array; {hint}")
    if data.ndim != 2 or data.shape[1] != PIXELS:
        raise UserError(
            f"{path}: b'data' has shape {data.shape}, expected (N, {PIXELS}) = N×3×32×32; {hint}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {label_key!r} is not a list of integers; {hint}") from None
    if y.shape != (len(data),):
        raise UserError(f"{path}: {len(data)} images but {label_key!r} has shape {y.shape}; {hint}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(
            f"{path}: {label_key!r} outside 0..{num_classes - 1} "
            f"(min {y.min()}, max {y.max()}); {hint}"
        )
    # The reshape is a view; the array from the pickle may be read-only, so copy.
    images = np.array(data.reshape(-1, *IMAGE_SHAPE), copy=True)
    return ArraySplit(torch.from_numpy(images), torch.from_numpy(y))


def _concat(parts: list[ArraySplit]) -> ArraySplit:
    if len(parts) == 1:
        return parts[0]
    return ArraySplit(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def find_folder(root: str | Path | None, name: str, marker: str) -> Path:
    """The CIFAR folder: ``root/<folder>``, or ``root`` itself if it holds ``marker``."""
    base = Path(root).expanduser() if root is not None else default_root()
    folder = base / FOLDERS[name]
    if folder.is_dir():
        return folder
    if (base / marker).is_file():
        return base
    raise UserError(f"{name} not found: no {folder} and no {base / marker}; {_hint(name)}")


def _check_meta(path: Path, key: bytes, count: int, hint: str) -> None:
    names = _field(unpickle(path, hint), key, path, hint)
    if not isinstance(names, list) or len(names) != count:
        size = len(names) if isinstance(names, list) else type(names).__name__
        raise UserError(f"{path}: {key!r} lists {size} names, expected {count}; {hint}")


def load_cifar10(root: str | None = None) -> ArrayDataset:
    """50,000 train / 10,000 test images, N×3×32×32 uint8, 10 classes."""
    hint = _hint("cifar10")
    folder = find_folder(root, "cifar10", "batches.meta")
    _check_meta(folder / "batches.meta", b"label_names", 10, hint)
    train = [read_batch(folder / f"data_batch_{i}", b"labels", 10, hint) for i in range(1, 6)]
    test = read_batch(folder / "test_batch", b"labels", 10, hint)
    return ArrayDataset(
        name="cifar10",
        train=_concat(train),
        test=test,
        num_classes=10,
        pixel_max=255.0,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    )


def load_cifar100(root: str | None = None, labels: str = "fine") -> ArrayDataset:
    """50,000 train / 10,000 test images, N×3×32×32 uint8.

    ``labels``: ``"fine"`` (100 classes) or ``"coarse"`` (the 20 superclasses).
    """
    if labels not in LABEL_KINDS:
        raise UserError(f"unknown CIFAR-100 labels {labels!r}; valid: {choices(LABEL_KINDS)}")
    hint = _hint("cifar100")
    num_classes = LABEL_KINDS[labels]
    key = f"{labels}_labels".encode()
    folder = find_folder(root, "cifar100", "meta")
    _check_meta(folder / "meta", f"{labels}_label_names".encode(), num_classes, hint)
    train = read_batch(folder / "train", key, num_classes, hint)
    test = read_batch(folder / "test", key, num_classes, hint)
    return ArrayDataset(
        name="cifar100" if labels == "fine" else "cifar100-coarse",
        train=train,
        test=test,
        num_classes=num_classes,
        pixel_max=255.0,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )
