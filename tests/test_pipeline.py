"""The stage loop: reference from stage 2, weights carried, helpers dropped, resume."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fakes import make_live_teacher, make_student, make_tiny_data
from torch.utils.data import DataLoader

import smskd.train.stages as pipeline
from smskd.config import ReferenceConfig, Stage
from smskd.errors import UserError
from smskd.methods.registry import METHODS
from smskd.store.checkpoint import safe_load
from smskd.train.stages import RunResult, run_stages


def run(student, teacher, stages, data, **kwargs):
    """``run_stages`` without a progress bar or log lines."""
    return run_stages(student, teacher, stages, *data, progress=False, log=lambda _: None, **kwargs)


def three_stages(epochs: int = 1) -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=epochs, optimizer={"lr": 0.1}),
        Stage(methods=["fitnets"], epochs=epochs, optimizer={"lr": 0.1}),
        Stage(methods=["rkd"], epochs=epochs, optimizer={"lr": 0.1}),
    ]


def recording_references(monkeypatch) -> list[tuple[torch.nn.Module, dict, torch.nn.Module]]:
    """Record every reference the pipeline makes, with the student state it copied."""
    made = []
    original = pipeline.make_reference

    def recording(student, state=None, **options):
        reference = original(student, state, **options)
        made.append((reference, {k: v.clone() for k, v in student.state_dict().items()}, student))
        return reference

    monkeypatch.setattr(pipeline, "make_reference", recording)
    return made


@pytest.fixture
def references(monkeypatch) -> list[tuple[torch.nn.Module, dict, torch.nn.Module]]:
    return recording_references(monkeypatch)


@dataclass
class ThreeStageRun:
    """One plain three-stage run (KD → FitNets → RKD) with a run directory, and what was
    true before it: the tests that only read a finished run share it."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    student_keys_before: set[str]
    teacher_before: dict[str, torch.Tensor]
    references: list[tuple[torch.nn.Module, dict, torch.nn.Module]]
    result: RunResult
    out_dir: Path
    train: DataLoader


@pytest.fixture(scope="module")
def three_stage_run(tmp_path_factory) -> ThreeStageRun:
    student, teacher, (train, test) = make_student(), make_live_teacher(), make_tiny_data()
    keys_before = set(student.state_dict())
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out_dir = tmp_path_factory.mktemp("three_stages")
    with pytest.MonkeyPatch.context() as patch:
        references = recording_references(patch)
        result = run(student, teacher, three_stages(), (train, test), out_dir=out_dir)
    return ThreeStageRun(
        student, teacher, keys_before, teacher_before, references, result, out_dir, train
    )


def test_stage_one_has_no_reference_and_later_stages_do(three_stage_run) -> None:
    result, references = three_stage_run.result, three_stage_run.references
    assert len(references) == 2  # stages 2 and 3
    by_stage = {r["stage"]: r for r in result.history}
    assert "train_reference" not in by_stage[1]
    assert by_stage[2]["train_reference"] > 0 and by_stage[3]["train_reference"] > 0
    assert 0 <= by_stage[2]["train_ref_weight_mean"] <= 1  # λ·(1 − TCP) with λ = 1


def test_student_carried_across_stages_and_reference_is_previous_student(three_stage_run) -> None:
    student, references = three_stage_run.student, three_stage_run.references
    assert three_stage_run.result.student is student
    for k, (reference, copied, source) in enumerate(references, start=1):
        assert source is student and reference is not student
        # Made before the stage's taps: a copied hook would overwrite the student's features.
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in reference.modules())
        stage_end = safe_load(three_stage_run.out_dir / "checkpoints" / f"stage{k}.pt")
        # The reference of stage k+1 is the student as stage k left it, and it never moved:
        # it computes what that student computes (in its inference form: BN folded).
        for key, value in copied.items():
            assert torch.equal(value, stage_end[key]), key
        as_left = copy.deepcopy(student)
        as_left.load_state_dict(stage_end)
        x = next(iter(three_stage_run.train))[0]
        with torch.no_grad():
            torch.testing.assert_close(reference(x), as_left.eval()(x), rtol=1e-5, atol=1e-6)
    final = student.state_dict()
    assert any(not torch.equal(final[k], references[-1][1][k]) for k in final)


def test_stage_owned_helpers_and_hooks_are_dropped(three_stage_run) -> None:
    student, teacher = three_stage_run.student, three_stage_run.teacher
    # No regressor left in the student.
    assert set(student.state_dict()) == three_stage_run.student_keys_before
    for module in list(student.modules()) + list(teacher.modules()):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_teacher_is_never_updated(three_stage_run) -> None:
    teacher, before = three_stage_run.teacher, three_stage_run.teacher_before
    for key, value in teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.parameters())


