"""Reference model, TCP weights and the reference loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from smskd.config import ReferenceConfig
from smskd.train.epoch import StageModels, StageObjective, train_epoch
from smskd.train.reference import (
    make_reference,
    per_sample_reference_loss,
    reference_term,
    reference_weights,
    true_class_probability,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_tcp_is_true_class_probability_not_max_probability() -> None:
    teacher_logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])  # the second sample: the teacher is wrong
    tcp = true_class_probability(teacher_logits, labels)
    e = math.e
    assert tcp[0].item() == pytest.approx(e**2 / (e**2 + e + 1), rel=1e-6)
    assert tcp[1].item() == pytest.approx(1 / (e**2 + e + 1), rel=1e-6)


def test_tcp_temperature_softens() -> None:
    tcp = true_class_probability(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), temperature=2.0)
    assert tcp.item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("inverse_tcp", [1.5, 0.3]), ("tcp", [0.0, 1.2]), ("fixed", [1.5, 1.5]), ("none", [0, 0])],
)
def test_weight_modes(mode: str, expected: list[float]) -> None:
    weights = reference_weights(mode, 1.5, torch.tensor([0.0, 0.8]))
    assert weights.tolist() == pytest.approx(expected)


def test_per_sample_kl_reference_loss_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    reference = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    loss = per_sample_reference_loss(student, reference, "kl", temperature=2.0)
    # Sample 0: p = softmax([0, .5]) = (a, b), q = softmax([.5, 0]) = (b, a);
    # KL = (b − a)·ln(b/a) = (b − a)·0.5, times τ² = 4 → 2(b − a) = 2·tanh(0.25).
    assert loss[0].item() == pytest.approx(2 * math.tanh(0.25), rel=1e-5)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-7)


def test_mse_logits_reference_loss_by_hand() -> None:
    loss = per_sample_reference_loss(
        torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]]), "mse_logits", temperature=4.0
    )
    assert loss.tolist() == pytest.approx([(1 + 4) / 2])


def test_reference_term_weights_each_sample_by_teacher_tcp() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reference = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    teacher = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1])
    cfg = ReferenceConfig(weighting="inverse_tcp", lam=2.0, temperature=1.0)
    total, weights = reference_term(cfg, student, reference, teacher, labels)
    tcp = [softmax([3.0, 0.0])[0], softmax([3.0, 0.0])[1]]
    w = [2.0 * (1 - tcp[0]), 2.0 * (1 - tcp[1])]
    p, q = softmax([0.0, 1.0]), softmax([1.0, 0.0])
    kl0 = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert weights.tolist() == pytest.approx(w, rel=1e-6)
    assert total.item() == pytest.approx((w[0] * kl0 + w[1] * 0.0) / 2, rel=1e-5)


def test_reference_is_a_frozen_copy_in_inference_form(student: torch.nn.Module) -> None:
    """Same outputs as the student in eval mode, BatchNorm folded away, nothing shared."""
    x = torch.randn(16, 1, 8, 8)
    student.train()
    student(x)  # move the BN statistics off their initial values
    before = {k: v.clone() for k, v in student.state_dict().items()}
    reference = make_reference(student)
    assert reference is not student and student.training  # the student is left as it was
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    student_storage = {p.data_ptr() for p in student.parameters()}
    assert all(p.data_ptr() not in student_storage for p in reference.parameters())
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), student(x), rtol=1e-5, atol=1e-6)
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key


class Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.flatten(1) if y.sum() > 0 else -y.flatten(1)


def test_an_untraceable_reference_keeps_its_layers_and_outputs() -> None:
    model = Untraceable().eval()
    reference = make_reference(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x))


def test_a_resumed_reference_loads_the_stage_end_weights(student: torch.nn.Module) -> None:
    stage_end = {
        k: v + 0.1 if v.is_floating_point() else v for k, v in student.state_dict().items()
    }
    reference = make_reference(student, stage_end)
    expected = make_reference(student)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(reference(x), expected(x))
        student.load_state_dict(stage_end)
        torch.testing.assert_close(reference(x), student.eval()(x), rtol=1e-5, atol=1e-6)


def test_reference_never_changes_and_gets_no_gradient(student, teacher, tiny_data) -> None:
    train, _ = tiny_data
    reference = make_reference(student)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    models = StageModels(student, teacher, reference)
    objective = StageObjective(1.0, [], ReferenceConfig())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    metrics = train_epoch(models, objective, train, optimizer, torch.device("cpu"))
    assert metrics["reference"] > 0  # the student moved away from the reference
    assert not reference.training
    assert all(p.grad is None for p in reference.parameters())
    for key, value in reference.state_dict().items():  # BN running stats included
        assert torch.equal(value, before[key]), key
    moved = any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert moved
