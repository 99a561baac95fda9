"""The one exception type for mistakes a user can fix.

The CLI turns it into a one-line message and exit code 2; anything else that
escapes is a bug in smskd and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint, model) with a message that names the fix."""


def choices(names: object) -> str:
    """Format valid choices for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(n) for n in sorted(names))  # type: ignore[call-overload]
