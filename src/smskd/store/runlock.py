"""One run at a time in a run directory: ``OUT/.lock``.

:func:`run_lock` creates ``OUT/.lock`` with ``O_CREAT | O_EXCL`` (atomic, also on
NFS) and writes its owner into it: PID, host and start time, as JSON. A second
run into the same directory finds the file and is refused with a UserError that
names the owner. A lock whose owner is gone (a PID that no longer exists on this
host: the run was SIGKILLed or the machine lost power) is stale: it is taken over
with a note. A lock from another host cannot be checked, and is never taken
over. The lock is removed when the ``with`` block ends, by an exception too.

Checking and taking over happen under a short ``flock`` on the directory (where
the platform has one), so that two runs finding the same stale lock cannot both
take it over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from smskd.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunInUse(UserError):
    """Another live process holds the run directory's lock: a sweep's other worker
    skips the run; anyone else gets the message."""


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str = "?"
    token: str = ""

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host}, since {self.started}"


def _host() -> str:
    return socket.gethostname()


def read_owner(lock: str | Path) -> LockOwner | None:
    """The owner written in ``lock``; None if the file is gone or names no process."""
    try:
        raw = json.loads(Path(lock).read_text())
        owner = LockOwner(
            int(raw["pid"]), str(raw["host"]), str(raw.get("started", "?")), raw.get("token", "")
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return owner if owner.pid > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks, sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    except OSError:
        return True  # cannot tell: assume the owner lives
    return not _zombie(pid)


def held(out_dir: str | Path) -> bool:
    """Whether a live process holds ``OUT/.lock`` (one on another host counts: it cannot
    be checked); a stale lock, or one naming no process, does not."""
    owner = read_owner(Path(out_dir) / LOCK_NAME)
    return owner is not None and (owner.host != _host() or pid_alive(owner.pid))


def _zombie(pid: int) -> bool:
    """A killed process that no parent has reaped yet still answers signal 0."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS) or already gone: signal 0 decided
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


@contextmanager
def _directory_guard(directory: Path) -> Iterator[None]:
    """Serialize lock checks between processes with ``flock`` on the directory, if possible."""
    try:
        import fcntl
    except ImportError:  # Windows: O_EXCL alone
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with suppress(OSError):  # a file system without flock: O_EXCL alone
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _refusal(out: Path, lock: Path, owner: LockOwner | None) -> UserError:
    if owner is None:
        return UserError(
            f"{out} is locked by {lock}, which names no process; if no smskd run is "
            f"writing to {out}, delete {lock}"
        )
    return RunInUse(
        f"{out} is in use by another run ({owner.describe()}; lock file {lock}); wait for it "
        "to finish, stop it, or choose another --out"
    )


def _acquire(out: Path, lock: Path, note: Callable[[str], None]) -> str:
    token = uuid.uuid4().hex
    me = {
        "pid": os.getpid(),
        "host": _host(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token": token,
    }
    with _directory_guard(out):
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(lock)
                if owner is None and not lock.exists():
                    continue  # released meanwhile: try again
                if owner is None or owner.host != _host() or pid_alive(owner.pid):
                    raise _refusal(out, lock, owner) from None
                note(
                    f"{out}: taking over the stale lock of PID {owner.pid} "
                    f"(since {owner.started}), which is no longer running"
                )
                lock.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(me) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except BaseException:
                lock.unlink(missing_ok=True)
                raise
            return token
    raise _refusal(out, lock, read_owner(lock))


def _release(out: Path, lock: Path, token: str) -> None:
    with _directory_guard(out):
        owner = read_owner(lock)
        # Only our own: had someone deleted ours and taken the directory, it is theirs now.
        if owner is not None and owner.token == token:
            lock.unlink(missing_ok=True)


@contextmanager
def run_lock(out_dir: str | Path, *, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold ``OUT/.lock`` for the ``with`` block (``OUT`` is created if missing).

    Raises UserError if another live process holds it; a stale lock (its PID gone
    from this host) is taken over, with a message to ``log`` (default: a logging
    warning). Yields the lock file's path.
    """
    out = Path(out_dir)
    make_run_dir(out)
    lock = out / LOCK_NAME
    token = _acquire(out, lock, log or logger.warning)
    try:
        yield lock
    finally:
        _release(out, lock, token)


def make_run_dir(out: Path) -> None:
    """Create ``out`` (and parents), or say in one line why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(
            f"cannot use {out} as a run directory: a file of that name exists"
        ) from None
    except OSError as err:
        raise UserError(
            f"cannot create run directory {out}: {err.strerror or err}; choose another --out"
        ) from None
