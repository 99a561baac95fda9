"""A run directory someone sends you is data: reading it (eval, export, resume, a sweep
checking its finished runs) imports nothing its config.yaml names unless the user
opts in with ``--trust-code`` (DESIGN.md §7)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from smskd.cli.commands import main

TINY = {
    "data": {"name": "digits", "train_subset": 64},
    "student": {"model": "convnet-xs"},
    "stages": [{"epochs": 1}],
}
# Importing this module is the "attack": it leaves a file behind.
PAYLOAD = """
from pathlib import Path
Path({marker!r}).touch()

from smskd.models.registry import build_model

def student(num_classes, in_channels):
    return build_model("convnet-xs", num_classes, in_channels)
"""


@pytest.fixture
def received(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A finished run whose config.yaml was edited to name a module that, imported,
    touches ``marker``; the module is importable (on sys.path), not yet imported."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["distill", str(config), "--out", str(run), "--no-progress", "-q"]) == 0
    marker = tmp_path / "pwned"
    code = tmp_path / "code"
    code.mkdir()
    (code / "received_models.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "received_models", raising=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["student"]["model"] = {"factory": "received_models:student"}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run, marker


def _refused(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smskd: error: "), lines
    assert "--trust-code" in lines[0] and "received_models:student" in lines[0]
    return lines[0]


def test_eval_imports_nothing_a_received_config_names(received, capsys) -> None:
    run, marker = received
    assert main(["eval", str(run / "student.pt")]) == 2
    _refused(capsys)
    assert not marker.exists()
    # Opting in runs the factory, and the weights fit the model it builds.
    assert main(["eval", str(run / "student.pt"), "--trust-code", "--json"]) == 0
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_export_imports_nothing_a_received_config_names(received, tmp_path, capsys, fmt) -> None:
    run, marker = received
    out = tmp_path / f"student.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
    _refused(capsys)
    assert not marker.exists() and not out.exists()
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--trust-code"]) == 0
    assert marker.exists() and out.is_file()


def test_resume_compares_a_received_config_without_importing_it(received, tmp_path, capsys) -> None:
    run, marker = received
    config = tmp_path / "tiny.yaml"
    assert main(["distill", str(config), "--out", str(run), "--resume", "--no-progress"]) == 2
    assert "holds a run with a different config" in capsys.readouterr().err
    assert not marker.exists()


def test_a_sweep_checks_its_finished_runs_without_importing_them(tmp_path, monkeypatch) -> None:
    from smskd.errors import UserError
    from smskd.study.sweep import run_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "recipes": ["scratch"]}))
    out = tmp_path / "out"
    run_sweep(sweep, out, progress=False, log=lambda _m: None)
    marker = tmp_path / "pwned"
    (tmp_path / "received_models.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_path = out / "scratch" / "seed-0" / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text())
    saved["student"]["model"] = {"factory": "received_models:student"}
    saved_path.write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match="holds a finished run of another config"):
        run_sweep(sweep, out, progress=False, log=lambda _m: None)
    assert not marker.exists()
