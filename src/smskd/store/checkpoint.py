"""Atomic, verified checkpoint writes and safe (``weights_only``) loads.

Every file written here goes to a temporary file in the same directory, is
fsynced, and is renamed over its target: a crash leaves the old file or the new
one, never a torn one. Beside it goes ``NAME.sha256``, a checksum sidecar in
``sha256sum`` format (``sha256sum -c student.pt.sha256`` checks it by hand) with
the file's size on a ``#`` comment line. The checkpoint itself stays a plain
``torch.save`` file, so ``torch.load(path, weights_only=True)`` reads
``student.pt`` as a plain state_dict, and files from elsewhere (no sidecar) still
load, unverified.

:func:`safe_load` checks size and SHA-256 against the sidecar, when there is one,
on the same open file it then unpickles; a truncated or corrupted checkpoint is a
:class:`~smskd.errors.UserError` naming the file. The sidecar of the old file is
removed before the rename and the new one written after it, so a crash between
the two leaves a whole file without a sidecar (loaded unverified), never a good
file with a stale checksum.

``atomic_save(..., keep_previous=True)`` first rotates ``last.pt`` (and its
sidecar) to ``last.prev.pt``, and :func:`load_latest` tries ``last.pt`` then
``last.prev.pt``, so that a damaged newest checkpoint costs one checkpoint
interval, not the run.

``*.safetensors`` paths are written with the optional ``safetensors`` package
(``pip install safetensors``), for weights (a flat dict of tensors) only. Loads
go by what a file holds, whatever its name: its first bytes must be a torch
checkpoint (zip, or the legacy pickle's magic number) or safetensors, and
anything else (a config, an empty file, a plain pickle) is named for what it is
before any unpickling. Only regular files are opened: a FIFO would block.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import pickle
import random
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from smskd.errors import UserError

logger = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
_CHUNK = 1 << 20
_SIDECAR_MAX = 4096  # a sidecar is one line and a comment: anything longer is not one
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save(..., _use_new_zipfile_serialization=False) opens with this number, pickled.
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
_NOT_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def checksum_path(path: str | Path) -> Path:
    """The sidecar of ``path``: ``student.pt`` → ``student.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def previous_path(path: str | Path) -> Path:
    """Where ``atomic_save(keep_previous=True)`` keeps the old file (``last.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; renames are durable there
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _not_a_file(path: Path, what: str, mode: int) -> UserError:
    kind = next((name for is_kind, name in _NOT_FILES if is_kind(mode)), "not a regular file")
    hint = ""
    if stat.S_ISDIR(mode):
        inside = [path / name for name in ("student.pt", "teacher.pt") if (path / name).is_file()]
        hint = f"; did you mean {str(inside[0])!r}?" if inside else "; name a file in it"
    return UserError(f"{what} {str(path)!r} is {kind}, not a file{hint}")


def _open_file(path: Path, what: str = "checkpoint") -> BinaryIO:
    """``path`` open for reading if it is a regular file; else a UserError saying what it is.

    Opened non-blocking and judged on the open descriptor: opening a FIFO blocks until
    someone writes to it, and a check before the open could be raced.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if path.is_symlink():
            raise UserError(
                f"{what} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does "
                "not exist"
            ) from None
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):  # e.g. a directory on Windows, a socket on Linux
            raise _not_a_file(path, what, mode) from None
        raise UserError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_a_file(path, what, mode)
    return os.fdopen(fd, "rb")


