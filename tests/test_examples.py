"""Every script in examples/ runs, shortened, and does what its docstring says.

Each example runs as a script (``__main__``, its own globals and ``sys.argv``) from an
empty temporary directory, with its outputs sent there: nothing is written into the
repository. It runs in this process, which saves an interpreter and a torch import per
run; custom_method.py, whose ``register_method`` holds for the rest of its process, runs
as a real process of its own, as a user runs it. Epochs are cut to a minimum, so the
accuracy bounds are loose but well above chance (10 classes: 10%).
``test_every_example_has_a_test`` makes a new example without a ``test_<name>``
function here fail.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smskd import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHANCE = 10.0  # digits has 10 balanced classes


def run_example(name: str, *args: str, cwd: Path) -> str:
    """stdout of ``python examples/NAME ARGS`` run in ``cwd``, as a script in this process;
    an exception (or a non-zero exit) fails the test."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
        try:
            with contextlib.redirect_stdout(stdout):
                runpy.run_path(str(EXAMPLES / name), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (None, 0), f"{name} exited {exit_.code}:\n{stdout.getvalue()}"
    return stdout.getvalue()


def run_example_process(name: str, *args: str, cwd: Path) -> str:
    """stdout of ``python examples/NAME ARGS`` run in ``cwd`` as a process of its own;
    fails the test on rc != 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the markdown table a script printed (header and rule dropped)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
def test_own_models(tmp_path: Path) -> None:
    out = run_example("own_models.py", "--epochs", "1", "--teacher-epochs", "2", cwd=tmp_path)
    teacher = float(re.search(r"^teacher: test acc ([\d.]+)%$", out, re.M).group(1))
    stages = re.findall(r"^stage (\d) (\w+): test acc ([\d.]+)%$", out, re.M)
    final = float(re.search(r"^student: test acc ([\d.]+)% in", out, re.M).group(1))
    assert teacher > 5 * CHANCE  # two epochs of the 8x8 digits already reach ~95%
    assert [(k, label) for k, label, _ in stages] == [("1", "kd"), ("2", "fitnets"), ("3", "rkd")]
    # RunResult.final_accuracy is the last record of the per-epoch history.
    assert final == float(stages[-1][2])
    assert final > 4 * CHANCE
    assert list(tmp_path.iterdir()) == []  # no out_dir given: run_stages wrote nothing


@pytest.mark.slow
def test_from_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("--epochs", "1", "--teacher-epochs", "2", "--out", str(run))
    out = run_example("from_config.py", *args, cwd=tmp_path)
    assert "stages: kd → fitnets → rkd" in out
    final = float(re.search(r"final test accuracy: ([\d.]+)%", out).group(1))
    assert final > 2 * CHANCE

    # The run directory has what the README promises, listed by the script.
    for name in ("student.pt", "metrics.jsonl", "config.yaml", "teacher/teacher.pt"):
        assert (run / name).is_file(), name
        assert f"  {name}\n" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [1, 2, 3]  # one epoch per stage
    assert round(records[-1]["test_acc"], 2) == final  # printed = RunResult = the log
    # The resolved config records the Python-side overrides and assignment.
    saved = load_config(run / "config.yaml")
    assert [s.epochs for s in saved.stages] == [1, 1, 1]
    assert saved.reference.weighting == "tcp"
    assert saved.seed == 1
    assert saved.teacher.checkpoint == str(run / "teacher" / "teacher.pt")
    weights = torch.load(run / "student.pt", weights_only=True)
    assert any(key.startswith("fc.") for key in weights)  # a plain state_dict


@pytest.mark.slow
def test_reference_weighting(tmp_path: Path) -> None:
    args = ("--epochs", "1", "--teacher-epochs", "2", "--lam", "0.5")
    out = run_example("reference_weighting.py", *args, cwd=tmp_path)
    rows = {row[0]: row[1:] for row in table_rows(out)}
    assert list(rows) == ["inverse_tcp", "tcp", "fixed", "none"]
    # Same teacher, same initial student, same seed: stage 1 (no reference) is identical.
    assert len({stage1 for _, stage1, _ in rows.values()}) == 1
    assert all(CHANCE < float(final) <= 100 for _, _, final in rows.values())
    # The mean weights are what the formulas imply: λ for fixed, none has none, and over
    # the same batches λ·(1 − TCP) and λ·TCP add up to λ.
    weight = {name: cells[0] for name, cells in rows.items()}
    assert weight["fixed"] == "0.5000"
    assert weight["none"] == "-"
    assert abs(float(weight["inverse_tcp"]) + float(weight["tcp"]) - 0.5) <= 2e-4
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ablation_loop(tmp_path: Path) -> None:
    out_dir = tmp_path / "abl"
    args = ("--epochs", "1", "--teacher-epochs", "2", "--seeds", "0", "1", "--out", str(out_dir))
    out = run_example("ablation_loop.py", *args, cwd=tmp_path)
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["kd → rkd", "rkd → kd"]
    for _, seed0, seed1, mean in rows:
        assert CHANCE < float(seed0) <= 100 and CHANCE < float(seed1) <= 100
        assert abs((float(seed0) + float(seed1)) / 2 - float(mean)) <= 0.01

    teacher_pt = out_dir / "teacher" / "teacher.pt"
    assert teacher_pt.is_file()
    runs = sorted(p.parent for p in out_dir.glob("*/seed-*/student.pt"))
    assert [p.relative_to(out_dir).as_posix() for p in runs] == [
        "kd-rkd/seed-0",
        "kd-rkd/seed-1",
        "rkd-kd/seed-0",
        "rkd-kd/seed-1",
    ]
    for run in runs:
        # Every run used the one shared teacher: none trained its own.
        assert load_config(run / "config.yaml").teacher.checkpoint == str(teacher_pt)
        assert not (run / "teacher").exists()
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # Running the loop again reuses the finished runs: the same table, and the logs are
    # unchanged (a retrained run would log new epoch times).
    logs = {run: (run / "metrics.jsonl").read_text() for run in runs}
    again = run_example("ablation_loop.py", *args, cwd=tmp_path)
    assert table_rows(again) == rows
    assert all((run / "metrics.jsonl").read_text() == text for run, text in logs.items())


@pytest.mark.slow  # a process of its own
def test_custom_method(tmp_path: Path) -> None:
    out = run_example_process(
        "custom_method.py", "--epochs", "1", "--teacher-epochs", "2", cwd=tmp_path
    )
    rows = re.findall(
        r"^stage (\d) ([\w-]+): test acc ([\d.]+)%(?:, cosine-logits loss ([\d.]+))?$", out, re.M
    )
    assert [(k, label) for k, label, _, _ in rows] == [
        ("1", "kd"),
        ("2", "cosine-logits"),
        ("3", "rkd"),
    ]
    assert 0 < float(rows[1][3]) < 1  # 1 − cos is in [0, 2]; a trained student is aligned
    assert rows[0][3] == rows[2][3] == ""  # the term is logged in its own stage only
    assert float(rows[2][2]) > 4 * CHANCE


def test_every_example_has_a_test() -> None:
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert scripts, "examples/ is empty"
    for script in scripts:
        assert callable(globals().get(f"test_{script.stem}")), (
            f"examples/{script.name} has no test_{script.stem} in tests/test_examples.py"
        )
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        # The docstring says what it shows and how to run it.
        assert f"python examples/{script.name}" in doc, f"{script.name}: no 'Run:' line"
