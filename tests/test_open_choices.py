"""The paper's open choices (shared/PAPER.md) as options: each against hand-computed
values, and all of them together through a crash and a resume."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import fail_on_call, make_student
from torch.utils.data import DataLoader, TensorDataset

from smskd import Stage, run_stages
from smskd.config import ReferenceConfig, ScheduleConfig, load_config
from smskd.errors import UserError
from smskd.store.checkpoint import safe_load
from smskd.train.reference import reference_term, reference_weights
from smskd.train.stage import build_optimizer, carry_student_state, lr_factor

QUIET = {"progress": False, "log": lambda _: None}
E = math.e


def test_tcp_temperature_tied_to_tau() -> None:
    teacher = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    same = torch.zeros(2, 2)  # student = reference: the KL is 0, the weights remain
    tied = ReferenceConfig(weighting="inverse_tcp", temperature=4.0, tcp_temperature="tau")
    _, weights = reference_term(tied, same, same, teacher, labels)
    # softmax([4, 0] / 4)[0] = e / (e + 1); softmax([0, 0])[1] = 1/2
    assert weights.tolist() == pytest.approx([1 - E / (E + 1), 0.5])
    plain = ReferenceConfig(weighting="inverse_tcp", temperature=4.0)
    _, weights = reference_term(plain, same, same, teacher, labels)
    assert weights.tolist() == pytest.approx([1 / (math.exp(4) + 1), 0.5], rel=1e-5)


def test_batch_mean_weights_keep_the_shape_at_mean_lambda() -> None:
    tcp = torch.tensor([0.9, 0.6, 1.0])
    raw = reference_weights("inverse_tcp", 2.0, tcp)  # 2·(0.1, 0.4, 0) = (0.2, 0.8, 0)
    scaled = reference_weights("inverse_tcp", 2.0, tcp, "batch_mean")
    assert raw.tolist() == pytest.approx([0.2, 0.8, 0.0])
    assert scaled.tolist() == pytest.approx([1.2, 4.8, 0.0])  # raw · λ / (1/3)
    assert scaled.mean().item() == pytest.approx(2.0)
    # A teacher sure of every sample: the raw weights are all 0, the scale is kept.
    sure = reference_weights("inverse_tcp", 2.0, torch.ones(3), "batch_mean")
    assert sure.tolist() == [2.0, 2.0, 2.0]
    assert reference_weights("fixed", 2.0, tcp, "batch_mean").tolist() == [2.0, 2.0, 2.0]


def test_anchoring_the_embedding_adds_its_mean_squared_difference() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    student_embedding = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    reference_embedding = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    cfg = ReferenceConfig(weighting="fixed", lam=0.5, anchor="logits+embedding")
    loss, _ = reference_term(
        cfg, logits, logits, None, torch.tensor([0, 1]), (student_embedding, reference_embedding)
    )
    # KL terms are 0 (same logits); per sample (1 + 4) / 2 and 9 / 2; mean of 0.5·that
    assert loss.item() == pytest.approx(0.5 * (2.5 + 4.5) / 2)
    with pytest.raises(ValueError, match="needs both embeddings"):
        reference_term(cfg, logits, logits, None, torch.tensor([0, 1]))


def test_lr_factors_of_one_schedule_over_the_run() -> None:
    cosine = [lr_factor(ScheduleConfig(name="cosine"), e, 4) for e in range(4)]
    assert cosine == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.1464466])
    steps = ScheduleConfig(name="multistep", milestones=[1, 3], gamma=0.5)
    assert [lr_factor(steps, e, 4) for e in range(4)] == [1.0, 0.5, 0.5, 0.25]
    assert lr_factor(ScheduleConfig(name="constant"), 3, 4) == 1.0


def test_carrying_keeps_the_students_momentum_and_drops_the_old_helpers() -> None:
    student = torch.nn.Linear(2, 2)
    old_helper, new_helper = torch.nn.Linear(2, 1), torch.nn.Linear(2, 3)
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    from smskd.config import OptimizerConfig

    before = build_optimizer(
        OptimizerConfig(**sgd), [*student.parameters(), *old_helper.parameters()]
    )
    (student(torch.ones(1, 2)).sum() + old_helper(torch.ones(1, 2)).sum()).backward()
    before.step()
    after = build_optimizer(
        OptimizerConfig(**sgd), [*student.parameters(), *new_helper.parameters()]
    )
    carry_student_state(before.state_dict(), after, count=2)
    for p in student.parameters():
        assert torch.equal(after.state[p]["momentum_buffer"], before.state[p]["momentum_buffer"])
    assert all(p not in after.state for p in new_helper.parameters())


def test_continue_needs_one_optimizer_and_schedule() -> None:
    config = {
        "teacher": {"model": "convnet-s"},
        "student": {"model": "convnet-xs"},
        "stages": [
            {"methods": ["kd"], "epochs": 1},
            {"methods": ["kd"], "epochs": 1, "optimizer": {"lr": 0.5}},
        ],
        "schedule_across_stages": "continue",
    }
    with pytest.raises(UserError, match=r"stages.1.optimizer differs from stages.0.optimizer"):
        load_config(config)


def _split(tiny_data) -> tuple[DataLoader, DataLoader, DataLoader]:
    train, test = tiny_data
    x, y = train.dataset.tensors
    index = torch.arange(len(y))
    return (
        DataLoader(TensorDataset(x[:96], y[:96], index[:96]), batch_size=32),
        DataLoader(TensorDataset(x[96:], y[96:]), batch_size=32),
        test,
    )


def _choices() -> dict:
    return {
        "reference": ReferenceConfig(
            tcp_temperature="tau",
            weight_scale="batch_mean",
            snapshot="best",
            anchor="logits+embedding",
        ),
        "schedule_across_stages": "continue",
    }


def _stages() -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.2}),
        Stage(methods=[{"name": "fitnets", "weight": 2.0}], epochs=2, optimizer={"lr": 0.2}),
    ]


def test_one_schedule_runs_over_every_stage(tiny_data, teacher) -> None:
    train, val, test = _split(tiny_data)
    result = run_stages(
        make_student(), teacher, _stages(), train, test, val_data=val, **_choices(), **QUIET
    )
    factors = [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert [r["lr"] for r in result.history] == pytest.approx([0.2 * f for f in factors])
    restarted = run_stages(make_student(), teacher, _stages(), train, test, **QUIET)
    assert [r["lr"] for r in restarted.history] == pytest.approx([0.2, 0.1, 0.2, 0.1])


@pytest.mark.parametrize(("crash_at", "where"), [(7, (0, 2, 0)), (9, (1, 0, 2))])
def test_every_choice_together_resumes_bit_identical(
    tiny_data, teacher, tmp_path, monkeypatch, crash_at, where
) -> None:
    """3 steps an epoch. A crash at step 7 is stage 2's first: the stage resumes at its
    start, carrying the momentum stage 1 ended with from last.pt and its best-validation
    snapshot from stage1-best.pt. At step 9 it resumes midway (a checkpoint every 2 steps)."""
    train, val, test = _split(tiny_data)
    run = {"val_data": val, "probe_data": val, **_choices(), **QUIET}
    expected = run_stages(make_student(), teacher, _stages(), train, test, **run)
    fail_on_call(monkeypatch, "step_loss", crash_at, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(
            make_student(),
            teacher,
            _stages(),
            train,
            test,
            out_dir=tmp_path,
            checkpoint_every_steps=2,
            **run,
        )
    state = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert (state["stage"], state["epoch"], state["step"]) == where
    monkeypatch.undo()
    torch.manual_seed(12345)
    resumed = run_stages(
        make_student(),
        teacher,
        _stages(),
        train,
        test,
        out_dir=tmp_path,
        resume=True,
        checkpoint_every_steps=2,
        **run,
    )
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, expected.student.state_dict()[key]), key
    assert resumed.forgetting == expected.forgetting


def test_snapshot_best_changes_the_reference(tiny_data, teacher) -> None:
    """With a best epoch before the last in stage 1, best and last anchor differently."""
    train, val, test = _split(tiny_data)
    stages = [
        Stage(methods=["kd"], epochs=4, optimizer={"lr": 0.5}, schedule="constant"),
        Stage(epochs=1, optimizer={"lr": 0.5}),
    ]
    results = {}
    for snapshot in ("last", "best"):
        results[snapshot] = run_stages(
            make_student(),
            teacher,
            stages,
            train,
            test,
            val_data=val,
            reference=ReferenceConfig(weighting="fixed", snapshot=snapshot),
            **QUIET,
        )
    first = [r["val_acc"] for r in results["last"].history[:4]]
    assert max(first) > first[-1], "the fixture no longer peaks before the last epoch"
    stage_two = [r["train_reference"] for r in (results[s].history[4] for s in ("last", "best"))]
    assert stage_two[0] != stage_two[1]


def test_a_continued_run_trains_its_stages_as_the_whole_run_would(tiny_data, teacher) -> None:
    """Stages 1–2, then stage 3 alone from their student (continues=(2, 4)): bit for
    bit the whole 3-stage run (the same seeds, data order and reference) — what lets a
    search train each stage of a plan once and share it."""
    train, test = tiny_data
    shuffled = DataLoader(train.dataset, batch_size=32, shuffle=True)
    stages = [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.2}),
        Stage(methods=[{"name": "fitnets", "weight": 2.0}], epochs=2, optimizer={"lr": 0.2}),
        Stage(methods=["rkd"], epochs=1, optimizer={"lr": 0.2}),
    ]
    whole = run_stages(make_student(), teacher, stages, shuffled, test, seed=3, **QUIET)
    prefix = run_stages(make_student(), teacher, stages[:2], shuffled, test, seed=3, **QUIET)
    torch.manual_seed(999)  # another process, another global RNG state
    rest = run_stages(
        prefix.student, teacher, stages[2:], shuffled, test, seed=3, continues=(2, 4), **QUIET
    )
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, rest.student.state_dict()[key]), key
    assert rest.history[0]["train_reference"] == whole.history[-1]["train_reference"]


def test_continuing_needs_the_earlier_student() -> None:
    config = {
        "teacher": {"model": "convnet-s"},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
        "continues": {"stages": 2, "epochs": 8},
    }
    with pytest.raises(UserError, match=r"give it as student\.checkpoint"):
        load_config(config)
    config["student"]["checkpoint"] = "student.pt"
    config["reference"] = {"snapshot": "best"}
    config["data"] = {"val_split": 0.1}
    with pytest.raises(UserError, match=r"use reference\.snapshot: last"):
        load_config(config)


def test_continuing_one_method_over_two_stages_is_one_long_stage(tiny_data, teacher) -> None:
    """With no reference and the same method, `continue` leaves no seam: one cosine
    schedule and the student's momentum carried make 2 + 2 epochs bit for bit one
    4-epoch stage. Restarting the schedule, or dropping the momentum, would not. (In a
    fixed data order: each stage reseeds the global RNG, which a shuffle would read.)"""
    train, test = tiny_data
    ordered = DataLoader(train.dataset, batch_size=32)
    sgd = {"lr": 0.2, "momentum": 0.9}
    off = ReferenceConfig(weighting="none")
    whole = run_stages(
        make_student(), teacher, [Stage(methods=["kd"], epochs=4, optimizer=sgd)],
        ordered, test, reference=off, **QUIET,
    )  # fmt: skip
    halves = [Stage(methods=["kd"], epochs=2, optimizer=sgd) for _ in range(2)]
    run = {"reference": off, **QUIET}
    split = run_stages(
        make_student(), teacher, halves, ordered, test, schedule_across_stages="continue", **run
    )
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, split.student.state_dict()[key]), key
    restarted = run_stages(make_student(), teacher, halves, ordered, test, **run)
    assert not torch.equal(restarted.student.fc.weight, whole.student.fc.weight)


def test_batch_mean_and_no_ce_reach_the_training_step(tiny_data, teacher) -> None:
    """Stage 2's logged loss terms: with `batch_mean` the reference weights average λ in
    every batch, and with ce_weight 0 the loss is the method's term plus the reference's
    alone — checked against the run's own log, not the functions the step calls."""
    train, val, test = _split(tiny_data)
    stages = [
        Stage(methods=["kd"], epochs=1),
        Stage(methods=["kd"], epochs=1, ce_weight=0),
    ]
    records = {}
    for scale in ("raw", "batch_mean"):
        cfg = ReferenceConfig(lam=0.7, weight_scale=scale)
        result = run_stages(
            make_student(), teacher, stages, train, test, val_data=val, reference=cfg, **QUIET
        )
        records[scale] = result.history[1]
    assert records["batch_mean"]["train_ref_weight_mean"] == pytest.approx(0.7)
    assert records["raw"]["train_ref_weight_mean"] < 0.7  # λ·(1 − TCP) with TCP > 0
    for record in records.values():
        assert "train_ce" not in record
        assert record["train_loss"] == pytest.approx(
            record["train_kd"] + record["train_reference"], rel=1e-5
        )
