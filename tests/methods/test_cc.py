"""Correlation congruence against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import smskd.methods.registry
from smskd.config import ReferenceConfig, Stage
from smskd.methods import Outputs, StageContext
from smskd.methods.cc import CC
from smskd.train.epoch import StageObjective, step_loss
from smskd.train.stage import build_stage

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)
ROOT3 = math.sqrt(3)

# Student directions: cosines c12 = 0, c13 = 1/2, c23 = √3/2 (lengths do not matter).
STUDENT = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, ROOT3]])
# Teacher directions: c12 = 1, c13 = c23 = 0.
TEACHER = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.5]])


def outputs(student: torch.Tensor, teacher: torch.Tensor) -> Outputs:
    b = len(student)
    return Outputs(
        student_logits=torch.zeros(b, 2),
        teacher_logits=torch.zeros(b, 2),
        labels=torch.zeros(b, dtype=torch.long),
        student_features={"s": student},
        teacher_features={"t": teacher},
    )


def expected_gamma_half_order_two() -> float:
    # γ = 1/2, P = 2: k(c) = e^{-1} · (1 + c + c²/2). Diagonals agree (c = 1 on both sides);
    # each off-diagonal pair appears twice in the 3×3 matrices.
    def k(c: float) -> float:
        return math.exp(-1) * (1 + c + c * c / 2)

    pairs = [(k(0.0), k(1.0)), (k(0.5), k(0.0)), (k(ROOT3 / 2), k(0.0))]
    return 2 * sum((s - t) ** 2 for s, t in pairs) / 3**2


def test_cc_by_hand() -> None:
    loss = CC("s", "t", gamma=0.5, order=2).loss(outputs(STUDENT, TEACHER))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected_gamma_half_order_two(), rel=1e-5)


def test_cc_high_order_approaches_the_gaussian_rbf_kernel() -> None:
    # With many Taylor terms ψ[i, j] → exp(−γ‖f_i − f_j‖²) on the unit vectors.
    gamma = 0.4
    unit_s = [(1.0, 0.0), (0.0, 1.0), (0.5, ROOT3 / 2)]
    unit_t = [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]

    def rbf(a: tuple[float, float], b: tuple[float, float]) -> float:
        return math.exp(-gamma * ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2))

    expected = sum(
        (rbf(unit_s[i], unit_s[j]) - rbf(unit_t[i], unit_t[j])) ** 2
        for i in range(3)
        for j in range(3)
    )
    loss = CC("s", "t", gamma=gamma, order=20).loss(outputs(STUDENT, TEACHER))
    assert loss.item() == pytest.approx(expected / 9, rel=1e-4)


def test_cc_linear_embeddings_by_hand() -> None:
    method = CC("s", "t", gamma=0.5, order=2, embed_dim=2)
    student = torch.cat([STUDENT, torch.full((3, 1), 7.0)], dim=1)  # 3-d
    teacher = torch.cat([torch.zeros(3, 2), TEACHER], dim=1)  # 4-d
    out = outputs(student, teacher)
    method.setup(out, CONTEXT)
    assert isinstance(method.embed_s, nn.Linear) and isinstance(method.embed_t, nn.Linear)
    assert (method.embed_s.in_features, method.embed_s.out_features) == (3, 2)
    assert (method.embed_t.in_features, method.embed_t.out_features) == (4, 2)
    with torch.no_grad():  # keep the first two student and the last two teacher coordinates
        method.embed_s.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        method.embed_t.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        method.embed_s.bias.zero_()
        method.embed_t.bias.zero_()
    assert method.loss(out).item() == pytest.approx(expected_gamma_half_order_two(), rel=1e-5)


def test_cc_without_embed_dim_has_no_helpers() -> None:
    method = CC("s", "t")
    method.setup(outputs(torch.ones(3, 5), torch.ones(3, 9)), CONTEXT)
    assert list(method.parameters()) == []
    assert (method.gamma, method.order, CC.default_weight) == (0.4, 2, 100.0)


@pytest.mark.parametrize(
    "kwargs", [{"gamma": 0.0}, {"order": 0}, {"embed_dim": 0}], ids=["gamma", "order", "dim"]
)
def test_cc_rejects_bad_options(kwargs) -> None:
    with pytest.raises(ValueError):
        CC("s", "t", **kwargs)


def test_cc_zero_when_student_equals_teacher_up_to_scale() -> None:
    torch.manual_seed(0)
    feats = torch.randn(6, 4)
    loss = CC("s", "t").loss(outputs(0.3 * feats, feats))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_cc_gradient_reaches_student_and_embeddings_only() -> None:
    method = CC("s", "t", embed_dim=3)
    s = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.3, -0.3]], requires_grad=True)
    # The engine hands over teacher embeddings without history; CC also detaches them
    # before embed_t, so even a teacher tensor that asks for gradients gets none while
    # embed_t still trains.
    t = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], requires_grad=True)
    out = outputs(s, t)
    method.setup(out, CONTEXT)
    method.loss(out).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    for p in method.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_cc_zero_student_row_by_hand_with_moderate_gradients() -> None:
    # γ = 1/2, P = 2: k(c) = e^{-1}(1 + c + c²/2). The zero student row has f = 0, so
    # its ψ entries, its diagonal included, are k(0) = e^{-1}; the teacher's diagonal is
    # k(1) = 2.5·e^{-1}. Student rows (1,0), (0,0) against teacher rows (1,0), (0,1):
    # only ψ[2, 2] differs, by 1.5·e^{-1}; over b² = 4.
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = CC("s", "t", gamma=0.5, order=2).loss(outputs(s, torch.eye(2)))
    assert loss.item() == pytest.approx((1.5 * math.exp(-1)) ** 2 / 4, rel=1e-5)
    s = torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.3, -0.3]], requires_grad=True)
    CC("s", "t").loss(outputs(s, TEACHER)).backward()
    # F.normalize's 1e-12 clamp sent ~1e11 back into the zero row; it now gets none.
    assert torch.isfinite(s.grad).all() and s.grad.abs().max().item() < 10
    assert s.grad[1].abs().max().item() == 0.0
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("embed_dim", [None, 4])
def test_cc_training_step_moves_student_and_helpers_not_teacher(
    embed_dim, student, teacher, tiny_data, monkeypatch
) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "cc", CC)
    train, test = tiny_data
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = Stage(methods=[{"name": "cc", "embed_dim": embed_dim}], epochs=1, ce_weight=0.0)
    built = build_stage(stage, student, teacher, None, next(iter(test)), torch.device("cpu"))
    models, methods = built.models, built.methods
    method = methods[0]
    assert method.student_layer == "fc:input" and method.teacher_layer == "fc:input"
    helpers = [p.detach().clone() for p in method.parameters()]
    assert len(helpers) == (0 if embed_dim is None else 4)
    objective = StageObjective(0.0, [(method, 1.0)], ReferenceConfig())
    params = list(student.parameters()) + list(method.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, y = next(iter(train))
    student.train()
    total, _ = step_loss(models, objective, x, y, None)
    total.backward()
    assert total.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    for before, after in zip(helpers, method.parameters(), strict=True):
        assert not torch.equal(before, after)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    models.student_taps.remove()
    models.teacher_taps.remove()
