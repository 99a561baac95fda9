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
Pickles can also declare sizes that CPython's unpickler allocates before reading
(a bytes length, a memo index, an array shape): each is checked against the size of
the file first (:func:`check_declared_sizes`, and the array bound of
:class:`CifarUnpickler`), so a crafted 1 KB file cannot ask for a terabyte.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import pickletools
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


class OversizedPickle(pickle.UnpicklingError):
    """The pickle declares more data than its file holds."""


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` as the pickle sees it: a subtype to name, not a
    constructor to call, since ``ndarray(shape)`` would allocate any shape it is given."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any, *, limit: int) -> np.ndarray:
    # numpy's _reconstruct instantiates ``subtype``: allow plain ndarrays only.
    if subtype is not _NdarrayType:
        raise ForbiddenPickle("array subtype other than numpy.ndarray")
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise ForbiddenPickle(f"array shape {shape!r}")
    nbytes = math.prod(dims) * np.dtype(dtype).itemsize
    # The official files reconstruct empty arrays and fill them from the file's bytes.
    if nbytes > limit:
        raise OversizedPickle(f"an array of {nbytes} bytes")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    # Object arrays would unpickle arbitrary elements; the data are plain bytes.
    if dtype.hasobject:
        raise ForbiddenPickle("object dtype")
    return dtype


_RECONSTRUCT = {
    ("numpy.core.multiarray", "_reconstruct"),  # what the official files name
    ("numpy._core.multiarray", "_reconstruct"),  # what numpy ≥ 2 writes
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _dtype,
}


class CifarUnpickler(pickle.Unpickler):
    """Resolves only numpy's ``_reconstruct``, ``ndarray`` and ``dtype``; anything else
    is refused, and no array may be larger than ``limit`` bytes."""

    def __init__(self, file: io.BufferedIOBase, *, limit: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.limit = limit

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECONSTRUCT:
            return functools.partial(_reconstruct, limit=self.limit)
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise ForbiddenPickle(f"forbidden global {module}.{name}") from None


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def check_declared_sizes(blob: bytes) -> None:
    """Raise OversizedPickle (or ValueError, if ``blob`` is no pickle) unless every
    length and memo index the opcodes of ``blob`` declare fits in ``blob``.

    CPython's unpickler allocates a counted bytes object before reading it, and a
    memo list as long as the largest index it is told to store: both come straight
    from the file. :func:`pickletools.genops` reads the same opcodes without acting on
    them, failing where a declared length runs past the end of the data.
    """
    for position, (opcode, arg, _) in enumerate(pickletools.genops(blob)):
        # A pickler numbers its memo entries in order, one per opcode at most.
        if opcode.name in _MEMO_PUTS and arg > position:
            raise OversizedPickle(f"memo index {arg} after {position} opcodes")


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
        check_declared_sizes(blob)
        content = CifarUnpickler(io.BytesIO(blob), limit=len(blob), encoding="bytes").load()
    except OversizedPickle as error:
        raise UserError(
            f"{path}: declares {error} but the file has {len(blob)} bytes: corrupt, or not "
            f"an official CIFAR file; {hint}"
        ) from None
    except ForbiddenPickle as error:
        raise UserError(
            f"{path}: refusing to unpickle ({error}): not an official CIFAR file, and "
            f"loading it could run code; {hint}"
        ) from None
    # A cut-off file ends the opcode stream early (EOFError) or mid-argument (others).
    # OverflowError: a number too large for the C type it is read into.
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        OverflowError,
    ) as error:
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
    y = _labels(labels, len(data), num_classes, f"{path}: {label_key!r}", hint)
    # The reshape is a view; the array from the pickle may be read-only, so copy.
    images = np.array(data.reshape(-1, *IMAGE_SHAPE), copy=True)
    return ArraySplit(torch.from_numpy(images), torch.from_numpy(y))


def _labels(labels: Any, count: int, num_classes: int, where: str, hint: str) -> np.ndarray:
    """``labels`` as int64, checked while still Python objects: numpy would turn a
    nested list into a huge array, and overflow on an integer beyond 64 bits."""
    if isinstance(labels, np.ndarray):
        integers = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        integers = isinstance(labels, list) and all(type(v) is int for v in labels)
    if not integers:
        raise UserError(f"{where} is not a list of integers; {hint}")
    if len(labels) != count:
        raise UserError(f"{where} holds {len(labels)} labels for {count} images; {hint}")
    if count and (min(labels) < 0 or max(labels) >= num_classes):
        raise UserError(
            f"{where} outside 0..{num_classes - 1} (min {min(labels)}, max {max(labels)}); {hint}"
        )
    return np.asarray(labels, dtype=np.int64)


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
