"""DKD against values computed by hand, its warm-up, and its place in a stage run."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.dkd import DKD
from smskd.methods.kd import KD

# Teacher/student probabilities; logits are log-probabilities (softmax gives them back).
TEACHER = [[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]
STUDENT = [[0.25, 0.25, 0.5], [0.2, 0.2, 0.6]]
LABELS = [0, 2]


def outputs(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: list[int]) -> Outputs:
    return Outputs(student_logits=s_logits, teacher_logits=t_logits, labels=torch.tensor(labels))


def by_hand_outputs(scale: float = 1.0) -> Outputs:
    return outputs(scale * torch.tensor(STUDENT).log(), scale * torch.tensor(TEACHER).log(), LABELS)


# Sample 0 (label 0): target masses 0.5 vs 0.25; non-target teacher (0.3, 0.2)/0.5 = (0.6, 0.4),
# student (0.25, 0.5)/0.75 = (1/3, 2/3).
TCKD_0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
NCKD_0 = 0.6 * math.log(0.6 / (1 / 3)) + 0.4 * math.log(0.4 / (2 / 3))
# Sample 1 (label 2): both put 0.6 on the target, so TCKD = 0; non-target teacher
# (0.1, 0.3)/0.4 = (0.25, 0.75), student (0.2, 0.2)/0.4 = (0.5, 0.5).
TCKD_1 = 0.0
NCKD_1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)


def test_dkd_by_hand() -> None:
    loss = DKD(alpha=1.0, beta=8.0, temperature=1.0, warmup=0).loss(by_hand_outputs())
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(TCKD_0 + 8 * NCKD_0, rel=1e-5)
    assert loss[1].item() == pytest.approx(TCKD_1 + 8 * NCKD_1, rel=1e-5)


def test_dkd_temperature_scales_by_tau_squared() -> None:
    # Logits 2·log p at τ = 2 give back the same probabilities; the loss gains τ² = 4.
    loss = DKD(alpha=0.5, beta=2.0, temperature=2.0, warmup=0).loss(by_hand_outputs(2.0))
    assert loss[0].item() == pytest.approx(4 * (0.5 * TCKD_0 + 2 * NCKD_0), rel=1e-5)
    assert loss[1].item() == pytest.approx(4 * (0.5 * TCKD_1 + 2 * NCKD_1), rel=1e-5)


def test_dkd_decomposes_kd() -> None:
    # The paper's Eq. (5): KD = TCKD + (1 − p_t^T)·NCKD, on random logits and labels.
    torch.manual_seed(0)
    s, t = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    labels = [0, 1, 2, 3, 4, 0]
    out = outputs(s, t, labels)
    tckd = DKD(alpha=1.0, beta=0.0, warmup=0).loss(out)
    nckd = DKD(alpha=0.0, beta=1.0, warmup=0).loss(out)
    p_target = (t / 4).softmax(dim=1)[torch.arange(6), torch.tensor(labels)]
    kd = KD(temperature=4.0).loss(out)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd, rtol=1e-5, atol=1e-6)


def test_dkd_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    loss = DKD(warmup=0).loss(outputs(logits, logits, [0, 1, 5, 2]))
    assert loss.abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_finite_for_confident_teacher_and_student() -> None:
    # p_t/(1 − p_t) = e^300 for the teacher would overflow float32 if it were ever formed.
    s = torch.tensor([[0.0, -300.0, 5.0], [300.0, 0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[300.0, 0.0, 1.0], [300.0, 0.0, 2.0]])
    loss = DKD(temperature=1.0, warmup=0).loss(outputs(s, t, [0, 0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def test_dkd_teacher_with_minus_inf_logits_by_hand() -> None:
    # Row 0: teacher (0.5, 0, 0.5), label 0: same target masses as sample 0 above, so
    # TCKD_0; non-target teacher (0, 1) against student (1/3, 2/3): 1·log(1/(2/3)).
    # Row 1: teacher (1, 0, 0): NCKD has nothing to match (0), TCKD = 1·log(1/0.25).
    inf = float("inf")
    t = torch.tensor([[math.log(0.5), -inf, math.log(0.5)], [0.0, -inf, -inf]])
    s = torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]).log().requires_grad_()
    loss = DKD(temperature=1.0, warmup=0).loss(outputs(s, t, [0, 0]))
    assert loss.tolist() == pytest.approx([TCKD_0 + 8 * math.log(1.5), math.log(4)], rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_defaults() -> None:
    method = DKD()
    assert (method.alpha, method.beta, method.temperature, method.warmup) == (1.0, 8.0, 4.0, 20)
    assert DKD.default_weight == 1.0 and DKD.family == "response" and not DKD.needs_index


def test_dkd_setup_rejects_one_class_and_mismatched_logits() -> None:
    one = outputs(torch.zeros(2, 1), torch.zeros(2, 1), [0, 0])
    with pytest.raises(UserError, match=">= 2 classes, got 1"):
        DKD().setup(one, StageContext(epochs=1, num_classes=1))
    with pytest.raises(UserError, match=r"\(2, 3\).*\(2, 4\)"):
        DKD().setup(outputs(torch.zeros(2, 3), torch.zeros(2, 4), [0, 0]), StageContext(1))
    DKD().setup(outputs(torch.zeros(2, 2), torch.zeros(2, 2), [0, 1]), StageContext(1, None, 2))


def test_dkd_warmup_through_start_epoch() -> None:
    out = by_hand_outputs()
    full = DKD(temperature=1.0, warmup=0).loss(out)
    method = DKD(temperature=1.0, warmup=20)
    # Before any start_epoch call: the first epoch's factor, 1/20.
    torch.testing.assert_close(method.loss(out), full / 20)
    for epoch, factor in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)]:
        method.start_epoch(epoch, 240)
        torch.testing.assert_close(method.loss(out), full * factor)
    # A 5-epoch stage with a 20-epoch warm-up ends at 5/20 and never reaches full weight.
    method.start_epoch(4, 5)
    torch.testing.assert_close(method.loss(out), full * 0.25)
    off = DKD(temperature=1.0, warmup=0)
    off.start_epoch(0, 5)
    torch.testing.assert_close(off.loss(out), full)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"alpha": -1.0}, {"beta": -0.5}, {"warmup": -1}]
)
def test_dkd_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DKD(**kwargs)
