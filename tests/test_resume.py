"""Mid-epoch checkpoints, graceful stop, and NaN/Inf handling, in process."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
from fakes import fail_on_call

import smskd.train.epoch as engine
from smskd.config import Stage
from smskd.errors import UserError
from smskd.store.checkpoint import atomic_save, checksum_path, move_checkpoint, safe_load
from smskd.train.interrupt import RunStopped
from smskd.train.stages import run_stages

QUIET = {"progress": False, "log": lambda _: None}


def stages() -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.1}),
        Stage(methods=["crd"], epochs=2, optimizer={"lr": 0.1}),  # memory bank + RNG draws
    ]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def reference_run(student, live_teacher, indexed_data):
    """An uninterrupted run: the result every interrupted run must reproduce exactly."""
    initial = snapshot(student)
    result = run_stages(student, live_teacher, stages(), *indexed_data, **QUIET)
    expected = snapshot(result.student), [dict(r) for r in result.history]
    student.load_state_dict(initial)
    return expected


def strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time"} for r in history]


def test_crash_mid_epoch_resumes_bit_identical_from_a_step_checkpoint(
    student, live_teacher, indexed_data, tmp_path, monkeypatch, reference_run
):
    expected_weights, expected_history = reference_run
    # 4 batches an epoch, 2 epochs a stage; a checkpoint every 3 steps of an epoch. The
    # crash on call 12 is stage 2, epoch 1, step 4: the last checkpoint is after step 3.
    fail_on_call(monkeypatch, "step_loss", 12, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(
            student,
            live_teacher,
            stages(),
            *indexed_data,
            out_dir=tmp_path,
            checkpoint_every_steps=3,
            **QUIET,
        )
    state = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["step"]) == (1, 0, 3)
    monkeypatch.undo()
    torch.manual_seed(12345)  # a new process: other global RNG state
    resumed = run_stages(
        student,
        live_teacher,
        stages(),
        *indexed_data,
        out_dir=tmp_path,
        resume=True,
        checkpoint_every_steps=3,
        **QUIET,
    )
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
    assert strip_times(resumed.history) == strip_times(expected_history)  # metrics too


def test_sigint_finishes_the_step_checkpoints_and_resumes_identically(
    student, live_teacher, indexed_data, tmp_path, monkeypatch, reference_run
):
    expected_weights, _ = reference_run
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when CI runs us in the background
    real = engine.step_loss
    calls = {"n": 0}

    def interrupt_on_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step is running
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "step_loss", interrupt_on_step_6)
    with pytest.raises(RunStopped, match="stopped by SIGINT in stage 1") as info:
        run_stages(student, live_teacher, stages(), *indexed_data, out_dir=tmp_path, **QUIET)
    assert info.value.exit_code == 130
    assert calls["n"] == 6  # the step in flight finished; no further step started
    state = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["step"]) == (0, 1, 2)  # 4 steps/epoch
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    monkeypatch.undo()
    resumed = run_stages(
        student, live_teacher, stages(), *indexed_data, out_dir=tmp_path, resume=True, **QUIET
    )
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key


def nan_on_call(monkeypatch, call: int) -> None:
    real = engine.step_loss
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        total, terms = real(*args, **kwargs)
        if calls["n"] == call:
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(engine, "step_loss", wrapper)


def test_nan_loss_stops_naming_stage_epoch_and_step(
    student, live_teacher, indexed_data, tmp_path, monkeypatch
):
    nan_on_call(monkeypatch, 7)  # stage 1, epoch 2, step 3
    with pytest.raises(UserError, match=r"stage 1 \(kd\), epoch 2, step 3"):
        run_stages(student, live_teacher, stages(), *indexed_data, out_dir=tmp_path, **QUIET)
    state = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["step"]) == (0, 1, 0)  # last good epoch
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_nan_batches_can_be_skipped_and_are_counted(
    student, live_teacher, indexed_data, monkeypatch
):
    nan_on_call(monkeypatch, 2)
    result = run_stages(student, live_teacher, stages(), *indexed_data, nonfinite="skip", **QUIET)
    assert [r["train_skipped_batches"] for r in result.history] == [1, 0, 0, 0]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_resuming_a_finished_run_says_so(student, live_teacher, indexed_data, tmp_path):
    run_stages(student, live_teacher, stages()[:1], *indexed_data, out_dir=tmp_path, **QUIET)
    said, again = resume_saying(student, live_teacher, indexed_data, tmp_path)
    assert said == ["smskd: already complete; nothing to train"]
    assert len(again.history) == 2  # the finished run's records, nothing retrained


def resume_saying(student, teacher, data, out) -> tuple[list[str], object]:
    """Resume the one-stage run in ``out``: what it logged, and its result."""
    said: list[str] = []
    result = run_stages(
        student,
        teacher,
        stages()[:1],
        *data,
        out_dir=out,
        resume=True,
        progress=False,
        log=said.append,
    )
    return said, result


def test_resuming_with_another_thread_count_says_it_is_not_bit_identical(
    student, live_teacher, indexed_data, tmp_path
):
    threads = torch.get_num_threads()
    run_stages(student, live_teacher, stages()[:1], *indexed_data, out_dir=tmp_path, **QUIET)
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    state = safe_load(checkpoint)
    state["epoch"] = 1  # as if killed after epoch 1 of 2
    atomic_save(state, checkpoint)

    def resume_with(count: int) -> list[str]:
        torch.set_num_threads(count)
        try:
            said, _ = resume_saying(student, live_teacher, indexed_data, tmp_path)
        finally:
            torch.set_num_threads(threads)
        return [line for line in said if "CPU threads" in line]

    assert resume_with(threads) == []
    atomic_save(state, checkpoint)
    (note,) = resume_with(threads + 1)
    assert f"with {threads} CPU threads" in note and f"OMP_NUM_THREADS={threads}" in note
    # The run's first count is kept: the finished run's last.pt names it; with nothing
    # left to train there is nothing to say.
    assert safe_load(checkpoint)["threads"] == threads
    assert resume_with(threads + 1) == []


# ------------------------------------------- checkpoints that belong to another run (CLI)

RUN_YAML = """\
data: {name: digits, train_subset: 64}
student: {model: convnet-xs}
stages: [{epochs: 1}, {epochs: 2}]
reference: {weighting: fixed}
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Finished CLI runs of one config: ``ours`` and, each differing in one way, foreign ones."""
    from smskd.cli.commands import main

    root = tmp_path_factory.mktemp("runs")
    config = root / "run.yaml"
    config.write_text(RUN_YAML)
    variants = {
        "ours": [],
        "seed": ["--set", "seed=1"],
        "layout": ["--set", "stages.1.epochs=3"],
        "lr": ["--set", "stages.0.optimizer.lr=0.1"],
    }
    for name, overrides in variants.items():
        assert main(["distill", str(config), "--out", str(root / name), *overrides]) == 0
    return root


def copy_of_ours(cli_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_runs / "ours", run)
    return run, run / "checkpoints"


def copy_checkpoint(src, dst) -> None:
    """A checkpoint and its sidecar, as a user copies them (``cp last.pt* ...``)."""
    shutil.copyfile(src, dst)
    shutil.copyfile(checksum_path(src), checksum_path(dst))


def rewind_to_mid_stage_2(checkpoints) -> None:
    """last.pt becomes last.prev.pt: after stage 2's first epoch, so the resume rebuilds
    stage 2's reference from stage1.pt."""
    move_checkpoint(checkpoints / "last.prev.pt", checkpoints / "last.pt")


