"""Mid-epoch checkpoints, graceful stop, and NaN/Inf handling, in process."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from fakes import fail_on_call

import smskd.engine as engine
from smskd.checkpoint import safe_load
from smskd.config import Stage
from smskd.errors import UserError
from smskd.interrupt import RunStopped
from smskd.pipeline import run_stages

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
    said: list[str] = []
    again = run_stages(
        student,
        live_teacher,
        stages()[:1],
        *indexed_data,
        out_dir=tmp_path,
        resume=True,
        progress=False,
        log=said.append,
    )
    assert said == ["smskd: already complete; nothing to train"]
    assert len(again.history) == 2  # the finished run's records, nothing retrained
