"""Atomic writes and safe loading."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from smskd.errors import UserError
from smskd.store.checkpoint import (
    atomic_save,
    checksum_path,
    load_state_dict,
    load_weights,
    safe_load,
)


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


class Plain:
    """An ordinary class: torch's refusal of it advises loading with weights_only=False."""


def not_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files that are no (safe) checkpoint, and what the one-line refusal must say."""

    def made(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    zipped_object = tmp_path / "object.pt"
    torch.save({"w": torch.ones(1), "extra": Plain()}, zipped_object)
    script = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    legacy_object = tmp_path / "legacy-object.pt"
    torch.save({"extra": Plain()}, legacy_object, _use_new_zipfile_serialization=False)
    return {
        "yaml": (made("config.yaml", b"data: {name: digits}\nseed: 0\n"), "holds text"),
        "empty": (made("empty.pt", b""), "it is empty"),
        "random": (made("random.pt", bytes(range(7, 256))), "starts with the bytes 07 08"),
        "pickled class": (made("class.pkl", pickle.dumps(Plain)), "plain Python pickle"),
        "pickled object": (made("object.pkl", pickle.dumps(Plain())), "plain Python pickle"),
        "gzip": (made("w.pt.gz", gzip.compress(b"weights")), "gzip-compressed"),
        "zip with an object": (zipped_object, f"would import {__name__}.Plain"),
        "legacy with an object": (legacy_object, f"would import {__name__}.Plain"),
        "torchscript": (script, "TorchScript archive"),
        "zip of something else": (made("other.zip", zip_bytes()), "not a torch file"),
    }


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


def test_no_refusal_passes_on_torchs_advice_to_load_unsafely(tmp_path: Path) -> None:
    for kind, (path, says) in not_checkpoints(tmp_path).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(UserError) as info:
                safe_load(path)
        message = str(info.value)
        assert says in message and str(path) in message, (kind, message)
        assert "\n" not in message, (kind, message)
        for advice in ("weights_only", "safe_globals", "trust"):
            assert advice not in message, (kind, message)
        assert not caught, (kind, [str(w.message) for w in caught])  # nothing else on stderr


def test_safetensors_content_loads_whatever_the_file_is_called(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    st.save_file({"w": torch.arange(3.0)}, str(tmp_path / "weights.pt"))
    assert torch.equal(safe_load(tmp_path / "weights.pt")["w"], torch.arange(3.0))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_what_is_not_a_file_is_named_and_a_fifo_is_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")
    (tmp_path / "run").mkdir()
    atomic_save({"w": torch.ones(1)}, tmp_path / "run" / "student.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    expected = {
        tmp_path / "pipe.pt": "is a named pipe (FIFO), not a file",
        tmp_path / "run": "is a directory, not a file; did you mean",
        tmp_path / "link.pt": "is a symbolic link to",
        Path("/dev/null"): "'/dev/null' is a character device, not a file",
        tmp_path / "nothing.pt": "does not exist",
    }
    for path, says in expected.items():
        with pytest.raises(UserError, match=re.escape(says)):
            safe_load(path)  # on a FIFO an open() would block this test for good


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_checksum_sidecar_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(1)}, path)
    os.mkfifo(checksum_path(path))
    with pytest.raises(UserError, match=r"checksum file .*w\.pt\.sha256' is a named pipe"):
        safe_load(path)
