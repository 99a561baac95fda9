"""The `smskd` command end to end: in-process through ``smskd.cli.commands.main`` (what
the console script calls), and once through the installed console script itself."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smskd.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("smskd")
SMSKD = str(_SCRIPT) if _SCRIPT.is_file() else shutil.which("smskd") or f"{sys.executable} -m smskd"
SMALL = ["--teacher-epochs", "3", "--stage-epochs", "1"]


def smskd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``smskd ARGS`` from the repository root, in this process: ``main`` is what the
    console script calls. With ``check``, a non-zero exit code fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    proc = subprocess.CompletedProcess(["smskd", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"smskd {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def console_script(*args: str) -> subprocess.CompletedProcess:
    """``smskd ARGS`` as a real process of the installed console script."""
    return subprocess.run(
        [*SMSKD.split(), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    proc = smskd("quickstart", "--out", str(out), "--no-progress", *SMALL)
    for recipe in ("scratch", "single", "joint", "smskd"):
        assert f"| {recipe} |" in proc.stdout
    return out


@pytest.mark.slow  # the module's quickstart (four runs and a teacher) trains first
def test_quickstart_writes_every_recipe_run(quickstart_dir: Path) -> None:
    for recipe in ("scratch", "single", "joint", "smskd"):
        run = quickstart_dir / recipe
        assert (run / "config.yaml").is_file()
        assert (run / "checkpoints" / "last.pt").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert sum(1 for _ in records) == 3  # the same 3 student epochs for every recipe
        weights = torch.load(run / "student.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in weights.values())
    stages = [
        json.loads(x)["stage_name"]
        for x in (quickstart_dir / "smskd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert stages == ["kd", "fitnets", "rkd"]
    report = (quickstart_dir / "report.md").read_text()
    assert "| smskd | kd → fitnets → rkd |" in report and "| teacher |" in report


@pytest.mark.slow
def test_quickstart_rerun_reuses_finished_runs(quickstart_dir: Path) -> None:
    files = [
        quickstart_dir / r / f
        for r in ("teacher", "smskd")
        for f in ("metrics.jsonl", "checkpoints/last.pt")
    ]
    before = [path.read_bytes() for path in files]
    proc = smskd("quickstart", "--out", str(quickstart_dir), "--no-progress", *SMALL)
    assert "| smskd |" in proc.stdout
    # Nothing was trained again: logs and checkpoints are byte for byte the same.
    assert [path.read_bytes() for path in files] == before
    changed = smskd(
        "quickstart",
        "--out",
        str(quickstart_dir),
        "--no-progress",
        "--teacher-epochs",
        "3",
        "--stage-epochs",
        "2",
        check=False,
    )
    assert changed.returncode == 2 and "--force" in changed.stderr


@pytest.mark.slow
def test_distill_quickstart_yaml_reproduces_the_smskd_row(quickstart_dir, tmp_path) -> None:
    out = tmp_path / "smskd"
    smskd(
        "distill",
        "configs/quickstart.yaml",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "teacher.epochs=3",
        "--set",
        "stages.*.epochs=1",
    )
    ours = torch.load(out / "student.pt", weights_only=True)
    theirs = torch.load(quickstart_dir / "smskd" / "student.pt", weights_only=True)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert (out / "teacher" / "teacher.pt").is_file()


@pytest.mark.slow
def test_eval_reports_the_logged_accuracy(quickstart_dir: Path) -> None:
    run = quickstart_dir / "smskd"
    proc = smskd("eval", str(run / "student.pt"))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"test acc {last['test_acc']:.2f}%" in proc.stdout
    teacher = smskd("eval", str(quickstart_dir / "teacher" / "teacher.pt"))
    assert "test acc" in teacher.stdout


@pytest.mark.slow  # a process: the console script
def test_eval_of_a_model_that_does_not_fit_is_a_clear_error(quickstart_dir: Path) -> None:
    """Through the installed console script: its exit code and one line on stderr."""
    proc = console_script(
        "eval", str(quickstart_dir / "smskd" / "student.pt"), "--model", "convnet-l"
    )
    assert proc.returncode == 2 and "does not fit" in proc.stderr


def test_train_teacher(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    proc = smskd(
        "train-teacher",
        "configs/quickstart.yaml",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "teacher.epochs=2",
    )
    assert "teacher test acc" in proc.stdout
    assert (out / "teacher.pt").is_file() and (out / "config.yaml").is_file()
    again = smskd("train-teacher", "configs/quickstart.yaml", "--out", str(out), check=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_listing_commands(capsys) -> None:
    assert main(["methods", "--format", "json"]) == 0
    methods = json.loads(capsys.readouterr().out)
    families = {m["name"]: m["family"] for m in methods}
    assert len(families) >= 15
    assert {n for n, f in families.items() if f == "response"} >= {"kd", "dkd", "dist", "lskd"}
    assert {n for n, f in families.items() if f == "feature"} >= {"fitnets", "at", "nst", "vid"}
    assert {n for n, f in families.items() if f == "relation"} >= {"rkd", "sp", "pkt", "cc", "crd"}
    assert main(["models", "--format", "json", "--num-classes", "10", "--in-channels", "1"]) == 0
    models = {m["name"]: m["params"] for m in json.loads(capsys.readouterr().out)}
    # convnet-xs by hand: convs 1·8·9 + 8·16·9 + 16·32·9, BN 2·(8+16+32), fc 32·10 + 10.
    assert models["convnet-xs"] == 72 + 1152 + 4608 + 112 + 330
    assert main(["datasets"]) == 0
    assert "digits" in capsys.readouterr().out


def test_missing_config_file_is_exit_code_2(tmp_path: Path, capsys) -> None:
    assert main(["distill", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_stage_errors_surface_before_the_teacher_trains(tmp_path: Path) -> None:
    from smskd.config import load_config
    from smskd.errors import UserError
    from smskd.experiment import distill

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", ["stages.1.methods.0.student_layer=nope"]
    )
    with pytest.raises(UserError, match="student has no module named 'nope'"):
        distill(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing to clean up


def test_bad_model_kwargs_are_a_user_error(tmp_path: Path) -> None:
    proc = smskd(
        "distill",
        "configs/quickstart.yaml",
        "--out",
        str(tmp_path / "r"),
        "--set",
        "student.model.kwargs.widths=[8,16]",
        check=False,
    )
    assert proc.returncode == 2 and "cannot be built" in proc.stderr
    assert "Traceback" not in proc.stderr
