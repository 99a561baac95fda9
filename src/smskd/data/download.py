"""Fetch the public datasets smskd reads, verified against their published MD5s.

``download(name, root)`` fetches every file of ``name`` into ``root`` and
returns the folder to hand the loader as ``data.root``:

* ``cifar10`` / ``cifar100``: the official python-version archives from
  https://www.cs.toronto.edu/~kriz/cifar.html, unpacked in ``root`` (giving
  ``root/cifar-10-batches-py`` or ``root/cifar-100-python``; the archive is kept
  so that a second call costs nothing).
* ``fashion-mnist``: the four gzipped IDX files from the Zalando repository
  (https://github.com/zalandoresearch/fashion-mnist, ``data/fashion``), with the
  MD5s published in its README, stored directly in ``root``.

Each file is streamed into a temporary file beside its target and renamed only
once its checksum matches, so an interrupted or tampered download never leaves a
file that a loader would pick up. Only :mod:`urllib` is used: no extra dependency.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from smskd.errors import UserError, choices

CHUNK = 1 << 20
TIMEOUT = 60.0  # seconds without data before giving up on a stalled server


def data_home() -> Path:
    """``$SMSKD_DATA`` if set, else ``~/.cache/smskd``: where downloads go by default."""
    return Path(os.environ.get("SMSKD_DATA") or Path.home() / ".cache" / "smskd").expanduser()


@dataclass(frozen=True)
class Resource:
    url: str
    md5: str
    filename: str


@dataclass(frozen=True)
class Source:
    resources: tuple[Resource, ...]
    unpack: bool = False  # tar.gz archive to extract into root
    ready: str = ""  # relative path whose presence means the data is already unpacked


_TORONTO = "https://www.cs.toronto.edu/~kriz"
_ZALANDO = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion"

SOURCES: dict[str, Source] = {
    "cifar10": Source(
        (
            Resource(
                f"{_TORONTO}/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                "cifar-10-python.tar.gz",
            ),
        ),
        unpack=True,
        ready="cifar-10-batches-py",
    ),
    "cifar100": Source(
        (
            Resource(
                f"{_TORONTO}/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                "cifar-100-python.tar.gz",
            ),
        ),
        unpack=True,
        ready="cifar-100-python",
    ),
    # MD5s from the table "Get the Data" in the Fashion-MNIST README (upstream files;
    # Debian's dataset-fashion-mnist recompresses them, so its .gz sums differ).
    "fashion-mnist": Source(
        tuple(
            Resource(f"{_ZALANDO}/{name}", md5, name)
            for name, md5 in (
                ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
            )
        )
    ),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(resource: Resource, root: Path) -> Path:
    """``root/resource.filename``, downloaded unless an intact copy is already there."""
    target = root / resource.filename
    if target.is_file() and md5sum(target) == resource.md5:
        return target
    # Same directory as the target: os.replace is then an atomic rename.
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{resource.filename}.", suffix=".part", dir=root
        )
    except OSError as error:
        raise UserError(
            f"cannot write in {root}: {error.strerror}; pass another data.root"
        ) from None
    partial = Path(temporary)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with (
            os.fdopen(handle, "wb") as out,
            urllib.request.urlopen(resource.url, timeout=TIMEOUT) as response,
        ):
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise UserError(
            f"cannot download {resource.url}: {reason}; fetch it by hand into {root} "
            f"(MD5 {resource.md5}) and pass data.root"
        ) from None
    except BaseException:  # Ctrl-C included: never leave a partial file behind
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != resource.md5:
        partial.unlink()
        raise UserError(
            f"checksum mismatch for {resource.url}: MD5 {digest.hexdigest()}, expected "
            f"{resource.md5}; the file was deleted (corrupt download or changed upstream)"
        )
    os.replace(partial, target)
    return target


def _safe_members(archive: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders inside ``root`` only: no links, devices or ``..``."""
    members = archive.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
            raise UserError(f"{path}: refusing to unpack suspicious member {member.name!r}")
    return members


def unpack(path: Path, root: Path) -> None:
    """Extract into a scratch folder, then rename its top-level entries into ``root``.

    An interrupted extraction thus never leaves a half-filled dataset folder that
    the next call (or a loader) would take for a complete one.
    """
    # Python ≥ 3.10.12 / 3.11.4 also has the "data" filter: belt and braces with our check.
    options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
    try:
        with tarfile.open(path, "r:gz") as archive:
            archive.extractall(scratch, members=_safe_members(archive, path), **options)
        for entry in scratch.iterdir():
            target = root / entry.name
            if target.exists():  # never overwrite what the user keeps there
                raise UserError(f"{target} already exists; move it away to unpack {path}")
            os.replace(entry, target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"cannot unpack {path}: {error}; delete it and download again") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def download(name: str, root: str | Path, sources: Mapping[str, Source] = SOURCES) -> Path:
    """Fetch (and unpack) dataset ``name`` into ``root``; return ``root``.

    ``sources`` exists so that tests can point the table at ``file://`` URLs.
    """
    if name not in sources:
        raise UserError(f"cannot download {name!r}; downloadable: {choices(sources)}")
    source = sources[name]
    folder = Path(root).expanduser()
    if source.ready and (folder / source.ready).is_dir():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create {folder}: {error.strerror}; pass another data.root"
        ) from None
    for resource in source.resources:
        path = fetch(resource, folder)
        if source.unpack:
            unpack(path, folder)
    return folder
