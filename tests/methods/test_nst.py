"""Neuron selectivity transfer against values computed by hand on tiny feature maps."""

from __future__ import annotations

import math

import pytest
import torch

import smskd.methods.registry
from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.nst import NST
from smskd.methods.registry import build_method
from smskd.models.taps import ModelLayout

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)
R = 1 / math.sqrt(2)

# Student: 2 channels on a 1×2 map, (1, 0) and (1, 1) → unit rows a = (1, 0), b = (R, R).
# Teacher: 1 channel (0, 3) → unit row u = (0, 1). Channel counts differ on purpose.
STUDENT = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
TEACHER = torch.tensor([[[[0.0, 3.0]]]])


def outputs(student_feats: dict, teacher_feats: dict) -> Outputs:
    batch = len(next(iter(student_feats.values())))
    return Outputs(
        student_logits=torch.zeros(batch, 2),
        teacher_logits=torch.zeros(batch, 2),
        labels=torch.zeros(batch, dtype=torch.long),
        student_features=student_feats,
        teacher_features=teacher_feats,
    )


def test_nst_polynomial_kernel_by_hand() -> None:
    # k(x, y) = (x·y)²: a·a = b·b = 1, a·b = R → ½; u·u = 1; a·u = 0, b·u = R → ½.
    # Student-student mean (1 + ½ + ½ + 1)/4 = ¾, teacher-teacher 1, cross (0 + ½)/2 = ¼.
    loss = NST(["s"], ["t"]).loss(outputs({"s": STUDENT}, {"t": TEACHER}))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(3 / 4 + 1 - 2 * (1 / 4), rel=1e-6)


def test_nst_linear_kernel_is_distance_of_mean_rows() -> None:
    # d = 1, c = 1: the offset cancels and MMD² = ‖mean(a, b) − u‖².
    mean_student = ((1 + R) / 2, R / 2)
    expected = (mean_student[0] - 0) ** 2 + (mean_student[1] - 1) ** 2
    loss = NST(["s"], ["t"], degree=1, c=1.0).loss(outputs({"s": STUDENT}, {"t": TEACHER}))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nst_pools_larger_map_and_sums_pairs() -> None:
    # Student 1×4 map (1, 1, 0, 0) pools to the teacher's 1×2 → (1, 0) → unit row a.
    # Against teacher u: ss = 1, tt = 1, cross (a·u)² = 0 → MMD² = 2. Plus the pair above.
    big = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    method = NST(["s", "big"], ["t", "t"])
    out = outputs({"s": STUDENT, "big": big}, {"t": TEACHER})
    method.setup(out, CONTEXT)
    assert method.loss(out).item() == pytest.approx(5 / 4 + 2, rel=1e-6)


def test_nst_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    f = torch.randn(3, 4, 5, 5)
    loss = NST(["f"], ["f"]).loss(outputs({"f": f}, {"f": f}))
    assert loss.shape == (3,)
    assert loss.abs().max().item() < 1e-5


def test_nst_unequal_lists_and_bad_options(monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "nst", NST)
    layout_s = ModelLayout(features=("a",))
    layout_t = ModelLayout(features=("x", "y"))
    with pytest.raises(UserError, match=r"\['a'\].*\['x', 'y'\]"):
        build_method("nst", {}, layout_s, layout_t)
    for degree in (0, 2.5, True):  # a fractional power of a negative cosine is NaN
        with pytest.raises(ValueError, match="positive integer"):
            NST(["a"], ["x"], degree=degree)
    with pytest.raises(ValueError):
        NST(["a"], ["x"], c=-1.0)


def test_nst_rejects_vectors_naming_both_modules() -> None:
    out = outputs({"fc": torch.ones(2, 4)}, {"block3": torch.ones(2, 8, 2, 2)})
    with pytest.raises(UserError, match=r"'fc'.*\(4,\).*'block3'.*\(8, 2, 2\)"):
        NST(["fc"], ["block3"]).setup(out, CONTEXT)


def test_nst_gradient_reaches_student_tensor_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4)
    NST(["s"], ["t"]).loss(outputs({"s": s}, {"t": t})).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_nst_two_samples_by_hand_keep_their_channels_apart() -> None:
    # Sample 0 is the pair above: 5/4. Sample 1: student channels (0, 2) and (0, 5) → both
    # e = (0, 1); teacher (4, 0) → v = (1, 0). ss = 1, tt = 1, cross (e·v)² = 0 → MMD² = 2.
    # A kernel over all B·C channels at once would give one shared value instead.
    s = torch.cat([STUDENT, torch.tensor([[[[0.0, 2.0]], [[0.0, 5.0]]]])])
    t = torch.cat([TEACHER, torch.tensor([[[[4.0, 0.0]]]])])
    loss = NST(["s"], ["t"]).loss(outputs({"s": s}, {"t": t}))
    assert loss.tolist() == pytest.approx([5 / 4, 2.0], rel=1e-6)


def test_nst_pools_the_teachers_map_before_normalizing() -> None:
    # Teacher 1×4 (0, 0, 3, 3) pools to the student's 1×2 → (0, 3) → u, so the loss is the
    # first case's 5/4. (Normalizing first would give the row (0, 1/√2), not a unit row.)
    big_teacher = torch.tensor([[[[0.0, 0.0, 3.0, 3.0]]]])
    out = outputs({"s": STUDENT}, {"t": big_teacher})
    method = NST(["s"], ["t"])
    method.setup(out, CONTEXT)
    assert method.loss(out).item() == pytest.approx(5 / 4, rel=1e-6)


def test_nst_refuses_a_pair_that_pools_to_one_position() -> None:
    out = outputs({"s": torch.ones(2, 4, 2, 2)}, {"t": torch.ones(2, 8, 1, 1)})
    with pytest.raises(UserError, match=r"'s'.*\(4, 2, 2\).*'t'.*\(8, 1, 1\).*single position"):
        NST(["s"], ["t"]).setup(out, CONTEXT)