def _write_temp(directory: Path, name: str, write: Callable[[BinaryIO], None]) -> Path:
    """``write`` into a fresh temporary file in ``directory``, fsynced; removed if it fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _digest(handle: BinaryIO) -> tuple[str, int]:
    """SHA-256 (hex) and size of what ``handle`` reads from its current position."""
    sha, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def _sidecar_text(name: str, digest: str, size: int) -> str:
    return f"{digest}  {name}\n# size {size}\n"


def _write_sidecar(path: Path, digest: str, size: int) -> None:
    text = _sidecar_text(path.name, digest, size).encode()
    tmp = _write_temp(path.parent, checksum_path(path).name, lambda h: h.write(text))
    try:
        os.replace(tmp, checksum_path(path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_sidecar(path: Path) -> tuple[str, int | None] | None:
    """``(sha256, size)`` recorded for ``path``; None if it has no sidecar."""
    sidecar = checksum_path(path)
    if not os.path.lexists(sidecar):
        return None
    with _open_file(sidecar, "checksum file") as handle:
        try:
            data = handle.read(_SIDECAR_MAX + 1)
        except OSError as err:
            raise UserError(f"checksum file {str(sidecar)!r} is unreadable: {err}") from None
    try:
        lines = data.decode().splitlines() if len(data) <= _SIDECAR_MAX else []
    except UnicodeDecodeError:
        lines = []
    digest, size = None, None
    for line in lines:
        words = line.split()
        if words[:2] == ["#", "size"] and len(words) == 3 and words[2].isdigit():
            size = int(words[2])
        elif words and not line.startswith("#") and digest is None:
            digest = words[0].lower()
    if digest is None or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(
            f"checksum file {str(sidecar)!r} is malformed; delete it to load {str(path)!r} "
            "unverified"
        )
    return digest, size


def _verify(path: Path, handle: BinaryIO) -> str | None:
    """Raise a UserError if ``handle`` (``path``, at offset 0) differs from its sidecar;
    return its SHA-256, so verified (None: it has no sidecar)."""
    recorded = _read_sidecar(path)
    if recorded is None:
        return None
    digest, size = recorded
    sidecar = checksum_path(path).name
    hint = f"(delete {sidecar} only if you replaced the file on purpose)"
    actual_size = os.fstat(handle.fileno()).st_size
    if size is not None and actual_size != size:
        raise UserError(
            f"checkpoint {str(path)!r} is truncated or damaged: {actual_size} bytes, but "
            f"{sidecar} records {size} {hint}"
        )
    actual, _ = _digest(handle)
    handle.seek(0)
    if actual != digest:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupted: its SHA-256 does not match {sidecar} {hint}"
        )
    return actual


def _check_size(path: Path, handle: BinaryIO) -> None:
    recorded = _read_sidecar(path)
    size = recorded[1] if recorded is not None else None
    actual = os.fstat(handle.fileno()).st_size
    if size is not None and actual != size:
        raise UserError(
            f"checkpoint {str(path)!r} is truncated or damaged: {actual} bytes, but "
            f"{checksum_path(path).name} records {size}"
        )


def verify_checkpoint(path: str | Path) -> bool:
    """True if ``path`` matches its sidecar, False if it has none; a UserError if it differs."""
    path = Path(path)
    with _open_file(path) as handle:
        _verify(path, handle)
    return checksum_path(path).exists()


def _rotate(path: Path) -> None:
    """``path`` (and its checksum) becomes ``previous_path(path)``, unless it is damaged.

    In an order where a crash at any point leaves ``path`` or the previous file
    whole and not under a checksum that is not its own.
    """
    previous = previous_path(path)
    try:
        verify_checkpoint(path)
        recorded = _read_sidecar(path)
    except UserError as err:
        logger.warning("%s; not keeping it as %s", err, previous.name)
        checksum_path(path).unlink(missing_ok=True)
        return
    checksum_path(path).unlink(missing_ok=True)  # path: whole, unverified
    if recorded is not None:
        digest, size = recorded
        # Written anew, not renamed: the sha256sum line names the file it checks.
        _write_sidecar(previous, digest, size if size is not None else path.stat().st_size)
    else:
        checksum_path(previous).unlink(missing_ok=True)
    os.replace(path, previous)
    _fsync_dir(path.parent)


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None], keep_previous: bool) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, write)
    try:
        with tmp.open("rb") as handle:
            digest, size = _digest(handle)  # what reached the disk, not what we meant to write
        if keep_previous and path.exists():
            _rotate(path)
        else:
            # The old file's sidecar goes first: never a new file under the old checksum.
            checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(path, digest, size)
    _fsync_dir(path.parent)
    return digest


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """``data`` to ``path`` atomically, with a ``.sha256`` sidecar; readable by others
    (the temporary file is private), as a file meant to be shipped should be."""
    _atomic_write(path, lambda handle: handle.write(data), keep_previous=False)
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(0o666 & ~umask)


def atomic_save(obj: Any, path: str | Path, *, keep_previous: bool = False) -> str:
    """``torch.save`` to ``path`` atomically, with a ``.sha256`` sidecar (see the module doc);
    returns the file's SHA-256.

    With ``keep_previous``, the file already at ``path`` (if it verifies) is kept as
    ``previous_path(path)`` (``last.pt`` → ``last.prev.pt``) for :func:`load_latest`.
    """
    return _atomic_write(path, lambda handle: torch.save(obj, handle), keep_previous)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the text file ``path`` in one rename (no sidecar: for indexes and results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path.parent, path.name, lambda handle: handle.write(text.encode()))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def move_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Rename a checkpoint and its sidecar (``student.pt`` → ``teacher.pt``), atomically each."""
    src, dst = Path(src), Path(dst)
    recorded = _read_sidecar(src)
    checksum_path(dst).unlink(missing_ok=True)
    os.replace(src, dst)
    if recorded is not None:
        digest, size = recorded
        if size is None:
            size = dst.stat().st_size
        _write_sidecar(dst, digest, size)
        checksum_path(src).unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def _safetensors(path: Path) -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(
            f"{str(path)!r} is a safetensors file, and the safetensors package is not "
            "installed: pip install safetensors (or pip install 'smskd[safetensors]')"
        ) from None
    return safetensors.torch


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def safe_load(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    verify: bool = True,
    sha256: str | None = None,
    mmap: bool = False,
) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    The file is checked against its ``.sha256`` sidecar first, when it has one (and
    ``verify``), and against ``sha256`` when given (the digest recorded when this run
    wrote it); safetensors files are read with the safetensors package. ``mmap``: a
    torch file's tensors are memory-mapped on the CPU, not read in; the file is then
    checked against the sidecar's size only (hashing would read all of what mapping
    leaves on disk), and must still be the file checked when it is mapped.
    """
    path = Path(path)
    with _open_file(path) as handle:
        verified = None
        if verify and mmap:
            _check_size(path, handle)
        elif verify:
            verified = _verify(path, handle)
        if sha256 is not None:
            _check_recorded(path, handle, sha256, verified)
        head = handle.read(64)
        handle.seek(0)
        if head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]):
            loaded = _torch_load(path, handle, map_location, mmap)
            if mmap and not os.path.samestat(os.stat(path), os.fstat(handle.fileno())):
                raise UserError(f"{path} was replaced while it was loaded; load it again")
            return loaded
        size = os.fstat(handle.fileno()).st_size
        if _is_safetensors(path) or _looks_like_safetensors(head, size):
            return _load_safetensors(path, handle.read(), map_location)
    raise _not_a_checkpoint(path, head)


def _check_recorded(path: Path, handle: BinaryIO, sha256: str, verified: str | None) -> None:
    if verified is None:
        verified, _ = _digest(handle)
        handle.seek(0)
    if verified != sha256:
        raise UserError(
            f"checkpoint {str(path)!r} belongs to another run: its SHA-256 is not the one "
            "recorded when this run wrote it; resume the run it came from, or start over "
            "with --force"
        )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A little-endian header length that fits the file, then the header's JSON ``{``."""
    return head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _not_a_checkpoint(path: Path, head: bytes) -> UserError:
    """What ``path``, which opens like neither torch nor safetensors files, looks like."""
    if not head:
        what = "it is empty"
    elif head.startswith(b"\x1f\x8b"):
        what = "it is gzip-compressed; decompress it first"
    elif head[:1] == b"\x80":
        what = "it is a plain Python pickle, which can run code when loaded; smskd never loads one"
    elif _is_text(head):
        what = "it holds text (a config or log file?)"
    else:
        what = f"it starts with the bytes {head[:8].hex(' ')}"
    return UserError(f"checkpoint {str(path)!r} is not a torch or safetensors checkpoint: {what}")


