"""What smskd owns in a directory it writes into, and what ``--force`` may remove.

A directory smskd writes a run, a quickstart or a sweep into carries a marker file,
``.smskd-run``, naming its kind. Each kind declares the files smskd writes there
(:class:`Layout`): ``--force`` removes exactly those, and, in the sub-directories
that are runs of their own (``teacher/``, the quickstart's recipes), theirs;
anything else in the directory (a user's ``NOTES.md``) is kept and named. A
directory that is not empty and carries no marker is not smskd's, and nothing is
written into it, with or without ``--force``. Directories written before the
marker existed are recognised by what they hold (``legacy``).

Before a run starts, the entries it will write are checked to be of the right type
(``checkpoints`` a directory, ``student.pt`` not one) and the directory writable,
so that a damaged directory is one line, not a traceback after training.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smskd.errors import UserError
from smskd.store.runlock import LOCK_NAME
from smskd.version import __version__

MARKER = ".smskd-run"

_WEIGHTS = ("student.pt", "student.safetensors", "teacher.pt", "teacher.safetensors")
_CHECKPOINTS = ("checkpoints/last.pt", "checkpoints/last.prev.pt", "checkpoints/stage*.pt")
_MLFLOW = ("mlflow.db", "mlflow.db-journal", "mlflow_run.json", "mlartifacts/**")
# A language model's weights as transformers' save_pretrained writes them, and its tokenizer.
HF_FOLDER = "hf"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def _with_sidecars_and_temporaries(names: tuple[str, ...]) -> tuple[str, ...]:
    """Each name, its ``.sha256`` sidecar, and the temporary files of an atomic write of
    either (``.NAME.*.tmp``, left behind when a run is killed mid-write)."""
    patterns = []
    for name in names:
        folder, _, base = name.rpartition("/")
        prefix = f"{folder}/" if folder else ""
        for file in (base, f"{base}.sha256"):
            patterns += [f"{prefix}{file}", f"{prefix}.{file}.*.tmp"]
    return tuple(patterns)


@dataclass(frozen=True)
class Layout:
    """One kind of smskd directory: the files it writes (shell patterns on paths
    relative to the directory; ``**`` spans folders), its sub-directories that are
    runs of their own, and what marks one written before the marker existed."""

    kind: str
    files: tuple[str, ...]
    runs: tuple[str, ...] = ()
    legacy: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()  # entries that must be directories when they exist

    def writes(self, relative: str) -> bool:
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.files)

    def is_run(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.runs)

    def makes_folder(self, relative: str) -> bool:
        """Whether smskd makes the folder ``relative`` (``checkpoints``, ``plots/base``)."""
        return any(
            fnmatch.fnmatchcase(relative, pattern.rpartition("/")[0])
            or fnmatch.fnmatchcase(relative, pattern)
            for pattern in self.files
            if "/" in pattern
        )


RUN = Layout(
    "run",
    files=(
        *_with_sidecars_and_temporaries(("config.yaml", "result.json", *_WEIGHTS, *_CHECKPOINTS)),
        *_with_sidecars_and_temporaries(
            ("metrics.jsonl", "metrics.csv", "steps.csv", "forgetting.json")
        ),
        "tensorboard/events.out.tfevents.*",
        *_MLFLOW,
        *(f"{HF_FOLDER}/{name}" for name in HF_FILES),
        f".{HF_FOLDER}.*.tmp/**",  # an export a kill interrupted
    ),
    runs=("teacher", "teacher-[0-9]*"),
    # config.yaml alone could be a user's own config; a run also logs its epochs.
    legacy=("config.yaml", "metrics.jsonl"),
    folders=("checkpoints", "tensorboard", "teacher", HF_FOLDER),
)
QUICKSTART = Layout(
    "quickstart",
    files=(*_with_sidecars_and_temporaries(("report.md",)), *_MLFLOW),
    runs=("teacher", "scratch", "single", "joint", "smskd"),
    legacy=("report.md", "teacher"),
    folders=("teacher", "scratch", "single", "joint", "smskd"),
)
SWEEP = Layout(
    "sweep",
    files=(
        *_with_sidecars_and_temporaries(("index.json", "sweep.yaml", "report.md")),
        "plots/*.png",
        "plots/*/*.png",
        *_MLFLOW,
    ),
    runs=("teacher-outputs",),  # the shared teacher-output cache, when placed here
    legacy=("index.json",),
    folders=("plots", "teachers", "teacher-outputs"),
)
SEARCH = Layout(
    "search",
    files=(
        *_with_sidecars_and_temporaries(("search.yaml", "best.yaml", "final.yaml", "report.md")),
        "search.db",
        "search.db-journal",
        "plots/*.png",
        *_MLFLOW,
    ),
    runs=("teacher", "teacher-[0-9]*", "final"),
    folders=("plots", "nodes", "teacher", "final"),
)
# A teacher's outputs on every view of a training set (smskd.train.output_cache), shared
# by the runs that name this directory as performance.cache_dir.
TEACHER_OUTPUTS = Layout(
    "teacher-outputs",
    files=_with_sidecars_and_temporaries(("*/about.json", "*/view-*/*.pt")),
)
LAYOUTS = {layout.kind: layout for layout in (RUN, QUICKSTART, SWEEP, SEARCH, TEACHER_OUTPUTS)}


def kind_of(directory: Path) -> str | None:
    """The kind named by ``directory``'s marker; a legacy directory's kind; else None."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        kind = marker.get("kind") if isinstance(marker, dict) else None
    except FileNotFoundError:
        kind = None
    except (OSError, ValueError) as err:
        raise UserError(f"{directory / MARKER} is unreadable ({err}); delete it") from None
    if kind is not None:
        if kind not in LAYOUTS:
            raise UserError(f"{directory / MARKER} names an unknown kind {kind!r}; delete it")
        return kind
    for layout in LAYOUTS.values():
        if layout.legacy and all((directory / name).exists() for name in layout.legacy):
            return layout.kind
    return None


