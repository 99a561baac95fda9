"""DIST against values computed by hand, and its place in a stage run."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.methods.base import Outputs
from smskd.methods.dist import DIST

# Probabilities (B = 2, C = 3); logits are their logs, so softmax at τ = 1 gives them back.
STUDENT = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
TEACHER = [[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]]

# Inter-class: every row sums to 1, so its mean is 1/3; centered rows, in units of 1/30:
# sample 0: student (5, −1, −4), teacher (8, −1, −7) → ρ = (40 + 1 + 28)/√(42·114)
# sample 1: student (−4, −4, 8), teacher (−7, 5, 2) → ρ = (28 − 20 + 16)/√(96·78)
INTER = 1 - (69 / math.sqrt(42 * 114) + 24 / math.sqrt(96 * 78)) / 2
# Intra-class: with two samples each column's correlation is the sign of the product of
# its changes: class 0 falls for both (+1), class 1 falls for the student and rises for
# the teacher (−1), class 2 rises for both (+1).
INTRA = 1 - (1 - 1 + 1) / 3


def outputs(s_logits: torch.Tensor, t_logits: torch.Tensor) -> Outputs:
    return Outputs(
        student_logits=s_logits,
        teacher_logits=t_logits,
        labels=torch.zeros(len(s_logits), dtype=torch.long),
    )


def by_hand_outputs(scale: float = 1.0) -> Outputs:
    return outputs(scale * torch.tensor(STUDENT).log(), scale * torch.tensor(TEACHER).log())


def test_dist_by_hand() -> None:
    loss = DIST(beta=1.0, gamma=1.0, temperature=1.0).loss(by_hand_outputs())
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(INTER + INTRA, rel=1e-5)


# Three samples, so the intra-class correlations are not ±1. Columns in units of 1/30
# (student rows as above plus (0.3, 0.4, 0.3); teacher rows plus (0.2, 0.2, 0.6)):
# class 0: student (15, 6, 9) − 10 = (5, −4, −1), teacher (18, 3, 6) − 9 = (9, −6, −3)
# class 1: student (9, 6, 12) − 9 = (0, −3, 3), teacher (9, 15, 6) − 10 = (−1, 5, −4)
# class 2: student (6, 18, 9) − 11 = (−5, 7, −2), teacher (3, 12, 18) − 11 = (−8, 1, 7)
STUDENT3 = [*STUDENT, [0.3, 0.4, 0.3]]
TEACHER3 = [*TEACHER, [0.2, 0.2, 0.6]]
RHO3 = [
    (45 + 24 + 3) / math.sqrt(42 * 126),
    (0 - 15 - 12) / math.sqrt(18 * 42),
    (40 + 7 - 14) / math.sqrt(78 * 114),
]
INTRA3 = 1 - sum(RHO3) / 3


def test_dist_intra_class_three_samples_by_hand() -> None:
    assert all(0.3 < abs(r) < 0.999 for r in RHO3)
    out = outputs(torch.tensor(STUDENT3).log(), torch.tensor(TEACHER3).log())
    loss = DIST(beta=0.0, gamma=1.0, temperature=1.0).loss(out)
    assert loss.item() == pytest.approx(INTRA3, rel=1e-5)


@pytest.mark.parametrize("case", ["uniform", "same_row_for_the_batch"])
def test_dist_gradient_stays_moderate_for_constant_student(case: str) -> None:
    # Exact Pearson is 0/0 here and its gradient grows like 1/spread near it; the
    # official ε-form gives ~3·10⁶ on this input, the spread floor ~3·10² (the level
    # the exact loss reaches at a spread of ~10⁻³).
    torch.manual_seed(0)
    t = torch.randn(8, 10) * 3
    s = torch.zeros(8, 10) if case == "uniform" else torch.randn(1, 10).expand(8, 10)
    s = s.clone().requires_grad_()
    loss = DIST().loss(outputs(s, t))
    loss.backward()
    assert math.isfinite(loss.item())
    assert s.grad.abs().max().item() < 1e3


def test_dist_weights_and_temperature_by_hand() -> None:
    # Logits 2·log p at τ = 2 give back the same probabilities; the loss gains τ² = 4.
    inter_only = DIST(beta=1.0, gamma=0.0, temperature=2.0).loss(by_hand_outputs(2.0))
    intra_only = DIST(beta=0.0, gamma=3.0, temperature=2.0).loss(by_hand_outputs(2.0))
    assert inter_only.item() == pytest.approx(4 * INTER, rel=1e-5)
    assert intra_only.item() == pytest.approx(4 * 3 * INTRA, rel=1e-5)


def test_dist_defaults() -> None:
    method = DIST()
    assert (method.beta, method.gamma, method.temperature) == (1.0, 1.0, 4.0)
    assert DIST.default_weight == 2.0


def test_dist_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    assert DIST().loss(outputs(logits, logits)).item() == pytest.approx(0.0, abs=1e-5)


def test_dist_single_sample_batch_has_constant_intra_term() -> None:
    s = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    loss = DIST(beta=0.0, gamma=1.0, temperature=1.0).loss(outputs(s, s.detach()))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"beta": -1.0}, {"gamma": -1.0}])
def test_dist_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DIST(**kwargs)
