"""Attention transfer against values computed by hand on tiny feature maps."""

from __future__ import annotations

import math

import pytest
import torch

import smskd.methods.registry
from smskd.errors import UserError
from smskd.methods.at import AT
from smskd.methods.base import Outputs, StageContext
from smskd.methods.registry import build_method
from smskd.models.taps import ModelLayout

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)


def outputs(student_feats: dict, teacher_feats: dict) -> Outputs:
    batch = len(next(iter(student_feats.values())))
    return Outputs(
        student_logits=torch.zeros(batch, 2),
        teacher_logits=torch.zeros(batch, 2),
        labels=torch.zeros(batch, dtype=torch.long),
        student_features=student_feats,
        teacher_features=teacher_feats,
    )


def test_at_by_hand_with_unequal_channels_and_sizes() -> None:
    # Pair 1, student: channels [1, 0] and [1, 2] → mean of squares Q = (1, 2) → (1, 2)/√5.
    # Teacher: one channel [3, 3] → Q = (9, 9) → (1, 1)/√2.
    # Mean of squared differences = (1 + 1 − 2·3/√10)/2 = 1 − 3/√10.
    s1 = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])
    t1 = torch.tensor([[[[3.0, 3.0]]]])
    # Pair 2: the student's 2×4 map is average-pooled to the teacher's 1×2 *before* squaring:
    # left 2×2 block (1, 3, 1, 3) → 2, right (0, 0, 2, 2) → 1; Q = (4, 1) → (4, 1)/√17.
    # Teacher (1, 1) → (1, 1)/√2. Mean of squared differences = 1 − 5/√34.
    s2 = torch.tensor([[[[1.0, 3.0, 0.0, 0.0], [1.0, 3.0, 2.0, 2.0]]]])
    t2 = torch.tensor([[[[1.0, 1.0]]]])
    # A second sample whose maps equal the teacher's attention pattern contributes 0.
    out = outputs(
        {"s1": torch.cat([s1, torch.ones_like(s1)]), "s2": torch.cat([s2, torch.ones_like(s2)])},
        {"t1": torch.cat([t1, t1]), "t2": torch.cat([t2, t2])},
    )
    method = AT(["s1", "s2"], ["t1", "t2"])
    method.setup(out, CONTEXT)
    loss = method.loss(out)
    assert loss.shape == (2,)
    expected = (1 - 3 / math.sqrt(10)) + (1 - 5 / math.sqrt(34))
    assert loss[0].item() == pytest.approx(expected, rel=1e-5)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-7)


def test_at_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    f = torch.randn(3, 4, 5, 5)
    method = AT(["f"], ["f"])
    assert method.loss(outputs({"f": f}, {"f": f})).abs().max().item() < 1e-7


def test_at_unequal_lists_is_a_user_error_naming_both(monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "at", AT)
    layout_s = ModelLayout(features=("a", "b"))
    layout_t = ModelLayout(features=("x", "y", "z"))
    with pytest.raises(UserError, match=r"\['a', 'b'\].*\['x', 'y', 'z'\]"):
        build_method("at", {}, layout_s, layout_t)
    with pytest.raises(ValueError, match="empty"):
        AT([], [])


def test_at_rejects_vectors_naming_both_modules() -> None:
    method = AT(["fc"], ["block3"])
    out = outputs({"fc": torch.ones(2, 4)}, {"block3": torch.ones(2, 8, 2, 2)})
    with pytest.raises(UserError, match=r"'fc'.*\(4,\).*'block3'.*\(8, 2, 2\)"):
        method.setup(out, CONTEXT)


def test_at_gradient_reaches_student_tensor_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 2, 2)
    AT(["s"], ["t"]).loss(outputs({"s": s}, {"t": t})).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_at_takes_absolute_values_before_the_power() -> None:
    # p = 1. Student channels (−1, 2) and (3, −2) → |f| = (1, 2), (3, 2) → Q = (2, 2) → (1, 1)/√2.
    # Teacher (0, −4) → Q = (0, 4) → (0, 1). Mean of squares: (½ + (1 − 1/√2)²)/2 = 1 − 1/√2.
    # (Without abs: Q_s = (1, 0), Q_t = (0, −1) → 1.)
    s = torch.tensor([[[[-1.0, 2.0]], [[3.0, -2.0]]]])
    t = torch.tensor([[[[0.0, -4.0]]]])
    loss = AT(["s"], ["t"], p=1.0).loss(outputs({"s": s}, {"t": t}))
    assert loss.item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    # p = 3. Student (−1, 2) → (1, 8)/√65; teacher (2, −1) → (8, 1)/√65; diffs ±7/√65 → 49/65.
    # (Without abs: (−1, 8) against (8, −1) → 81/65.)
    s3 = torch.tensor([[[[-1.0, 2.0]]]])
    t3 = torch.tensor([[[[2.0, -1.0]]]])
    loss3 = AT(["s"], ["t"], p=3.0).loss(outputs({"s": s3}, {"t": t3}))
    assert loss3.item() == pytest.approx(49 / 65, rel=1e-6)


def test_at_pools_the_teachers_map_when_it_is_the_larger() -> None:
    # Teacher 2×4 map pooled to the student's 1×2 before squaring: left block (−1, 3, −1, 3)
    # → 1, right block (2, 2, 2, 2) → 2; Q_t = (1, 4)/√17. (Squaring first would give 5, 4.)
    # Student (2, 1) → Q_s = (4, 1)/√17. Q_s·Q_t = 8/17 → mean of squares (2 − 16/17)/2 = 9/17.
    s = torch.tensor([[[[2.0, 1.0]]]])
    t = torch.tensor([[[[-1.0, 3.0, 2.0, 2.0], [-1.0, 3.0, 2.0, 2.0]]]])
    out = outputs({"s": s}, {"t": t})
    method = AT(["s"], ["t"])
    method.setup(out, CONTEXT)
    assert method.loss(out).item() == pytest.approx(9 / 17, rel=1e-6)


def test_at_requires_p_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="p must be >= 1"):
        AT(["s"], ["t"], p=0.5)
    s = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]]], requires_grad=True)  # exact zeros, as ReLU
    t = torch.tensor([[[[1.0, 1.0], [0.0, 3.0]]]])
    AT(["s"], ["t"], p=1.0).loss(outputs({"s": s}, {"t": t})).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_at_refuses_a_pair_that_pools_to_one_position() -> None:
    out = outputs(
        {"a": torch.ones(2, 4, 4, 4), "b": torch.ones(2, 4, 1, 4)},
        {"x": torch.ones(2, 8, 1, 1), "y": torch.ones(2, 8, 4, 1)},
    )
    with pytest.raises(UserError, match=r"'a'.*\(4, 4, 4\).*'x'.*\(8, 1, 1\).*single position"):
        AT(["a"], ["x"]).setup(out, CONTEXT)
    with pytest.raises(UserError, match="single position"):  # 1×4 against 4×1 → 1×1
        AT(["b"], ["y"]).setup(out, CONTEXT)
    AT(["a"], ["y"]).setup(out, CONTEXT)  # 4×1 positions: accepted
