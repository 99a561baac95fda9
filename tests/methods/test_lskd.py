"""Logit-standardized KD against values computed by hand, and its place in a stage run."""

from __future__ import annotations

import math

import pytest
import torch

import smskd.methods.registry
from smskd.config import ReferenceConfig, Stage
from smskd.engine import StageObjective, step_loss
from smskd.methods.base import Outputs
from smskd.methods.lskd import LSKD
from smskd.pipeline import _build_stage, run_stages


def outputs(s_logits: torch.Tensor, t_logits: torch.Tensor) -> Outputs:
    return Outputs(
        student_logits=s_logits,
        teacher_logits=t_logits,
        labels=torch.zeros(len(s_logits), dtype=torch.long),
    )


def test_lskd_by_hand() -> None:
    # Student (1, 2, 3): mean 2, σ² = (1 + 0 + 1)/3 = 2/3 → z = (−1, 0, 1)·√(3/2).
    # Teacher (0, 0, 3): mean 1, σ² = (1 + 1 + 4)/3 = 2 → z = (−1, −1, 2)/√2.
    # Both divided by τ = 2 before the softmax; the KL is multiplied by τ² = 4.
    r = math.sqrt(1.5) / 2
    e = [math.exp(-r), 1.0, math.exp(r)]
    q = [x / sum(e) for x in e]  # student
    u = 1 / (2 * math.sqrt(2))
    f = [math.exp(-u), math.exp(-u), math.exp(2 * u)]
    p = [x / sum(f) for x in f]  # teacher
    expected = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    loss = LSKD().loss(outputs(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 3.0]])))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_lskd_temperature_by_hand() -> None:
    # Two classes: z = (−1, 1) for any increasing pair, (1, −1) for a decreasing one.
    # At τ = 1 the teacher is softmax(−1, 1) = (a, b), the student (b, a), a = 1/(1 + e²):
    # KL = (b − a)·log(b/a) = 2·tanh(1).
    loss = LSKD(temperature=1.0).loss(
        outputs(torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 0.1]]))
    )
    assert loss.item() == pytest.approx(2 * math.tanh(1.0), rel=1e-5)


def test_lskd_zero_for_affine_student() -> None:
    # Only logit relations count: s = a·t + b (a > 0) matches the teacher exactly.
    torch.manual_seed(0)
    t = torch.randn(4, 6)
    loss = LSKD().loss(outputs(3.0 * t + 5.0, t))
    assert loss.abs().max().item() == pytest.approx(0.0, abs=1e-6)
    assert LSKD().loss(outputs(-t, t)).min().item() > 0.1


def test_lskd_constant_student_logits_give_finite_gradient() -> None:
    s = torch.zeros(2, 4, requires_grad=True)
    loss = LSKD().loss(outputs(s, torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]])))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def test_lskd_defaults() -> None:
    assert LSKD().temperature == 2.0
    assert LSKD.default_weight == 9.0
    with pytest.raises(ValueError):
        LSKD(temperature=0.0)


def test_lskd_gradients_reach_student_only(student, teacher, tiny_data, monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "lskd", LSKD)
    train, test = tiny_data
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = Stage(methods=["lskd"], epochs=1, ce_weight=0.0)
    models, methods = _build_stage(
        stage, student, teacher, None, next(iter(test)), torch.device("cpu")
    )
    assert list(methods[0].parameters()) == []  # no helpers
    objective = StageObjective(0.0, [(methods[0], 1.0)], ReferenceConfig())
    x, y = next(iter(train))
    student.train()
    total, _ = step_loss(models, objective, x, y, None)
    total.backward()
    assert total.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    models.student_taps.remove()
    models.teacher_taps.remove()


def test_lskd_in_two_stage_run(student, teacher, tiny_data, monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "lskd", LSKD)
    train, test = tiny_data
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=["lskd"], epochs=1)]
    result = run_stages(student, teacher, stages, train, test, progress=False, log=lambda _: None)
    last = result.history[-1]
    assert last["stage"] == 2 and math.isfinite(last["train_lskd"]) and last["train_lskd"] > 0
