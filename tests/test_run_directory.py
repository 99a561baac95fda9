"""A user's files are sacred: smskd writes only into directories that are its own, and
``--force`` removes only what smskd wrote there, naming it (through the real CLI)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import yaml

import smskd.experiment
from smskd.cli.commands import main

# Teacher (trained into OUT/teacher) and student, one epoch each on 64 digits: ~2 s.
TINY = {
    "data": {"name": "digits", "train_subset": 64},
    "teacher": {"model": "convnet-xs", "epochs": 1},
    "student": {"model": "convnet-xs"},
    "stages": [{"methods": ["kd"], "epochs": 1}, {"methods": ["rkd"], "epochs": 1}],
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _distill(config: Path, out: Path, *extra: str) -> int:
    return main(["distill", str(config), "--out", str(out), "--no-progress", *extra])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smskd: error: "), lines
    return lines[0]


def test_force_refuses_a_directory_smskd_did_not_write(config, tmp_path, capsys) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("work")
    (user / "config.yaml").write_text("mine")  # a name smskd also writes
    assert _distill(config, user, "--force") == 2
    assert "is not an smskd directory" in _error(capsys)
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "thesis.tex"]
    assert (user / "config.yaml").read_text() == "mine"
    # Without --force the same: nothing is written beside a user's files.
    assert _distill(config, user) == 2
    assert "choose another --out" in _error(capsys)
    assert sorted(p.name for p in user.iterdir()) == ["config.yaml", "thesis.tex"]


def test_force_removes_only_what_smskd_wrote_and_names_it(config, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _distill(config, out) == 0
    (out / "NOTES.md").write_text("my notes")
    (out / "checkpoints" / "mine.txt").write_text("mine")
    (out / "teacher" / "teacher-notes.txt").write_text("about the teacher")
    (out / "drafts").mkdir()  # an empty folder of the user's
    capsys.readouterr()

    assert _distill(config, out, "--force") == 0
    said = capsys.readouterr().out
    assert "--force: removed what smskd wrote in" in said
    assert "config.yaml" in said and "checkpoints/" in said and "teacher/" in said
    assert "kept what smskd did not write: NOTES.md" in said
    assert (out / "NOTES.md").read_text() == "my notes"
    assert (out / "checkpoints" / "mine.txt").read_text() == "mine"
    assert (out / "teacher" / "teacher-notes.txt").read_text() == "about the teacher"
    assert (out / "drafts").is_dir()
    # And the run started over (the teacher trained again), not appended to the old one.
    assert (out / "student.pt").is_file() and (out / "teacher" / "teacher.pt").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert len((out / "teacher" / "metrics.jsonl").read_text().splitlines()) == 1


def test_quickstart_force_refuses_a_directory_smskd_did_not_write(tmp_path, capsys) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("work")
    assert main(["quickstart", "--out", str(user), "--force", "--no-progress"]) == 2
    assert "is not an smskd directory" in _error(capsys)
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]


def test_a_run_is_not_written_into_a_quickstart_or_sweep_directory(
    config, tmp_path, capsys
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "index.json").write_text("{}")  # a sweep directory (from before the marker)
    assert _distill(config, out, "--force") == 2
    assert "holds an smskd sweep, not a run" in _error(capsys)
    assert [p.name for p in out.iterdir()] == ["index.json"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda out: (out / "checkpoints").write_text("x"), "checkpoints is a file"),
        (lambda out: (out / "student.pt").mkdir(), "student.pt is a directory"),
        (lambda out: (out / "metrics.jsonl").mkdir(), "metrics.jsonl is a directory"),
    ],
    ids=["checkpoints-file", "student-pt-dir", "metrics-dir"],
)
def test_a_damaged_run_directory_is_one_line_before_training(
    config, tmp_path, capsys, make, expected
) -> None:
    out = tmp_path / "run"
    assert _distill(config, out) == 0
    (out / "checkpoints").rename(tmp_path / "old-checkpoints")
    (out / "student.pt").unlink()
    (out / "metrics.jsonl").unlink()
    make(out)
    capsys.readouterr()
    assert _distill(config, out, "--resume") == 2
    assert expected in _error(capsys)


def test_out_that_is_a_file_is_one_line(config, tmp_path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("a user's file")
    assert _distill(config, out, "--force") == 2
    assert "a file of that name exists" in _error(capsys)
    assert out.read_text() == "a user's file"


def test_an_os_error_during_a_run_is_one_line(config, tmp_path, capsys, monkeypatch) -> None:
    """A full disk or a directory made read-only under a running job (which a check
    before the run cannot foresee) is one line naming the file, not a traceback."""

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt"))

    monkeypatch.setattr(smskd.experiment, "run_stages", disk_full)
    assert _distill(config, tmp_path / "run") == 2
    line = _error(capsys)
    assert "No space left on device" in line and "x.pt" in line and "--resume" in line


def test_a_sweep_takes_a_directory_holding_only_a_teacher_trained_for_it(
    config, tmp_path, capsys
) -> None:
    """`smskd train-teacher --out SWEEP/teachers/x` first, then `smskd sweep --out SWEEP`
    (the study's recipe): the folder holds only smskd's run; anything else is refused."""
    from smskd.store import rundir

    sweep = tmp_path / "sweep"
    teacher = sweep / "teachers" / "resnet"
    assert main(["train-teacher", str(config), "--out", str(teacher), "--no-progress"]) == 0
    rundir.claim(sweep, rundir.SWEEP)  # taken
    assert rundir.kind_of(sweep) == "sweep"
    other = tmp_path / "other"
    (other / "teachers").mkdir(parents=True)
    (other / "teachers" / "notes.txt").write_text("mine")
    with pytest.raises(smskd.errors.UserError, match="is not an smskd directory"):
        rundir.claim(other, rundir.SWEEP)
