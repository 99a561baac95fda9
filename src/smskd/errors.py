"""The one exception type for mistakes a user can fix.

The CLI turns it into a one-line message and exit code 2; anything else that
escapes is a bug in smskd and keeps its traceback.
"""

import unicodedata


class UserError(Exception):
    """Bad input (config, data, checkpoint, model) with a message that names the fix."""


def choices(names: object) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(n) for n in sorted(names))  # type: ignore[call-overload]


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for echoing what a user wrote: non-ASCII escaped and the first such
    character named, so that a look-alike (Cyrillic ``ѕ`` for ``s``) cannot read as the
    valid name it is not; cut to about ``limit`` characters."""
    text = ascii(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    odd = next((c for c in value if not c.isascii()), None) if isinstance(value, str) else None
    if odd is None:
        return text
    return f"{text} (U+{ord(odd):04X} {unicodedata.name(odd, 'unnamed character')} is not ASCII)"
