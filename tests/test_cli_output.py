"""How the `smskd` command talks: --version, --help, --json, --quiet, colour, completion."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from smskd import __version__
from smskd.cli.commands import EXAMPLES, Style, build_parser, main
from smskd.cli.completion import completion_script, subcommands

TINY = {
    "data": {"name": "digits", "train_subset": 200, "batch_size": 50},
    "teacher": {"model": "convnet-xs", "epochs": 1},
    "student": {"model": "convnet-xs"},
    "stages": [{"methods": ["kd"], "epochs": 1}, {"methods": ["rkd"], "epochs": 1}],
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .startswith(f"smskd {__version__} (torch {torch.__version__}, Python 3.")
    )


def test_every_command_has_help_with_an_example(capsys) -> None:
    commands = subcommands(build_parser())
    assert set(commands) == set(EXAMPLES)  # a new command must bring its example
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert f"example: {EXAMPLES[command]}" in text and "--json" in text, command
        assert "%%" not in text, command  # argparse formats help strings, not descriptions


def test_json_mode_prints_one_object_and_keeps_logs_off_stdout(
    tiny_config: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(["distill", str(tiny_config), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # the whole of stdout is the JSON
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["final_acc"] == last["test_acc"] and result["epochs"] == 2
    assert result["weights"] == str(out / "student.pt")
    assert "stage 2/2 rkd: test acc" in captured.err  # the log lines went to stderr
    assert main(["eval", str(out / "student.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(last["test_acc"])
    assert main(["methods", "--json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"kd", "crd"}
    exported = tmp_path / "student.ts"
    assert (
        main(["export", str(out), "--format", "torchscript", "--out", str(exported), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(exported) and report["bytes"] == exported.stat().st_size
    assert report["max_abs_diff"] < 1e-4 and report["checked_with"].startswith("torch.jit")
    assert exported.stat().st_mode & 0o044 == 0o044  # a file to ship: others may read it


def test_quiet_mode_prints_nothing_but_errors(tiny_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train-teacher", str(tiny_config), "--out", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "teacher" not in captured.err
    assert (out / "teacher.pt").is_file()
    assert main(["train-teacher", str(tiny_config), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert Style(Terminal())("error", "31") == "\033[31merror\033[0m"
    assert Style(io.StringIO())("error", "31") == "error"
    monkeypatch.setenv("NO_COLOR", "1")
    assert Style(Terminal())("error", "31") == "error"


def test_errors_in_a_pipe_carry_no_escape_codes(tmp_path: Path, capsys) -> None:
    assert main(["distill", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smskd: error:") and "\033[" not in err


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``smskd WORDS`` (the last word is the one being typed)."""
    line = " ".join(f"'{w}'" for w in ("smskd", *words))
    command = (
        f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _smskd; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_bash_completion_offers_commands_options_and_choices(tmp_path: Path) -> None:
    script = tmp_path / "smskd.bash"
    script.write_text(completion_script(build_parser(), "bash"))
    assert complete(script, "ex") == ["export"]
    assert set(complete(script, "")) >= {"distill", "sweep", "export", "--version"}
    assert complete(script, "export", "run", "--format", "o") == ["onnx"]
    assert complete(script, "export", "run", "--format", "") == [
        "onnx",
        "safetensors",
        "torchscript",
    ]
    assert set(complete(script, "distill", "--re")) == {"--resume"}
    assert complete(script, "completion", "z") == ["zsh"]
    (tmp_path / "configs").mkdir()
    assert complete(script, "distill", str(tmp_path / "conf")) == [str(tmp_path / "configs")]
    zsh = completion_script(build_parser(), "zsh")
    assert zsh.startswith("autoload -U +X bashcompinit && bashcompinit\n")
