"""Every bad input in tests/bad_inputs/ gets one line on stderr, exit code 2, no traceback.

The cases are listed in ``bad_inputs/cases.yaml``: malformed configs (committed YAML
files) and malformed data, checkpoints and run directories (written at test time by
``bad_inputs/make_data.py``). Each runs through ``smskd.cli.commands.main`` in-process, which
is what the console script calls; a few also run as a real ``python -m smskd``
process, to show that nothing but the one line reaches the terminal.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from smskd.cli.commands import main

HERE = Path(__file__).resolve().parent / "bad_inputs"
CASES: list[dict[str, Any]] = yaml.safe_load((HERE / "cases.yaml").read_text())
GOOD_CONFIGS = {"valid.yaml", "scratch.yaml", "cases.yaml"}
# Run as real processes too: one per kind of input (each costs a torch import).
SUBPROCESS = (
    "unknown-method",
    "fmnist-truncated-idx",
    "teacher-checkpoint-truncated",
    "set-index-out-of-range",
    "eval-truncated",
)


def _load_make_data() -> Any:
    spec = importlib.util.spec_from_file_location("bad_inputs_make_data", HERE / "make_data.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


make_data = _load_make_data()


def _param(case: dict[str, Any]) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
    return pytest.param(case, id=case["id"], marks=marks)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make_data.py's files, plus a finished run of scratch.yaml in ``finished/``."""
    root = make_data.build(tmp_path_factory.mktemp("bad_inputs"))
    finished = root / "finished"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        code = main(["distill", str(HERE / "scratch.yaml"), "--out", str(finished)])
    assert code == 0 and (finished / "student.pt").is_file()
    return root


def _argv(case: dict[str, Any], work: Path, out: Path) -> list[str]:
    file = (work if case.get("made") else HERE) / case["file"]
    values = {"case": file, "out": out, "work": work, "finished": work / "finished"}
    return [token.format(**values) for token in shlex.split(case["args"])]


def _check(case: dict[str, Any], code: object, stdout: str, stderr: str) -> None:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, stderr
    # torch's advice to load unsafely must never reach a user (files here are untrusted).
    assert "weights_only" not in stderr, stderr
    assert code == 2, f"exit code {code}; stderr:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("smskd: error: "), stderr
    expected = case["error"] if isinstance(case["error"], list) else [case["error"]]
    for text in expected:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    assert stdout == "", stdout


def _check_nothing_done(work: Path, out: Path, finished_before: bytes) -> None:
    assert not (work / make_data.PWNED).exists(), "a malicious pickle ran its code"
    trained = sorted(str(p.relative_to(out)) for p in out.rglob("*.pt")) if out.exists() else []
    assert not trained, f"weights were written before the error: {trained}"
    assert (work / "finished" / "student.pt").read_bytes() == finished_before


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(
    case: dict[str, Any],
    work: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(work)
    out = tmp_path / "run"
    finished_before = (work / "finished" / "student.pt").read_bytes()
    argv = _argv(case, work, out)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    except Exception as error:
        pytest.fail(f"smskd {' '.join(argv)} raised (a traceback): {error!r}")
    captured = capsys.readouterr()
    _check(case, code, captured.out, captured.err)
    _check_nothing_done(work, out, finished_before)


@pytest.mark.slow  # a torch import per case
@pytest.mark.parametrize("case", [_param(c) for c in CASES if c["id"] in SUBPROCESS])
def test_bad_input_in_a_real_process(case: dict[str, Any], work: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    finished_before = (work / "finished" / "student.pt").read_bytes()
    argv = [sys.executable, "-m", "smskd", *_argv(case, work, out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=work)
    _check(case, proc.returncode, proc.stdout, proc.stderr)
    _check_nothing_done(work, out, finished_before)


def test_manifest_covers_the_folder() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    files = {case["file"] for case in CASES}
    committed = {p.name for p in HERE.glob("*.yaml")} - GOOD_CONFIGS
    assert committed <= files, f"YAML files no case uses: {sorted(committed - files)}"
    for case in CASES:
        if not case.get("made"):
            assert (HERE / case["file"]).is_file(), case["file"]
    bad_files = {case["file"] for case in CASES} - GOOD_CONFIGS
    assert len(bad_files) >= 30


def test_the_good_configs_pass(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case breaks valid.yaml (or scratch.yaml) in one place: they themselves are fine."""
    from smskd.config import load_config
    from smskd.experiment import check_run

    monkeypatch.chdir(work)
    for name in ("valid.yaml", "scratch.yaml"):
        check_run(load_config(HERE / name))
