"""Similarity-preserving KD against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.methods import Outputs, StageContext
from smskd.methods.functional import unit_rows
from smskd.methods.sp import SP

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)


def outputs(student: dict, teacher: dict) -> Outputs:
    b = len(next(iter(student.values())))
    return Outputs(
        student_logits=torch.zeros(b, 2),
        teacher_logits=torch.zeros(b, 2),
        labels=torch.zeros(b, dtype=torch.long),
        student_features=student,
        teacher_features=teacher,
    )


# Student Q = [[1, 0], [0, 1]]: Q·Qᵀ = I, already row-normalized.
# Teacher Q = [[1, 0], [1, 1]]: Q·Qᵀ = [[1, 1], [1, 2]] → rows (1, 1)/√2 and (1, 2)/√5.
STUDENT_2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEACHER_2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
ROW_1 = (1 - 1 / math.sqrt(2)) ** 2 + (0 - 1 / math.sqrt(2)) ** 2
ROW_2 = (0 - 1 / math.sqrt(5)) ** 2 + (1 - 2 / math.sqrt(5)) ** 2
EXPECTED_2 = (ROW_1 + ROW_2) / 2**2


def test_sp_by_hand() -> None:
    loss = SP("s", "t").loss(outputs({"s": STUDENT_2}, {"t": TEACHER_2}))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(EXPECTED_2, rel=1e-5)


def test_sp_flattens_maps_of_different_sizes_by_hand() -> None:
    # The same rows as above, laid out as [B, C, H, W] maps of different sizes; the
    # teacher's extra zero channel changes no dot product.
    student = STUDENT_2.reshape(2, 2, 1, 1)
    teacher = torch.cat([TEACHER_2, torch.zeros(2, 1)], dim=1).reshape(2, 1, 3, 1)
    loss = SP("s", "t").loss(outputs({"s": student}, {"t": teacher}))
    assert loss.item() == pytest.approx(EXPECTED_2, rel=1e-5)


def test_sp_three_samples_by_hand() -> None:
    # Student rows (1,0), (1,1), (0,2): Q·Qᵀ = [[1,1,0],[1,2,2],[0,2,4]].
    # Teacher rows (1,0), (0,1), (0,1): Q·Qᵀ = [[1,0,0],[0,1,1],[0,1,1]].
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    g_s = [[1, 1, 0], [1, 2, 2], [0, 2, 4]]
    g_t = [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    expected = 0.0
    for row_s, row_t in zip(g_s, g_t, strict=True):
        n_s = math.sqrt(sum(v * v for v in row_s))
        n_t = math.sqrt(sum(v * v for v in row_t))
        expected += sum((a / n_t - b / n_s) ** 2 for a, b in zip(row_t, row_s, strict=True))
    loss = SP("s", "t").loss(outputs({"s": s}, {"t": t}))
    assert loss.item() == pytest.approx(expected / 9, rel=1e-5)


def test_sp_sums_over_layer_pairs() -> None:
    # Pair 2: student rows (1,0), (1,1) → Q·Qᵀ = [[1,1],[1,2]], rows (1,1)/√2, (1,2)/√5;
    # teacher rows (1,0), (2,0) → [[1,2],[2,4]], both rows (1,2)/√5. Only row 1 differs.
    s2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t2 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    pair_2 = (
        (1 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2
    ) / 4
    method = SP(["s1", "s2"], ["t1", "t2"])
    out = outputs({"s1": STUDENT_2, "s2": s2}, {"t1": TEACHER_2, "t2": t2})
    assert method.student_taps() == ["s1", "s2"]
    assert method.teacher_taps() == ["t1", "t2"]
    assert EXPECTED_2 > 0.1 and pair_2 > 0.01  # dropping either pair would show
    assert method.loss(out).item() == pytest.approx(EXPECTED_2 + pair_2, rel=1e-5)


def test_sp_rejects_unpaired_layers() -> None:
    with pytest.raises(ValueError, match="pair up"):
        SP(["a", "b"], ["c"])


def test_sp_zero_when_student_equals_teacher_up_to_scale() -> None:
    torch.manual_seed(0)
    feats = torch.randn(5, 3, 2, 2)
    loss = SP("s", "t").loss(outputs({"s": 3.0 * feats}, {"t": feats}))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_sp_gradient_reaches_student_features_only() -> None:
    s = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.3, 0.3]], requires_grad=True)
    # The engine hands over teacher features without history; SP also detaches them,
    # so even a teacher tensor that asks for gradients gets none.
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    SP("s", "t").loss(outputs({"s": s}, {"t": t})).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_unit_rows_by_hand_and_tiny_rows_pass_no_gradient() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-9, 0.0], [0.0, 2e-6]], requires_grad=True)
    y = unit_rows(x)
    assert y.flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    (y * torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])).sum().backward()
    # d(x1/‖x‖)/dx = (‖x‖² − x1·x)/‖x‖³: at (3, 4) that is (16, −12)/125.
    assert x.grad[0].tolist() == pytest.approx([16 / 125, -12 / 125])
    assert x.grad[1:3].abs().max().item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_sp_zero_student_row_by_hand_with_moderate_gradients() -> None:
    # Student rows (1,0), (0,0): Q·Qᵀ = [[1,0],[0,0]] → rows (1,0) and 0. Teacher I.
    # Only row 2 differs, by (0, 1): loss 1/4, as F.normalize would give.
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss = SP("s", "t").loss(outputs({"s": student}, {"t": torch.eye(2)}))
    assert loss.item() == pytest.approx(0.25)
    # With a third sample the zero row still gets a gradient through the other rows'
    # dot products; F.normalize's 1e-12 clamp made it ~1e11.
    s = torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.3, -0.3]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss = SP("s", "t").loss(outputs({"s": s}, {"t": t}))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and s.grad.abs().max().item() < 10
    assert s.grad.abs().sum() > 0