def _foreign_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in (LOCK_NAME, MARKER))


def _smskd_folder(directory: Path, name: str, layout: Layout) -> bool:
    """Whether ``name`` is a folder of ``layout`` holding only smskd runs (a sweep's
    ``teachers/`` with a teacher trained into it before the sweep first ran)."""
    folder = directory / name
    if name not in layout.folders or not folder.is_dir():
        return False
    children = list(folder.iterdir())
    return bool(children) and all(child.is_dir() and kind_of(child) for child in children)


def claim(directory: Path, layout: Layout, *, write: bool = True) -> None:
    """Make ``directory`` an smskd directory of ``layout``'s kind, or refuse in one line.

    Refused: a directory that is not empty and not smskd's, or smskd's of another kind,
    one that cannot be written, and entries of the wrong type where smskd writes. With
    ``write`` False (the ranks of a DDP job other than rank 0) only the checks run.
    """
    if directory.exists() and not directory.is_dir():
        raise UserError(f"cannot use {directory} as a {layout.kind} directory: it is a file")
    if directory.is_dir():
        kind = kind_of(directory)
        foreign = [
            e for e in _foreign_entries(directory) if not _smskd_folder(directory, e, layout)
        ]
        if kind is None and foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            shown = ", ".join(foreign[:3]) + more
            raise UserError(
                f"{directory} is not empty ({shown}) and is not an smskd directory; smskd "
                "writes only into a new or empty directory or one it wrote: choose another --out"
            )
        if kind is not None and kind != layout.kind:
            raise UserError(
                f"{directory} holds an smskd {kind}, not a {layout.kind}; choose another --out"
            )
        _check_entry_types(directory, layout)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write in {directory} (permission denied); choose another --out"
            )
    if write:
        _write_marker(directory, layout)


def _check_entry_types(directory: Path, layout: Layout) -> None:
    for name in layout.folders:
        entry = directory / name
        if entry.exists() and not entry.is_dir():
            raise UserError(
                f"{entry} is a file where smskd keeps a directory; move it away, or choose "
                "another --out"
            )
    for pattern in layout.files:
        if any(c in pattern for c in "*?["):
            continue
        entry = directory / pattern
        if entry.is_dir():
            raise UserError(
                f"{entry} is a directory where smskd writes a file; move it away, or choose "
                "another --out"
            )


def _write_marker(directory: Path, layout: Layout) -> None:
    marker = directory / MARKER
    if marker.exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    text = json.dumps({"kind": layout.kind, "smskd": __version__, "created": created})
    # Whole or not at all: several workers may claim one directory at once.
    temporary = directory / f".{MARKER}.{os.getpid()}.tmp"
    temporary.write_text(text)
    os.replace(temporary, marker)


def clear(directory: Path, layout: Layout, log: Callable[[str], None] = print) -> list[str]:
    """``--force``: remove what smskd wrote in ``directory`` (and in its runs), name it,
    and name what is kept. Returns the removed paths, relative to ``directory``."""
    if not directory.is_dir():
        return []
    if _foreign_entries(directory) and kind_of(directory) != layout.kind:
        claim(directory, layout, write=False)  # raises the refusal that says why
    removed, kept = _clear(directory, directory, layout)
    if removed:
        log(f"--force: removed what smskd wrote in {directory}: {_summary(removed)}")
    if kept:
        log(f"--force: kept what smskd did not write: {_summary(kept)}")
    return removed


def _clear(root: Path, directory: Path, layout: Layout) -> tuple[list[str], list[str]]:
    removed: list[str] = []
    kept: list[str] = []
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        relative = path.relative_to(directory).as_posix()
        top = relative.split("/", 1)[0]
        if relative in (LOCK_NAME, MARKER):
            continue
        if layout.is_run(top) and (directory / top).is_dir() and not (directory / top).is_symlink():
            continue  # a run of its own: cleared below by its own layout
        if path.is_symlink() or path.is_file():
            if layout.writes(relative):
                path.unlink()
                removed.append(path.relative_to(root).as_posix())
            else:
                kept.append(path.relative_to(root).as_posix())
        elif path.is_dir() and layout.makes_folder(relative) and not any(path.iterdir()):
            path.rmdir()  # deepest first: its files went above
    for run in sorted(p for p in directory.iterdir() if layout.is_run(p.name)):
        kind = kind_of(run) if run.is_dir() and not run.is_symlink() else None
        if kind in (RUN.kind, TEACHER_OUTPUTS.kind):
            sub_removed, sub_kept = _clear(root, run, LAYOUTS[kind])
            removed += sub_removed
            kept += sub_kept
            if not sub_kept:  # nothing of the user's inside: the run is gone entirely
                (run / MARKER).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # a stale .lock may remain: keep the folder
                    run.rmdir()
        elif run.exists():
            kept.append(run.relative_to(root).as_posix())
    return removed, kept


def _summary(paths: list[str], shown: int = 8) -> str:
    """``config.yaml, checkpoints/ (4 files), teacher/ (9 files)``: one entry per top
    folder, so that a long run does not print a page."""
    groups: dict[str, int] = {}
    for path in sorted(paths):
        head, sep, _ = path.partition("/")
        key = f"{head}/" if sep else head
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{k} ({n} file{'s' * (n > 1)})" if k.endswith("/") else k for k, n in groups.items()]
    more = f" and {len(parts) - shown} more" if len(parts) > shown else ""
    return ", ".join(parts[:shown]) + more
