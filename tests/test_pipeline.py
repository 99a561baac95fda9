"""The stage loop: reference from stage 2, weights carried, helpers dropped, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import smskd.train.stages as pipeline
from smskd.config import ReferenceConfig, Stage
from smskd.errors import UserError
from smskd.methods.registry import METHODS
from smskd.store.checkpoint import safe_load
from smskd.train.stages import run_stages


def three_stages(epochs: int = 1) -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=epochs, optimizer={"lr": 0.1}),
        Stage(methods=["fitnets"], epochs=epochs, optimizer={"lr": 0.1}),
        Stage(methods=["rkd"], epochs=epochs, optimizer={"lr": 0.1}),
    ]


@pytest.fixture
def references(monkeypatch) -> list[tuple[torch.nn.Module, dict, torch.nn.Module]]:
    """Record every reference the pipeline makes, with the student state it copied."""
    made = []
    original = pipeline.make_reference

    def recording(student, state=None):
        reference = original(student, state)
        made.append((reference, {k: v.clone() for k, v in student.state_dict().items()}, student))
        return reference

    monkeypatch.setattr(pipeline, "make_reference", recording)
    return made


def test_stage_one_has_no_reference_and_later_stages_do(
    student, live_teacher, tiny_data, references, tmp_path
) -> None:
    train, test = tiny_data
    result = run_stages(
        student,
        live_teacher,
        three_stages(),
        train,
        test,
        out_dir=tmp_path,
        progress=False,
        log=lambda _: None,
    )
    assert len(references) == 2  # stages 2 and 3
    by_stage = {r["stage"]: r for r in result.history}
    assert "train_reference" not in by_stage[1]
    assert by_stage[2]["train_reference"] > 0 and by_stage[3]["train_reference"] > 0
    assert 0 <= by_stage[2]["train_ref_weight_mean"] <= 1  # λ·(1 − TCP) with λ = 1


def test_student_carried_across_stages_and_reference_is_previous_student(
    student, live_teacher, tiny_data, references, tmp_path
) -> None:
    train, test = tiny_data
    result = run_stages(
        student,
        live_teacher,
        three_stages(),
        train,
        test,
        out_dir=tmp_path,
        progress=False,
        log=lambda _: None,
    )
    assert result.student is student
    for k, (reference, copied, source) in enumerate(references, start=1):
        assert source is student and reference is not student
        # Made before the stage's taps: a copied hook would overwrite the student's features.
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in reference.modules())
        stage_end = safe_load(tmp_path / "checkpoints" / f"stage{k}.pt")
        # The reference of stage k+1 is the student as stage k left it, and it never moved:
        # it computes what that student computes (in its inference form: BN folded).
        for key, value in copied.items():
            assert torch.equal(value, stage_end[key]), key
        as_left = copy.deepcopy(student)
        as_left.load_state_dict(stage_end)
        x = next(iter(train))[0]
        with torch.no_grad():
            torch.testing.assert_close(reference(x), as_left.eval()(x), rtol=1e-5, atol=1e-6)
    final = student.state_dict()
    assert any(not torch.equal(final[k], references[-1][1][k]) for k in final)


def test_stage_owned_helpers_and_hooks_are_dropped(student, live_teacher, tiny_data) -> None:
    train, test = tiny_data
    keys_before = set(student.state_dict())
    run_stages(
        student, live_teacher, three_stages(), train, test, progress=False, log=lambda _: None
    )
    assert set(student.state_dict()) == keys_before  # no regressor left in the student
    for module in list(student.modules()) + list(live_teacher.modules()):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_teacher_is_never_updated(student, live_teacher, tiny_data) -> None:
    train, test = tiny_data
    teacher = live_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    run_stages(
        student, live_teacher, three_stages(), train, test, progress=False, log=lambda _: None
    )
    for key, value in teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.parameters())


def test_weighting_none_builds_no_reference(student, live_teacher, tiny_data, references) -> None:
    train, test = tiny_data
    result = run_stages(
        student,
        live_teacher,
        three_stages(),
        train,
        test,
        reference=ReferenceConfig(weighting="none"),
        progress=False,
        log=lambda _: None,
    )
    assert references == []
    assert all("train_reference" not in r for r in result.history)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_inside_a_two_stage_run(name, student, live_teacher, indexed_data):
    train, test = indexed_data
    teacher_before = {k: v.clone() for k, v in live_teacher.state_dict().items()}
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=[name], epochs=1)]
    result = run_stages(
        student, live_teacher, stages, train, test, progress=False, log=lambda _: None
    )
    assert [r["stage"] for r in result.history] == [1, 2]
    value = result.history[-1][f"train_{name}"]
    assert math.isfinite(value) and (name == "vid" or value > 0)  # VID's NLL may be < 0
    for key, tensor in live_teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[key]), key
    assert all(p.grad is None for p in live_teacher.parameters())


def test_run_directory_contents(student, live_teacher, tiny_data, tmp_path) -> None:
    train, test = tiny_data
    run_stages(
        student,
        live_teacher,
        three_stages(),
        train,
        test,
        out_dir=tmp_path,
        progress=False,
        log=lambda _: None,
    )
    weights = torch.load(tmp_path / "student.pt", weights_only=True)
    assert set(weights) == set(student.state_dict())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [f for f in files if not f.endswith(".sha256")] == [
        "last.prev.pt",
        "last.pt",
        "stage1.pt",
        "stage2.pt",
        "stage3.pt",
    ]
    checkpoints = [f for f in files if not f.endswith(".sha256")]
    assert [f for f in files if f.endswith(".sha256")] == [f"{f}.sha256" for f in checkpoints]


def test_resume_after_a_crash_is_bit_identical(
    student, live_teacher, tiny_data, tmp_path, monkeypatch
):
    train, test = tiny_data
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    stages = three_stages(epochs=2)
    reference_run = run_stages(
        student,
        live_teacher,
        stages,
        train,
        test,
        out_dir=tmp_path / "a",
        progress=False,
        log=lambda _: None,
    )
    expected = {k: v.clone() for k, v in reference_run.student.state_dict().items()}

    student.load_state_dict(initial)
    calls = {"n": 0}
    real_evaluate = pipeline.evaluate

    def crash_after_three_epochs(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 4 = stage 2, epoch 2: mid-stage, reference live
            raise RuntimeError("simulated crash")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", crash_after_three_epochs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        torch.manual_seed(123)  # the crashed process had another RNG history
        run_stages(
            student,
            live_teacher,
            stages,
            train,
            test,
            out_dir=tmp_path / "b",
            progress=False,
            log=lambda _: None,
        )
    monkeypatch.setattr(pipeline, "evaluate", real_evaluate)

    student.load_state_dict(initial)  # a fresh process builds a fresh student
    torch.manual_seed(999)
    resumed = run_stages(
        student,
        live_teacher,
        stages,
        train,
        test,
        out_dir=tmp_path / "b",
        resume=True,
        progress=False,
        log=lambda _: None,
    )
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [r["global_epoch"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]


def test_methods_without_teacher_are_refused(student, tiny_data) -> None:
    train, test = tiny_data
    with pytest.raises(UserError, match="no teacher"):
        run_stages(
            student,
            None,
            [Stage(methods=["kd"], epochs=1)],
            train,
            test,
            progress=False,
            log=lambda _: None,
        )


def test_empty_stage_list_is_refused(student, live_teacher, tiny_data) -> None:
    with pytest.raises(UserError, match="empty"):
        run_stages(student, live_teacher, [], *tiny_data, progress=False)


def test_crash_between_stages_still_resumes(
    student, live_teacher, tiny_data, tmp_path, monkeypatch
):
    """Killed while writing the stage-end checkpoints, the run resumes into stage 2 and
    rebuilds stage 2's reference from stage1.pt."""
    train, test = tiny_data
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    stages = three_stages(epochs=2)
    expected = run_stages(
        student, live_teacher, stages, train, test, progress=False, log=lambda _: None
    ).student.state_dict()
    expected = {k: v.clone() for k, v in expected.items()}
    student.load_state_dict(initial)
    real_save = pipeline.atomic_save
    saves = []

    def dies_on_the_second_last_pt(obj, path, **kwargs):
        saves.append(path.name)
        if path.name == "last.pt" and saves.count("last.pt") == 2:
            raise KeyboardInterrupt  # end of stage 1: stage1.pt written, last.pt not
        real_save(obj, path, **kwargs)

    monkeypatch.setattr(pipeline, "atomic_save", dies_on_the_second_last_pt)
    with pytest.raises(KeyboardInterrupt):
        run_stages(
            student,
            live_teacher,
            stages,
            train,
            test,
            out_dir=tmp_path,
            progress=False,
            log=lambda _: None,
        )
    assert saves == ["last.pt", "stage1.pt", "last.pt"]
    monkeypatch.setattr(pipeline, "atomic_save", real_save)
    student.load_state_dict(initial)
    resumed = run_stages(
        student,
        live_teacher,
        stages,
        train,
        test,
        out_dir=tmp_path,
        resume=True,
        progress=False,
        log=lambda _: None,
    )
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_failed_stage_build_leaves_no_hooks(student, live_teacher, tiny_data) -> None:
    train, test = tiny_data
    bad = [Stage(methods=[{"name": "fitnets", "teacher_layer": "nope"}], epochs=1)]
    with pytest.raises(UserError, match="teacher has no module named 'nope'"):
        run_stages(student, live_teacher, bad, train, test, progress=False, log=lambda _: None)
    for module in list(student.modules()) + list(live_teacher.modules()):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_tcp_weighting_without_teacher_is_refused_before_training(student, tiny_data) -> None:
    stages = [Stage(epochs=1), Stage(epochs=1)]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(UserError, match="no teacher was given"):
        run_stages(student, None, stages, *tiny_data, progress=False, log=lambda _: None)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    fixed = run_stages(
        student,
        None,
        stages,
        *tiny_data,
        progress=False,
        log=lambda _: None,
        reference=ReferenceConfig(weighting="fixed"),
    )
    assert "train_reference" in fixed.history[-1]


def test_check_stages_leaves_an_unfrozen_teacher_untouched(student, live_teacher, tiny_data):
    from smskd.train.stages import check_stages

    before = {k: v.clone() for k, v in live_teacher.state_dict().items()}
    stages = [Stage(methods=["fitnets"], epochs=1), Stage(methods=["rkd"], epochs=1)]
    check_stages(student, live_teacher, stages, next(iter(tiny_data[0])))
    for key, value in live_teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in live_teacher.modules())
