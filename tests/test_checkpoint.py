"""Atomic writes and safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from smskd.checkpoint import atomic_save, load_state_dict, load_weights, safe_load
from smskd.errors import UserError


def test_atomic_save_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"w": torch.ones(2)}, path)
    atomic_save({"w": torch.zeros(2)}, path)
    assert torch.equal(safe_load(path)["w"], torch.zeros(2))
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt", "ckpt.pt.sha256"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(2)}, path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.sha256"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        torch.save({"student": {"w": torch.ones(1)}, "payload": Exploit()}, handle)
    with pytest.raises(UserError, match="refused"):
        safe_load(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UserError):
        safe_load(raw)


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="truncated"):
        safe_load(path)
    with pytest.raises(UserError, match="unreadable"):
        safe_load(path, verify=False)  # torch's own check, for files without a sidecar


def test_state_dict_from_plain_file_or_run_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    atomic_save(model.state_dict(), tmp_path / "plain.pt")
    atomic_save({"student": model.state_dict(), "epoch": 3}, tmp_path / "run.pt")
    # RepDistiller's teacher checkpoints: {"epoch", "model", "accuracy", "optimizer"}.
    atomic_save({"epoch": 240, "model": model.state_dict(), "accuracy": 79.3}, tmp_path / "rd.pt")
    for name in ("plain.pt", "run.pt", "rd.pt"):
        assert set(load_state_dict(tmp_path / name)) == {"weight", "bias"}


def test_wrong_architecture_is_a_clear_error(tmp_path: Path) -> None:
    atomic_save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="does not fit the configured student model"):
        load_weights(torch.nn.Linear(3, 2), tmp_path / "w.pt", "student")
