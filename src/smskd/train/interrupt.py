"""Graceful stop: SIGINT/SIGTERM finish the current step, checkpoint, and exit.

The first signal only raises a flag that the training loop reads after each step;
a second SIGINT stops at once (the default behaviour), for a user who means it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from smskd.train import distributed

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunStopped(Exception):
    """Training stopped on request after writing a checkpoint (or with nothing to write)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into ``self.signum`` (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum, str(self.signum)) if self.signum is not None else ""

    def agreed(self, device: torch.device) -> bool:
        """Whether to stop now, the same answer on every rank of a DDP job (ranks receive
        a signal at different moments; a collective, so every rank must ask)."""
        if distributed.any_rank(self.requested, device) and not self.requested:
            self.signum = signal.SIGTERM
        return self.requested

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread; elsewhere (a
        # notebook worker, a test thread) the run simply has no graceful stop.
        if threading.current_thread() is threading.main_thread():
            for signum in _NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
