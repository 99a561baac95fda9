"""Optional packages: the one check, before any work, that what a feature needs is there.

``find_spec`` and not an import: it costs nothing (importing onnxscript or mlflow takes
seconds), so a missing extra is reported first, in one line naming what to install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from smskd.errors import UserError


def require(modules: Sequence[str], needed_for: str, install: str) -> None:
    """Raise a :class:`UserError` if any of ``modules`` is missing: ``"{needed_for} needs
    the X package: {install}"``."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise UserError(
            f"{needed_for} needs the {' and '.join(missing)} package{plural}: {install}"
        )
