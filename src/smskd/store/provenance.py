"""What code wrote a result: the smskd commit and the software it ran on."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def git_commit(path: Path | None = None) -> str:
    """Short commit of the checkout at ``path`` (default: the one smskd is imported
    from), with ``-dirty`` if files differ from it; ``unknown`` outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def software() -> str:
    """torch, Python and the machine's architecture, as one phrase for a report."""
    return f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}"
