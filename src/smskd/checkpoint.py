"""Atomic checkpoint writes and safe (``weights_only``) loads."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smskd.errors import UserError


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"checkpoint {str(path)!r} was refused: it holds more than tensors and plain "
            f"containers (safe loading, weights_only=True): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(
            f"checkpoint {str(path)!r} is unreadable (truncated or not a torch file): {err}"
        ) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A model's weights from ``path``: a plain state_dict or a run checkpoint."""
    state = safe_load(path)
    # Our run checkpoints keep it under "student"; RepDistiller/mdistiller's under "model".
    for key in ("student", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no model state_dict")
    return state


def load_weights(model: torch.nn.Module, path: str | Path, role: str = "model") -> None:
    try:
        model.load_state_dict(load_state_dict(path))
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise UserError(
            f"{role} checkpoint {str(path)!r} does not fit the configured {role} model "
            f"({detail}); check the model name and num_classes"
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
