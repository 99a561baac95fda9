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
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from smskd.errors import UserError

UBYTE = 0x08
MAGIC = {1: 0x00000801, 3: 0x00000803}  # ndim → magic of the uint8 files we read
_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32"}
CHUNK = 1 << 20
# Deflate expands at most 1032:1, so no gzip file decompresses to more than this
# many times its own size: a bound on what a header may promise, known before reading.
GZIP_MAX_RATIO = 1032


def find_idx(root: Path, name: str, hint: str) -> Path:
    """``root/name``, else ``root/name.gz``; a UserError naming both if neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing {root / name} (or {name}.gz); {hint}")


def _capacity(path: Path) -> int:
    """The most bytes ``path`` can hold once decompressed."""
    size = path.stat().st_size
    return size * GZIP_MAX_RATIO if path.suffix == ".gz" else size


def _read_at_most(file: BinaryIO, limit: int) -> bytearray:
    # In chunks: one read(limit) would allocate all of limit before learning the file is short.
    data = bytearray()
    while len(data) < limit and (chunk := file.read(min(CHUNK, limit - len(data)))):
        data += chunk
    return data


def read_idx(path: Path, ndim: int, hint: str = "") -> np.ndarray:
    """The uint8 array stored in ``path``, which must have exactly ``ndim`` dimensions.

    Rejects: a wrong magic number, a non-uint8 type code, a payload shorter or
    longer than the header's sizes promise. The promised size is checked against
    what the file can hold before anything is read or allocated for it.
    """
    compressed = path.suffix == ".gz"
    try:
        with (gzip.open if compressed else open)(path, "rb") as file:
            try:
                return _read(file, path, ndim, hint)
            except UserError:
                # Damaged gzip data can unpack to a wrong header before the stream fails:
                # name the damage, the cause, when it shows within the next chunk.
                if compressed:
                    file.read(CHUNK)
                raise
    # A cut-off download raises EOFError inside gzip; a corrupt one BadGzipFile or zlib.error.
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise UserError(f"{path}: corrupt or truncated gzip data ({error}); {hint}") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}; {hint}") from None


def _read(file: BinaryIO, path: Path, ndim: int, hint: str) -> np.ndarray:
    expected = MAGIC[ndim]
    head = file.read(4)
    if len(head) < 4:
        raise UserError(f"{path}: {len(head)} bytes, too short for an IDX header; {hint}")
    zero, type_code, dims = struct.unpack(">HBB", head)
    if zero != 0:
        raise UserError(
            f"{path}: magic 0x{int.from_bytes(head, 'big'):08x} is not an IDX file "
            f"(expected 0x{expected:08x}); {hint}"
        )
    if type_code != UBYTE:
        kind = _TYPE_NAMES.get(type_code, f"unknown type 0x{type_code:02x}")
        raise UserError(f"{path}: IDX element type {kind}, expected uint8 (0x08); {hint}")
    if dims != ndim:
        raise UserError(
            f"{path}: magic 0x{int.from_bytes(head, 'big'):08x} has {dims} dimensions, "
            f"expected 0x{expected:08x} ({ndim} dimensions); {hint}"
        )
    sizes = file.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise UserError(f"{path}: truncated IDX header; {hint}")
    shape = struct.unpack(f">{ndim}I", sizes)
    size = math.prod(shape)  # Python ints: int64 would wrap around for three 32-bit sizes
    promise = f"header promises {'×'.join(map(str, shape))} = {size} bytes"
    room = _capacity(path) - 4 - 4 * ndim
    if size > room:
        held = f"payload has {room}"
        if path.suffix == ".gz":
            held = f"{path.stat().st_size} bytes of gzip data unpack to at most {room}"
        raise UserError(f"{path}: truncated: {promise}, {held}; {hint}")
    payload = _read_at_most(file, size + 1)
    if len(payload) != size:
        held = len(payload) if len(payload) < size else f"more than {size}"
        problem = "truncated" if len(payload) < size else "has trailing bytes"
        raise UserError(f"{path}: {problem}: {promise}, payload has {held}; {hint}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


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
