"""Verified checkpoints: SHA-256 sidecars, last.pt → last.prev.pt fallback, safetensors."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smskd.errors import UserError
from smskd.store import checkpoint
from smskd.store.checkpoint import (
    atomic_save,
    checksum_path,
    export_weights,
    has_checkpoint,
    load_latest,
    load_state_dict,
    load_weights,
    move_checkpoint,
    safe_load,
    save_weights,
    verify_checkpoint,
)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_sidecar_is_sha256sum_format_and_the_file_stays_plain(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    path = tmp_path / "student.pt"
    atomic_save(model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lines = checksum_path(path).read_text().splitlines()
    assert lines == [f"{digest}  student.pt", f"# size {path.stat().st_size}"]
    # No wrapper: a plain torch.load gives the state_dict itself.
    plain = torch.load(path, weights_only=True)
    assert set(plain) == {"weight", "bias"} and torch.equal(plain["weight"], model.weight)
    assert verify_checkpoint(path) is True
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "--strict", "-c", "student.pt.sha256"], cwd=tmp_path, capture_output=True
        )
        assert check.returncode == 0, check.stderr


def test_flipped_byte_is_detected_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.arange(4096.0)}, path)
    flip_byte(path, path.stat().st_size - 2000)  # inside the tensor data: torch would not notice
    assert torch.load(path, weights_only=True)["w"].shape == (4096,)
    with pytest.raises(UserError, match=r"'.*ckpt\.pt' is corrupted: its SHA-256 does not match"):
        safe_load(path)
    with pytest.raises(UserError, match="corrupted"):
        load_state_dict(path)


def test_truncation_is_detected_before_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(1000)}, path)
    size = path.stat().st_size
    truncate(path)
    with pytest.raises(UserError, match=rf"ckpt\.pt' is truncated .*: {size // 2} bytes.* {size}"):
        safe_load(path)


def test_file_without_sidecar_loads_unverified(tmp_path: Path) -> None:
    path = tmp_path / "theirs.pt"
    torch.save({"w": torch.ones(3)}, path)  # e.g. a RepDistiller teacher
    assert verify_checkpoint(path) is False
    assert torch.equal(safe_load(path)["w"], torch.ones(3))


def test_malformed_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)
    checksum_path(path).write_text("not a checksum\n")
    with pytest.raises(UserError, match=r"ckpt\.pt\.sha256' is malformed; delete it"):
        safe_load(path)


def test_crash_before_the_new_sidecar_leaves_a_loadable_new_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)

    def dies(*_args) -> None:
        raise KeyboardInterrupt  # killed between the rename and the new checksum

    monkeypatch.setattr(checkpoint, "_write_sidecar", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    # The old checksum went before the rename: the new file is not judged by it.
    assert not checksum_path(path).exists()
    assert torch.equal(safe_load(path)["w"], torch.zeros(3))


def test_keep_previous_rotates_file_and_checksum(tmp_path: Path) -> None:
    last = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, last, keep_previous=True)
    assert not (tmp_path / "last.prev.pt").exists()
    atomic_save({"epoch": 2}, last, keep_previous=True)
    atomic_save({"epoch": 3}, last, keep_previous=True)
    prev = tmp_path / "last.prev.pt"
    assert safe_load(last)["epoch"] == 3 and safe_load(prev)["epoch"] == 2
    assert verify_checkpoint(last) and verify_checkpoint(prev)
    assert checksum_path(prev).read_text().split()[1] == "last.prev.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.prev.pt",
        "last.prev.pt.sha256",
        "last.pt",
        "last.pt.sha256",
    ]


def test_a_damaged_last_is_not_rotated_over_a_good_previous(tmp_path: Path) -> None:
    last = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, last, keep_previous=True)
    atomic_save({"epoch": 2}, last, keep_previous=True)
    flip_byte(last)
    atomic_save({"epoch": 3}, last, keep_previous=True)
    assert safe_load(tmp_path / "last.prev.pt")["epoch"] == 1
    assert safe_load(last)["epoch"] == 3


def run_checkpoints(directory: Path) -> None:
    """last.pt after two epochs, as the pipeline writes it: epoch 2, and epoch 1 kept."""
    for epoch in (1, 2):
        state = {"epoch": epoch, "w": torch.full((256,), float(epoch))}
        atomic_save(state, directory / "last.pt", keep_previous=True)


def test_load_latest_prefers_last(tmp_path: Path) -> None:
    run_checkpoints(tmp_path)
    state, path = load_latest(tmp_path)
    assert path == tmp_path / "last.pt" and state["epoch"] == 2
    assert safe_load(tmp_path / "last.prev.pt")["epoch"] == 1


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped", "truncated"])
def test_load_latest_falls_back_to_previous(tmp_path: Path, damage, caplog) -> None:
    run_checkpoints(tmp_path)
    damage(tmp_path / "last.pt")
    messages: list[str] = []
    state, path = load_latest(tmp_path, log=messages.append)
    assert path == tmp_path / "last.prev.pt" and state["epoch"] == 1
    assert len(messages) == 1 and "last.prev.pt" in messages[0] and "last.pt'" in messages[0]
    with caplog.at_level(logging.WARNING, logger="smskd.store.checkpoint"):
        load_latest(tmp_path)  # no log given: a logging warning
    assert "resuming from" in caplog.text


def test_load_latest_without_last_takes_previous(tmp_path: Path) -> None:
    run_checkpoints(tmp_path)
    (tmp_path / "last.pt").unlink()  # killed between the rotation and the new last.pt
    state, path = load_latest(tmp_path, log=lambda _m: None)
    assert path.name == "last.prev.pt" and state["epoch"] == 1


def test_load_latest_with_both_damaged_is_a_clear_error(tmp_path: Path) -> None:
    run_checkpoints(tmp_path)
    flip_byte(tmp_path / "last.pt")
    truncate(tmp_path / "last.prev.pt")
    with pytest.raises(UserError, match="no usable checkpoint to resume from") as info:
        load_latest(tmp_path)
    message = str(info.value)
    assert "last.pt' is corrupted" in message and "last.prev.pt' is truncated" in message
    assert "\n" not in message


def test_load_latest_with_nothing_there(tmp_path: Path) -> None:
    assert not has_checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"last\.pt does not exist; last\.prev\.pt does not exist"):
        load_latest(tmp_path)
    run_checkpoints(tmp_path)
    assert has_checkpoint(tmp_path)


def test_move_checkpoint_rewrites_the_checksum_for_the_new_name(tmp_path: Path) -> None:
    atomic_save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "student.pt")
    move_checkpoint(tmp_path / "student.pt", tmp_path / "teacher.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pt", "teacher.pt.sha256"]
    assert checksum_path(tmp_path / "teacher.pt").read_text().split()[1] == "teacher.pt"
    assert verify_checkpoint(tmp_path / "teacher.pt")


def test_safetensors_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    # None in sys.modules makes `import safetensors.torch` fail, installed or not.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(UserError, match=r"pip install safetensors"):
        save_weights(torch.nn.Linear(2, 2).state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UserError, match=r"w\.safetensors.*pip install safetensors"):
        load_state_dict(tmp_path / "w.safetensors")


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # shared memory: safetensors refuses it as is
        self.norm = torch.nn.BatchNorm1d(3)


def test_safetensors_weights_round_trip(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = Tied()
    path = tmp_path / "student.safetensors"
    save_weights(model.state_dict(), path)
    assert verify_checkpoint(path)
    raw = st.load_file(str(path))  # a real safetensors file, readable without smskd
    assert set(raw) == set(model.state_dict())
    fresh = Tied()
    load_weights(fresh, path, "student")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_safetensors_export_and_damage(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = torch.nn.Linear(8, 4)
    atomic_save({"student": model.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    export_weights(tmp_path / "last.pt", tmp_path / "student.safetensors")
    exported = load_state_dict(tmp_path / "student.safetensors")
    assert torch.equal(exported["weight"], model.weight)
    flip_byte(tmp_path / "student.safetensors", -10)
    with pytest.raises(UserError, match="corrupted"):
        load_state_dict(tmp_path / "student.safetensors")
    checksum_path(tmp_path / "student.safetensors").unlink()
    truncate(tmp_path / "student.safetensors")
    with pytest.raises(UserError, match=r"unreadable .*not a safetensors file"):
        load_state_dict(tmp_path / "student.safetensors")