def resume_error(cli_runs, run, capsys) -> str:
    from smskd.cli.commands import main

    capsys.readouterr()
    code = main(["distill", str(cli_runs / "run.yaml"), "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "weights_only" not in err
    return err


@pytest.mark.parametrize(
    ("other", "says"),
    [
        ("seed", "(seed 1; this run has seed 0)"),
        (
            "layout",
            "(stages ce (1 epoch), ce (3 epochs); this run has ce (1 epoch), ce (2 epochs))",
        ),
        ("lr", "(stages.0.optimizer.lr is 0.1; this run has 0.05)"),
    ],
)
def test_a_last_checkpoint_from_another_run_is_refused(cli_runs, tmp_path, capsys, other, says):
    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    student = (run / "student.pt").read_bytes()
    copy_checkpoint(cli_runs / other / "checkpoints" / "last.pt", checkpoints / "last.pt")
    err = resume_error(cli_runs, run, capsys)
    assert f"last.pt' belongs to another run {says}; resume the run it came from" in err
    assert "--force" in err
    assert (run / "student.pt").read_bytes() == student


def test_the_previous_checkpoint_fallback_refuses_another_run_too(cli_runs, tmp_path, capsys):
    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    copy_checkpoint(cli_runs / "seed" / "checkpoints" / "last.pt", checkpoints / "last.prev.pt")
    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged: the resume falls back
    err = resume_error(cli_runs, run, capsys)
    assert "last.pt' is truncated" in err
    assert "last.prev.pt' belongs to another run (seed 1; this run has seed 0)" in err


def test_a_stage_snapshot_from_another_run_is_refused(cli_runs, tmp_path, capsys):
    from smskd.cli.commands import main

    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    rewind_to_mid_stage_2(checkpoints)
    copy_checkpoint(cli_runs / "seed" / "checkpoints" / "stage1.pt", checkpoints / "stage1.pt")
    err = resume_error(cli_runs, run, capsys)
    assert "stage1.pt' belongs to another run: its SHA-256 is not the one recorded" in err
    # The same resume with the run's own stage1.pt finishes as the run did.
    copy_checkpoint(cli_runs / "ours" / "checkpoints" / "stage1.pt", checkpoints / "stage1.pt")
    assert main(["distill", str(cli_runs / "run.yaml"), "--out", str(run), "--resume"]) == 0
    assert (
        safe_load(run / "student.pt").keys() == safe_load(cli_runs / "ours" / "student.pt").keys()
    )
    for key, value in safe_load(run / "student.pt").items():
        assert torch.equal(value, safe_load(cli_runs / "ours" / "student.pt")[key]), key


def test_a_checkpoint_of_a_newer_format_is_refused(cli_runs, tmp_path, capsys):
    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    state = safe_load(checkpoints / "last.pt")
    state["format"] = 99
    atomic_save(state, checkpoints / "last.pt")
    err = resume_error(cli_runs, run, capsys)
    assert "last.pt' has checkpoint format 99, from a newer smskd (this one reads up to 1)" in err


def test_plain_weights_as_the_last_checkpoint_are_refused(cli_runs, tmp_path, capsys):
    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    copy_checkpoint(run / "student.pt", checkpoints / "last.pt")
    err = resume_error(cli_runs, run, capsys)
    assert "last.pt' is not a run checkpoint" in err


def test_a_checkpoint_from_before_identities_still_resumes(cli_runs, tmp_path):
    from smskd.cli.commands import main

    run, checkpoints = copy_of_ours(cli_runs, tmp_path)
    rewind_to_mid_stage_2(checkpoints)
    state = safe_load(checkpoints / "last.pt")
    del state["identity"], state["snapshots"]  # as an older smskd wrote it
    atomic_save(state, checkpoints / "last.pt")
    assert main(["distill", str(cli_runs / "run.yaml"), "--out", str(run), "--resume"]) == 0


def test_the_python_api_identifies_a_run_by_its_reference_settings_too(
    student, live_teacher, indexed_data, tmp_path
):
    from smskd.config import ReferenceConfig

    two = [Stage(methods=["kd"], epochs=1), Stage(methods=["kd"], epochs=1)]
    run_stages(student, live_teacher, two, *indexed_data, out_dir=tmp_path, **QUIET)
    with pytest.raises(UserError, match=r"\(reference.lam is 1.0; this run has 2.0\)"):
        run_stages(
            student,
            live_teacher,
            two,
            *indexed_data,
            reference=ReferenceConfig(lam=2.0),
            out_dir=tmp_path,
            resume=True,
            **QUIET,
        )
