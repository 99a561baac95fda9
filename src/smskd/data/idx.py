"""Strict reader for the IDX format of MNIST and Fashion-MNIST.

Layout (big-endian throughout): two zero bytes, a type code (``0x08`` = unsigned
byte, the only one these datasets use), the number of dimensions ``d``, then ``d``
32-bit sizes, then the payload in row-major (C) order. Image files therefore
start with the magic ``0x00000803`` (N×rows×cols) and label files with
``0x00000801`` (N). A file may be gzip-compressed; ``name`` and ``name.gz`` are
both accepted. Reference: http://yann.lecun.com/exdb/mnist/ (bottom of page).

Every check failure is a :class:`~smskd.errors.UserError` naming the file, what
was expected and (through ``hint``) how to obtain intact files: a silently
misread dataset would only surface as a mysteriously bad accuracy.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from smskd.errors import UserError

UBYTE = 0x08
MAGIC = {1: 0x00000801, 3: 0x00000803}  # ndim → magic of the uint8 files we read
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32"}


def find_idx(root: Path, name: str, hint: str) -> Path:
    """``root/name``, else ``root/name.gz``; a UserError naming both if neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing {root / name} (or {name}.gz); {hint}")


def _read_bytes(path: Path, hint: str) -> bytes:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes())
        return path.read_bytes()
    # A cut-off download raises EOFError inside gzip; a corrupt one BadGzipFile or zlib.error.
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"{path}: corrupt or truncated gzip data ({error}); {hint}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}; {hint}") from None


def read_idx(path: Path, ndim: int, hint: str = "") -> np.ndarray:
    """The uint8 array stored in ``path``, which must have exactly ``ndim`` dimensions.

    Rejects: a wrong magic number, a non-uint8 type code, a payload shorter or
    longer than the header's sizes promise.
    """
    data = _read_bytes(path, hint)
    expected = MAGIC[ndim]
    if len(data) < 4:
        raise UserError(f"{path}: {len(data)} bytes, too short for an IDX header; {hint}")
    zero, type_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise UserError(
            f"{path}: magic 0x{int.from_bytes(data[:4], 'big'):08x} is not an IDX file "
            f"(expected 0x{expected:08x}); {hint}"
        )
    if type_code != UBYTE:
        kind = _TYPE_NAMES.get(type_code, f"unknown type 0x{type_code:02x}")
        raise UserError(f"{path}: IDX element type {kind}, expected uint8 (0x08); {hint}")
    if dims != ndim:
        raise UserError(
            f"{path}: magic 0x{int.from_bytes(data[:4], 'big'):08x} has {dims} dimensions, "
            f"expected 0x{expected:08x} ({ndim} dimensions); {hint}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header; {hint}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header
    if payload != size:
        problem = "truncated" if payload < size else "has trailing bytes"
        raise UserError(
            f"{path}: {problem}: header promises {'×'.join(map(str, shape))} = {size} bytes, "
            f"payload has {payload}; {hint}"
        )
    # frombuffer over an immutable bytes object is read-only; copy so torch can own it.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_idx_pair(root: Path, images: str, labels: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×rows×cols) and labels (N) from two IDX files that must agree on N."""
    image_path, label_path = find_idx(root, images, hint), find_idx(root, labels, hint)
    x, y = read_idx(image_path, 3, hint), read_idx(label_path, 1, hint)
    if len(x) != len(y):
        raise UserError(
            f"{image_path} holds {len(x)} images but {label_path} holds {len(y)} labels; "
            f"they must match; {hint}"
        )
    return x, y
