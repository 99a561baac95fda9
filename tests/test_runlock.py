"""OUT/.lock: one run per directory, stale locks taken over, released on any exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smskd.config import load_config
from smskd.errors import UserError
from smskd.experiment import distill, evaluate_checkpoint
from smskd.store import rundir
from smskd.store.checkpoint import checksum_path, export_weights, load_state_dict, verify_checkpoint
from smskd.store.runlock import LOCK_NAME, held, read_owner, run_lock

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, pid: int, host: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": "earlier", "token": "t"}
    lock.write_text(json.dumps(owner))
    return lock


def acquire(out: Path) -> None:
    with run_lock(out):
        pass


def test_lock_names_this_process_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_lock(out) as lock:
        assert lock == out / LOCK_NAME
        owner = read_owner(lock)
        assert owner is not None
        assert (owner.pid, owner.host) == (os.getpid(), socket.gethostname())
    assert not lock.exists()
    assert list(out.iterdir()) == []


def test_second_acquisition_is_refused_naming_the_pid(tmp_path: Path) -> None:
    with run_lock(tmp_path) as lock:
        with pytest.raises(
            UserError, match=rf"in use by another run \(PID {os.getpid()} on "
        ) as info:
            acquire(tmp_path)
        assert "\n" not in str(info.value)
        assert read_owner(lock).pid == os.getpid()  # the refusal left the holder's lock alone
    assert not lock.exists()


HOLDER = textwrap.dedent(
    """
    import sys
    from smskd.store.runlock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_a_concurrent_process_is_refused_and_its_stale_lock_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"\(PID {holder.pid} on "):
            acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock stays behind
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert read_owner(tmp_path / LOCK_NAME).pid == holder.pid
    notes: list[str] = []
    with run_lock(tmp_path, log=notes.append) as lock:
        assert read_owner(lock).pid == os.getpid()
    assert len(notes) == 1 and f"stale lock of PID {holder.pid}" in notes[0]
    assert not lock.exists()


def test_stale_lock_is_taken_over_with_a_note(tmp_path: Path, caplog) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with caplog.at_level("WARNING", logger="smskd.store.runlock"), run_lock(tmp_path) as lock:
        assert read_owner(lock).pid == os.getpid()
    assert f"taking over the stale lock of PID {pid}" in caplog.text
    assert not lock.exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, dead_pid(), host="elsewhere.example")
    with pytest.raises(UserError, match=r"PID \d+ on elsewhere\.example"):
        acquire(tmp_path)
    assert read_owner(lock).host == "elsewhere.example"


def test_lock_that_names_no_process_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(UserError, match=r"names no process; .* delete .*\.lock"):
        acquire(tmp_path)


def test_held_says_whether_a_live_process_holds_the_lock(tmp_path: Path) -> None:
    """What a search worker waits for before it chooses: live owners and owners it
    cannot check (another host), not stale locks nor ones naming no process."""
    assert not held(tmp_path)
    with run_lock(tmp_path / "ours"):
        assert held(tmp_path / "ours")
    assert not held(tmp_path / "ours")
    assert not held(write_lock(tmp_path / "stale", dead_pid()).parent)
    assert held(write_lock(tmp_path / "elsewhere", dead_pid(), host="elsewhere.example").parent)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_NAME).write_text("")
    assert not held(tmp_path / "empty")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_lock_is_released_after_an_exception(tmp_path: Path, error) -> None:
    with pytest.raises(error), run_lock(tmp_path):
        raise error("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path):  # free again
        pass


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        write_lock(tmp_path, 4242, host="elsewhere.example")  # someone deleted ours, took over
    assert read_owner(tmp_path / LOCK_NAME).pid == 4242


def test_force_clears_what_smskd_wrote_but_not_the_lock(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        rundir.claim(tmp_path, rundir.RUN)
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
        (tmp_path / "config.yaml").write_text("a: 1\n")
        rundir.clear(tmp_path, rundir.RUN, log=lambda _m: None)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_NAME, rundir.MARKER])


def quickstart(*overrides: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", list(overrides))


def test_distill_refuses_a_locked_directory_even_with_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("another run's\n")
    with run_lock(out), pytest.raises(UserError, match=rf"PID {os.getpid()}"):
        distill(quickstart(), out, force=True, progress=False)
    assert (out / "config.yaml").read_text() == "another run's\n"  # --force deleted nothing


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, object]:
    """One small distill run (teacher trained first), exported as safetensors if it can be."""
    cfg = quickstart("teacher.epochs=1", "stages.*.epochs=1")
    out = tmp_path_factory.mktemp("locked") / "run"
    distill(cfg, out, progress=False, export_safetensors=_has_safetensors())
    return out, cfg


def test_distill_releases_its_locks_and_verifies_its_weights(finished_run) -> None:
    out, cfg = finished_run
    assert not (out / LOCK_NAME).exists() and not (out / "teacher" / LOCK_NAME).exists()
    teacher = out / "teacher" / "teacher.pt"
    assert verify_checkpoint(teacher) and not (out / "teacher" / "student.pt.sha256").exists()
    assert checksum_path(teacher).read_text().split()[1] == "teacher.pt"
    assert verify_checkpoint(out / "student.pt")
    with pytest.raises(UserError, match="already holds a run"):
        distill(cfg, out, progress=False)
    assert not (out / LOCK_NAME).exists()  # refused, and released all the same


def test_distill_exports_safetensors(finished_run) -> None:
    pytest.importorskip("safetensors")
    out, _ = finished_run
    assert verify_checkpoint(out / "student.safetensors")
    ours = torch.load(out / "student.pt", weights_only=True)
    exported = load_state_dict(out / "student.safetensors")
    assert set(exported) == set(ours)
    assert all(torch.equal(exported[k], ours[k]) for k in ours)
    # eval reads either format; teacher.* is evaluated as the config's teacher model.
    export_weights(out / "teacher" / "teacher.pt", out / "teacher" / "teacher.safetensors")
    for name in ("student", "teacher/teacher"):
        pt, st = (evaluate_checkpoint(out / f"{name}{ext}") for ext in (".pt", ".safetensors"))
        assert pt == st


def test_a_killed_but_unreaped_owner_counts_as_dead() -> None:
    import subprocess
    import sys
    import time

    from smskd.store.runlock import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert pid_alive(child.pid)
    child.kill()
    time.sleep(0.2)  # dead, not yet reaped: a zombie
    assert not pid_alive(child.pid)
    child.wait()
