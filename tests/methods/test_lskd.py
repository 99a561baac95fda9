"""Logit-standardized KD against values computed by hand, and its place in a stage run."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.methods.base import Outputs
from smskd.methods.lskd import LSKD, STD_FLOOR, zscore


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


def test_lskd_constant_student_logits_give_moderate_gradient() -> None:
    # A constant row maps to Z = 0 (softmax uniform, q = 1/4) and, with σ floored at
    # 0.01, dZ/ds = (I − 1/K)/0.01; so ∂[τ²·KL]/∂s = τ·(q − p)/0.01 = 200·(q − p) at
    # τ = 2 (the official +10⁻⁷ would give 2·10⁷·(q − p)).
    # Teacher (1, 0, 0, 2): mean 0.75, σ² = (0.0625 + 0.5625 + 0.5625 + 1.5625)/4 = 0.6875.
    sigma = math.sqrt(0.6875)
    e = [math.exp((v - 0.75) / sigma / 2) for v in (1.0, 0.0, 0.0, 2.0)]
    p = [x / sum(e) for x in e]
    s = torch.zeros(1, 4, requires_grad=True)
    loss = LSKD().loss(outputs(s, torch.tensor([[1.0, 0.0, 0.0, 2.0]])))
    loss.sum().backward()
    assert s.grad[0].tolist() == pytest.approx([200 * (0.25 - pi) for pi in p], rel=1e-4)
    assert s.grad.abs().max().item() < 200


def test_zscore_floor_and_exact_above_it() -> None:
    # (0, 0.01): σ = 0.005 < 0.01 → (∓0.005)/0.01; (0, 0.04): σ = 0.02 → exactly (−1, 1).
    z = zscore(torch.tensor([[0.0, 0.01], [0.0, 0.04], [3.0, 3.0]]))
    assert z.tolist() == [pytest.approx([-0.5, 0.5]), pytest.approx([-1.0, 1.0]), [0.0, 0.0]]
    assert STD_FLOOR == 0.01


def test_lskd_huge_logits_do_not_overflow() -> None:
    # σ² of logits ~10²⁰ is inf in float32; the loss is scale-free, so it must not change.
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    small = LSKD().loss(outputs(s, t))
    huge = LSKD().loss(outputs(s * 1e20, t * 3e37))
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, small, rtol=1e-5, atol=1e-6)


def test_lskd_defaults() -> None:
    assert LSKD().temperature == 2.0
    assert LSKD.default_weight == 9.0
    with pytest.raises(ValueError):
        LSKD(temperature=0.0)
