"""Kill a real `smskd distill` process at several points; `--resume` must finish with
student weights bit-identical to an uninterrupted run (CPU, same seed, same thread count:
torch's float sums are split by thread, so every process here runs on one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow  # real processes, killed and resumed: ~9 s a test

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CONFIG = {
    "seed": 3,
    "data": {"name": "digits", "batch_size": 64},
    "teacher": {"model": "convnet-s", "epochs": 3},
    "student": {"model": "convnet-xs"},
    # CRD draws negatives from the global RNG and keeps a memory bank: both must resume.
    "stages": [{"methods": ["kd"], "epochs": 2}, {"methods": ["crd"], "epochs": 2}],
    "checkpoint_every_steps": 5,
}


def distill(config: Path, out: Path, *extra: str) -> None:
    """``smskd distill`` to the end of the run, on the one thread every process here uses."""
    subprocess.run(
        command(config, out, *extra), check=True, capture_output=True, timeout=300, env=ENV
    )


def command(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "smskd",
        "distill",
        str(config),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("kill")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    distill(config, root / "clean")
    return config, torch.load(root / "clean" / "student.pt", weights_only=True)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


POINTS: dict[str, Callable[[Path], bool]] = {
    "while the teacher trains": lambda out: lines(out / "teacher" / "metrics.jsonl") >= 1,
    "early in stage 1": lambda out: (out / "checkpoints" / "last.pt").exists(),
    "between the stages": lambda out: (out / "checkpoints" / "stage1.pt").exists(),
    "mid stage 2": lambda out: lines(out / "metrics.jsonl") >= 3,
}


def run_until(cmd: list[str], condition: Callable[[], bool], sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before the kill point:\n{proc.stderr.read()}")
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("point", list(POINTS))
def test_sigkill_then_resume_is_bit_identical(point: str, setup, tmp_path: Path) -> None:
    config, expected = setup
    out = tmp_path / "run"
    killed = run_until(command(config, out), lambda: POINTS[point](out), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    distill(config, out, "--resume")
    weights = torch.load(out / "student.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), f"{point}: {key}"
    assert lines(out / "metrics.jsonl") == 4  # one record per epoch, none lost or doubled


def test_sigterm_checkpoints_says_how_to_resume_and_resumes(setup, tmp_path: Path) -> None:
    config, expected = setup
    out = tmp_path / "run"
    stopped = run_until(
        command(config, out), lambda: POINTS["early in stage 1"](out), signal.SIGTERM
    )
    stderr = stopped.stderr.read()
    assert stopped.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    hint = stderr.split("continue with: ")[1].strip().split()
    assert hint[:3] == ["smskd", "distill", str(config)] and hint[-1] == "--resume"
    distill(config, out, "--resume")
    weights = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
