"""The README's promises: its API snippet runs, and CI runs its test command."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.slow  # trains a teacher for 20 epochs and three stages of 5
def test_api_snippet_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """As a script (``__main__``, its own globals), in this process, from an empty folder."""
    block = README.split("<!-- api-example:start -->")[1].split("<!-- api-example:end -->")[0]
    code = block.strip().removeprefix("```python").removesuffix("```")
    (tmp_path / "snippet.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path("snippet.py", run_name="__main__")  # an exception fails the test
    stdout = capsys.readouterr().out
    accuracy = float(re.search(r"student test accuracy: ([\d.]+)%", stdout).group(1))
    assert accuracy > 50  # 4 classes: chance is 25%
    assert (tmp_path / "runs" / "api-example" / "student.pt").is_file()
    assert "stage 3/3 rkd" in stdout


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n# 2\.[^\n]*\n(.+?)\n```", README)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_first_command_runs_the_quickstart() -> None:
    first = re.findall(r"```bash\n# 1\.[^\n]*\n(.+?)\n```", README)
    assert len(first) == 1 and first[0].endswith("smskd quickstart")
    assert "-c constraints.txt" in first[0]
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins  # the CPU wheel; a bare `torch` would pull CUDA
