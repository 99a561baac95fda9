"""Variational information distillation against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import smskd.methods.registry
from smskd.config import Stage
from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.registry import build_method
from smskd.methods.vid import VID
from smskd.models.taps import ModelLayout
from smskd.train.stage import build_stage

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)
EPS = 1e-5


def outputs(student_feats: dict, teacher_feats: dict) -> Outputs:
    batch = len(next(iter(student_feats.values())))
    return Outputs(
        student_logits=torch.zeros(batch, 2),
        teacher_logits=torch.zeros(batch, 2),
        labels=torch.zeros(batch, dtype=torch.long),
        student_features=student_feats,
        teacher_features=teacher_feats,
    )


def set_weights(method: VID, pair: int, *matrices: list[list[float]]) -> None:
    convs = [m for m in method.regressors[pair] if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, matrix in zip(convs, matrices, strict=True):
            conv.weight.copy_(torch.tensor(matrix)[:, :, None, None])


def set_variance(method: VID, pair: int, variances: list[float]) -> None:
    """σ² = softplus(α) + ε = v  ⇔  α = log(e^(v − ε) − 1)."""
    with torch.no_grad():
        method.alphas[pair].copy_(
            torch.tensor([math.log(math.exp(v - EPS) - 1) for v in variances])
        )


def test_vid_helpers_per_pair_and_initial_variance() -> None:
    method = VID(["s1", "s2"], ["t1", "t2"])
    out = outputs(
        {"s1": torch.ones(2, 3, 4, 4), "s2": torch.ones(2, 6, 2, 2)},
        {"t1": torch.ones(2, 5, 4, 4), "t2": torch.ones(2, 7, 2, 2)},
    )
    method.setup(out, CONTEXT)
    assert len(method.regressors) == len(method.alphas) == 2
    convs = [m for m in method.regressors[0] if isinstance(m, nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs]
    assert shapes == [(3, 5, (1, 1), None), (5, 5, (1, 1), None), (5, 5, (1, 1), None)]
    convs = [m for m in method.regressors[1] if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(6, 7), (7, 7), (7, 7)]
    assert [type(m) for m in method.regressors[0]].count(nn.ReLU) == 2
    assert [a.shape for a in method.alphas] == [(5,), (7,)]
    for var in method.variances():
        assert var.tolist() == pytest.approx([5.0] * len(var), rel=1e-6)
    assert method.loss(out).shape == (2,)


def test_vid_by_hand_sums_pairs_with_their_own_variances() -> None:
    # Pair 1, one pixel, two channels. W1 = W2 = identity, W3 = [[1, 1], [0, 2]]:
    # s = (1, 2) → ReLU → (1, 2) → (1, 2) → μ = (3, 4); t = (2, 4), errors² (1, 0); σ² = (1, 2).
    # Pair 2, one channel on 1×2: W = 1, 1, 3; s = (1, −1) → ReLU (1, 0) → μ = (3, 0);
    # t = (1, 2), errors² (4, 4); σ² = 4.
    method = VID(["s1", "s2"], ["t1", "t2"])
    out = outputs(
        {"s1": torch.tensor([[1.0, 2.0]])[:, :, None, None], "s2": torch.tensor([[[[1.0, -1.0]]]])},
        {"t1": torch.tensor([[2.0, 4.0]])[:, :, None, None], "t2": torch.tensor([[[[1.0, 2.0]]]])},
    )
    method.setup(out, CONTEXT)
    set_weights(method, 0, [[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 1], [0, 2]])
    set_weights(method, 1, [[1]], [[1]], [[3]])
    set_variance(method, 0, [1.0, 2.0])
    set_variance(method, 1, [4.0])
    pair1 = 0.5 * ((math.log(1) + 1 / 1) + (math.log(2) + 0 / 2)) / 2
    pair2 = 0.5 * ((math.log(4) + 4 / 4) + (math.log(4) + 4 / 4)) / 2
    loss = method.loss(out)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(pair1 + pair2, rel=1e-5)


def test_vid_regressor_predicting_teacher_is_the_minimum_over_mu() -> None:
    # μ = t everywhere leaves ½·log σ² = ½·log 5 per element; moving μ off t only adds to it.
    torch.manual_seed(0)
    f = torch.rand(3, 2, 2, 2)  # non-negative, so identity weights pass the ReLUs
    method = VID(["f"], ["f"])
    out = outputs({"f": f}, {"f": f})
    method.setup(out, CONTEXT)
    set_weights(method, 0, *[[[1, 0], [0, 1]]] * 3)
    assert method.loss(out).tolist() == pytest.approx([0.5 * math.log(5.0)] * 3, rel=1e-5)
    set_weights(method, 0, [[1.1, 0], [0, 0.9]], [[1, 0], [0, 1]], [[1, 0], [0, 1]])
    assert (method.loss(out) > 0.5 * math.log(5.0)).all()


def test_vid_loss_is_smallest_at_the_variance_of_the_errors() -> None:
    # Identity regressor, t = s + (1, 2) per channel: errors² (1, 4) at every element, so the
    # NLL ½(log v + e²/v) is minimal at σ² = (1, 4), where it is ½·((0 + 1) + (log 4 + 1))/2.
    s = torch.rand(2, 2, 3, 3)
    t = s + torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    method = VID(["s"], ["t"])
    out = outputs({"s": s}, {"t": t})
    method.setup(out, CONTEXT)
    set_weights(method, 0, *[[[1, 0], [0, 1]]] * 3)

    def loss_at(v1: float, v2: float) -> float:
        set_variance(method, 0, [v1, v2])
        return method.loss(out).mean().item()

    best = loss_at(1.0, 4.0)
    assert best == pytest.approx(0.5 * (1 + math.log(4) + 1) / 2, rel=1e-5)
    for v1, v2 in [(0.9, 4.0), (1.1, 4.0), (1.0, 3.6), (1.0, 4.4), (1.1, 4.4)]:
        assert loss_at(v1, v2) > best + 1e-4


def test_vid_vectors_are_one_by_one_maps() -> None:
    # hidden_channels = 1: W1 = (1, 1), W2 = 2, W3 = 1. Sample 0: s = (1, 2) → 3 → 6 → μ = 6,
    # t = 4: error² 4. Sample 1: s = (−1, −2) → −3 → ReLU 0 → μ = 0, t = 1: error² 1. σ² = 5.
    method = VID(["s"], ["t"], hidden_channels=1)
    out = outputs(
        {"s": torch.tensor([[1.0, 2.0], [-1.0, -2.0]])}, {"t": torch.tensor([[4.0], [1.0]])}
    )
    method.setup(out, CONTEXT)
    assert method.regressors[0][0].out_channels == 1
    set_weights(method, 0, [[1, 1]], [[2]], [[1]])
    expected = [0.5 * (math.log(5) + 4 / 5), 0.5 * (math.log(5) + 1 / 5)]
    assert method.loss(out).tolist() == pytest.approx(expected, rel=1e-5)


def test_vid_spatial_mismatch_names_both_modules() -> None:
    out = outputs(
        {"block1": torch.ones(2, 4, 4, 4), "block2": torch.ones(2, 4, 8, 8)},
        {"layer1": torch.ones(2, 6, 4, 4), "layer3": torch.ones(2, 6, 4, 4)},
    )
    with pytest.raises(UserError, match=r"'block2'.*\(4, 8, 8\).*'layer3'.*\(6, 4, 4\)"):
        VID(["block1", "block2"], ["layer1", "layer3"]).setup(out, CONTEXT)


def test_vid_rejects_bad_options_and_unequal_lists(monkeypatch) -> None:
    for kwargs in ({"eps": 0.0}, {"init_variance": 1e-6}, {"hidden_channels": 0}):
        with pytest.raises(ValueError):
            VID(["s"], ["t"], **kwargs)
    monkeypatch.setitem(smskd.methods.registry.METHODS, "vid", VID)
    layout_s = ModelLayout(features=("a", "b"))
    layout_t = ModelLayout(features=("x", "y", "z"))
    with pytest.raises(UserError, match=r"\['a', 'b'\].*\['x', 'y', 'z'\]"):
        build_method("vid", {}, layout_s, layout_t)


def test_vid_gradient_reaches_student_tensor_and_helpers_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4)
    s2 = torch.randn(2, 4, 2, 2, requires_grad=True)
    method = VID(["s", "s2"], ["t", "t2"])
    out = outputs({"s": s, "s2": s2}, {"t": t, "t2": torch.randn(2, 3, 2, 2)})
    method.setup(out, CONTEXT)
    method.loss(out).sum().backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_vid_builds_one_regressor_and_variance_per_stage_pair(
    student, teacher, tiny_data, monkeypatch
):
    monkeypatch.setitem(smskd.methods.registry.METHODS, "vid", VID)
    stage = Stage(methods=["vid"], epochs=1)
    built = build_stage(
        stage, student, teacher, None, next(iter(tiny_data[0])), torch.device("cpu")
    )
    models, methods = built.models, built.methods
    models.student_taps.remove()
    models.teacher_taps.remove()
    names = set(dict(methods[0].named_parameters()))
    assert {"alphas.2", "regressors.2.0.weight"} <= names and "alphas.3" not in names