def _is_text(head: bytes) -> bool:
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a cut last character
    except UnicodeDecodeError:
        return False
    return "".join(text.split()).isprintable()


def _torch_load(
    path: Path, handle: BinaryIO, map_location: str | torch.device, mmap: bool = False
) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols and TorchScript archives: reported below.
            warnings.simplefilter("ignore", UserWarning)
            if mmap:  # the tensors stay in the file, paged in as they are read
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            return torch.load(handle, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        imported = re.search(r"GLOBAL (\S+)", str(err))
        if imported is None:
            raise UserError(
                f"checkpoint {str(path)!r} is unreadable (truncated, or it holds more than "
                "tensors and plain containers)"
            ) from None
        raise UserError(
            f"checkpoint {str(path)!r} was refused: it would import {imported.group(1)}, and "
            "smskd loads tensors and plain containers only, never code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as err:
        if "TorchScript" in str(err):
            raise UserError(
                f"checkpoint {str(path)!r} is a TorchScript archive (a program, not weights); "
                "give the state_dict file it was exported from (student.pt)"
            ) from None
        raise UserError(
            f"checkpoint {str(path)!r} is unreadable (truncated or not a torch file): "
            f"{_torch_detail(err)}"
        ) from None


def _torch_detail(err: BaseException) -> str:
    """The first line of a torch error that gives no advice: torch's is to load without
    ``weights_only`` or to allowlist classes, which is never right for a file from elsewhere."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and not re.search(r"weights_only|safe_globals|trust", line):
            return line
    return type(err).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_safetensors(
    path: Path, data: bytes, map_location: str | torch.device
) -> dict[str, torch.Tensor]:
    st = _safetensors(path)
    try:
        tensors = st.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError (and others)
        raise UserError(
            f"checkpoint {str(path)!r} is unreadable (truncated or not a safetensors file): "
            f"{_first_line(err)}"
        ) from None
    if str(map_location) != "cpu":
        tensors = {key: value.to(map_location) for key, value in tensors.items()}
    return tensors


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A model's weights, atomically: ``*.safetensors`` with safetensors, else ``torch.save``."""
    path = Path(path)
    if not _is_safetensors(path):
        atomic_save(state_dict, path)  # as is: a state_dict's _metadata (versions) stays
        return
    st = _safetensors(path)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{str(path)!r}: safetensors holds tensors only, not a full checkpoint")
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory (tied weights).
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    data = st.save(tensors)
    _atomic_write(path, lambda handle: handle.write(data), keep_previous=False)


def export_weights(src: str | Path, dst: str | Path) -> None:
    """The model weights of checkpoint ``src`` as ``dst`` (e.g. ``student.safetensors``)."""
    save_weights(load_state_dict(src), dst)


def load_latest(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    log: Callable[[str], None] | None = None,
    check: Callable[[Any, Path], None] | None = None,
) -> tuple[Any, Path]:
    """The newest good run checkpoint in ``directory``: ``last.pt``, else ``last.prev.pt``.

    A candidate that is missing, fails verification or cannot be read is skipped
    with a message to ``log`` (default: a logging warning); none good is a UserError.
    ``check(state, path)`` judges the one taken; its UserError is not skipped past: a
    whole checkpoint that is wrong for the run is no damage that an older one repairs.
    """
    directory = Path(directory)
    warn = log or logger.warning
    problems = []
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.exists():
            problems.append(f"{name} does not exist")
            continue
        try:
            state = safe_load(path, map_location)
        except UserError as err:
            problems.append(str(err))
            continue
        if check is not None:
            try:
                check(state, path)
            except UserError as err:
                raise UserError("; ".join([*problems, str(err)])) from None
        if problems:
            warn(f"resuming from {path}, the previous checkpoint: {'; '.join(problems)}")
        return state, path
    raise UserError(
        f"no usable checkpoint to resume from in {directory}: {'; '.join(problems)}; "
        "start over with --force"
    )


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a run checkpoint for :func:`load_latest` to try."""
    return any((Path(directory) / name).exists() for name in (LAST, PREVIOUS))


def load_state_dict(path: str | Path, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A model's weights from ``path``: a plain state_dict or a run checkpoint (``sha256``:
    see :func:`safe_load`)."""
    state = safe_load(path, sha256=sha256)
    # Our run checkpoints keep it under "student"; RepDistiller/mdistiller's under "model".
    for key in ("student", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no model state_dict")
    return state


def misfit(err: RuntimeError) -> str:
    """The first specific line (a missing key, a size mismatch) of the error that
    ``Module.load_state_dict`` raises for weights that do not fit."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return lines[0] if lines else str(err).splitlines()[0]


def load_weights(
    model: torch.nn.Module,
    path: str | Path,
    role: str = "model",
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """``model``'s weights from ``path`` (or ``state``, already read from it), or one line
    naming what does not fit."""
    try:
        model.load_state_dict(load_state_dict(path) if state is None else state)
    except RuntimeError as err:
        detail = misfit(err)
        what = "the configured model" if role == "model" else f"the configured {role} model"
        raise UserError(
            f"{role} checkpoint {str(path)!r} does not fit {what} ({detail}); check the "
            "model name, num_classes and input channels"
        ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values only
    (so that ``weights_only`` loading accepts it)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
