"""Probabilistic knowledge transfer against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.methods import Outputs
from smskd.methods.pkt import PKT


def outputs(student: torch.Tensor, teacher: torch.Tensor) -> Outputs:
    b = len(student)
    return Outputs(
        student_logits=torch.zeros(b, 2),
        teacher_logits=torch.zeros(b, 2),
        labels=torch.zeros(b, dtype=torch.long),
        student_features={"s": student},
        teacher_features={"t": teacher},
    )


def test_pkt_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    # Teacher cosines: c12 = 1, c13 = c23 = 0 → K = (c + 1)/2 = 1, 1/2, 1/2.
    # p_{·|1} = (2/3 for 2, 1/3 for 3); p_{·|2} = (2/3 for 1, 1/3 for 3); p_{·|3} = (1/2, 1/2).
    # Student cosines: c12 = 0, c13 = c23 = 1/√2 → K = 1/2, a, a with a = (1 + 1/√2)/2.
    # q_{·|1} = q_{·|2} = (1/2, a)/(1/2 + a); q_{·|3} = (1/2, 1/2) equals p_{·|3}: adds 0.
    a = (1 + 1 / math.sqrt(2)) / 2
    near, far = 0.5 / (0.5 + a), a / (0.5 + a)
    row = 2 / 3 * math.log((2 / 3) / near) + 1 / 3 * math.log((1 / 3) / far)
    loss = PKT("s", "t", eps=0.0).loss(outputs(student, teacher))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(2 * row, rel=1e-5)


def test_pkt_default_eps_changes_little() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    exact = PKT("s", "t", eps=0.0).loss(outputs(student, teacher)).item()
    assert PKT("s", "t").loss(outputs(student, teacher)).item() == pytest.approx(exact, rel=1e-5)


def test_pkt_eps_keeps_opposite_student_points_finite() -> None:
    # Two samples: the teacher gives p_{2|1} = p_{1|2} = 1; the student's embeddings point
    # in opposite directions, K = 0, so q = 0 and each row costs log((1 + ε)/ε).
    student = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    loss = PKT("s", "t", eps=1e-7).loss(outputs(student, teacher))
    assert loss.item() == pytest.approx(2 * math.log((1 + 1e-7) / 1e-7), rel=1e-5)


def test_pkt_single_sample_batch_is_zero_not_nan() -> None:
    loss = PKT("s", "t").loss(outputs(torch.ones(1, 3), torch.ones(1, 5)))
    assert loss.item() == 0.0


def test_pkt_zero_when_student_equals_teacher_up_to_scale() -> None:
    torch.manual_seed(0)
    feats = torch.randn(6, 4)
    loss = PKT("s", "t").loss(outputs(2.5 * feats, feats))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_defaults() -> None:
    assert PKT.default_weight == pytest.approx(30000 / 4096)
    assert PKT("s", "t").eps == 1e-7
    with pytest.raises(ValueError):
        PKT("s", "t", eps=-1.0)


def test_pkt_gradient_reaches_student_features_only() -> None:
    s = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.3, -0.3]], requires_grad=True)
    # The engine hands over teacher embeddings without history; PKT also detaches them,
    # so even a teacher tensor that asks for gradients gets none.
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    PKT("s", "t").loss(outputs(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_pkt_zero_student_row_by_hand_with_moderate_gradients() -> None:
    # Student rows (1,0), (0,0), (0,1): the zero row has cosine 0 with everything, and
    # rows 1, 3 are orthogonal, so every K = 1/2 and q_{j|i} = 1/2. Teacher rows (1,0),
    # (1,0), (0,1): K12 = 1, K13 = K23 = 1/2 → p_{·|1} = p_{·|2} = (2/3, 1/3), p_{·|3} = q.
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    row = 2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5)
    loss = PKT("s", "t", eps=0.0).loss(outputs(s, t))
    assert loss.item() == pytest.approx(2 * row, rel=1e-5)
    loss.backward()
    # F.normalize's 1e-12 clamp sent ~1e11 back into the zero row; it now gets none.
    assert torch.isfinite(s.grad).all() and s.grad.abs().max().item() < 10
    assert s.grad[1].abs().max().item() == 0.0
    assert s.grad.abs().sum() > 0