def test_weighting_none_builds_no_reference(student, live_teacher, tiny_data, references) -> None:
    result = run(
        student,
        live_teacher,
        three_stages(),
        tiny_data,
        reference=ReferenceConfig(weighting="none"),
    )
    assert references == []
    assert all("train_reference" not in r for r in result.history)


# The zoo CNNs have no per-token features: the language-model feature methods are
# tested on transformers (tests/test_lm_methods.py, tests/test_language_models.py).
IMAGE_METHODS = sorted(name for name, cls in METHODS.items() if not cls.needs_sequences)


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_every_method_works_inside_a_two_stage_run(name, student, live_teacher, indexed_data):
    teacher_before = {k: v.clone() for k, v in live_teacher.state_dict().items()}
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=[name], epochs=1)]
    result = run(student, live_teacher, stages, indexed_data)
    assert [r["stage"] for r in result.history] == [1, 2]
    value = result.history[-1][f"train_{name}"]
    assert math.isfinite(value) and (name == "vid" or value > 0)  # VID's NLL may be < 0
    for key, tensor in live_teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[key]), key
    assert all(p.grad is None for p in live_teacher.parameters())


def test_run_directory_contents(three_stage_run) -> None:
    out_dir = three_stage_run.out_dir
    weights = torch.load(out_dir / "student.pt", weights_only=True)
    assert set(weights) == set(three_stage_run.student.state_dict())
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    files = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
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
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    stages = three_stages(epochs=2)
    reference_run = run(student, live_teacher, stages, tiny_data, out_dir=tmp_path / "a")
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
        run(student, live_teacher, stages, tiny_data, out_dir=tmp_path / "b")
    monkeypatch.setattr(pipeline, "evaluate", real_evaluate)

    student.load_state_dict(initial)  # a fresh process builds a fresh student
    torch.manual_seed(999)
    resumed = run(student, live_teacher, stages, tiny_data, out_dir=tmp_path / "b", resume=True)
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [r["global_epoch"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]


def test_methods_without_teacher_are_refused(student, tiny_data) -> None:
    with pytest.raises(UserError, match="no teacher"):
        run(student, None, [Stage(methods=["kd"], epochs=1)], tiny_data)


def test_empty_stage_list_is_refused(student, live_teacher, tiny_data) -> None:
    with pytest.raises(UserError, match="empty"):
        run(student, live_teacher, [], tiny_data)


def test_crash_between_stages_still_resumes(
    student, live_teacher, tiny_data, tmp_path, monkeypatch
):
    """Killed while writing the stage-end checkpoints, the run resumes into stage 2 and
    rebuilds stage 2's reference from stage1.pt."""
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    stages = three_stages(epochs=2)
    expected = run(student, live_teacher, stages, tiny_data).student.state_dict()
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
        run(student, live_teacher, stages, tiny_data, out_dir=tmp_path)
    assert saves == ["last.pt", "stage1.pt", "last.pt"]
    monkeypatch.setattr(pipeline, "atomic_save", real_save)
    student.load_state_dict(initial)
    resumed = run(student, live_teacher, stages, tiny_data, out_dir=tmp_path, resume=True)
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_failed_stage_build_leaves_no_hooks(student, live_teacher, tiny_data) -> None:
    bad = [Stage(methods=[{"name": "fitnets", "teacher_layer": "nope"}], epochs=1)]
    with pytest.raises(UserError, match="teacher has no module named 'nope'"):
        run(student, live_teacher, bad, tiny_data)
    for module in list(student.modules()) + list(live_teacher.modules()):
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_tcp_weighting_without_teacher_is_refused_before_training(student, tiny_data) -> None:
    stages = [Stage(epochs=1), Stage(epochs=1)]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(UserError, match="no teacher was given"):
        run(student, None, stages, tiny_data)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    fixed = run(student, None, stages, tiny_data, reference=ReferenceConfig(weighting="fixed"))
    assert "train_reference" in fixed.history[-1]


def test_check_stages_leaves_an_unfrozen_teacher_untouched(student, live_teacher, tiny_data):
    from smskd.train.stages import check_stages

    before = {k: v.clone() for k, v in live_teacher.state_dict().items()}
    stages = [Stage(methods=["fitnets"], epochs=1), Stage(methods=["rkd"], epochs=1)]
    check_stages(student, live_teacher, stages, next(iter(tiny_data[0])))
    for key, value in live_teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks for m in live_teacher.modules())
