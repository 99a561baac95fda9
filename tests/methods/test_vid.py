"""Variational information distillation against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import smskd.methods.registry
from smskd.config import ReferenceConfig, Stage
from smskd.engine import StageObjective, step_loss
from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.vid import VID
from smskd.pipeline import _build_stage, run_stages

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


def set_weights(method: VID, *matrices: list[list[float]]) -> None:
    convs = [m for m in method.regressor if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, matrix in zip(convs, matrices, strict=True):
            conv.weight.copy_(torch.tensor(matrix)[:, :, None, None])


def test_vid_helpers_and_initial_variance() -> None:
    method = VID("s", "t")
    method.setup(outputs({"s": torch.ones(2, 3, 4, 4)}, {"t": torch.ones(2, 5, 4, 4)}), CONTEXT)
    convs = [m for m in method.regressor if isinstance(m, nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs]
    assert shapes == [(3, 5, (1, 1), None), (5, 5, (1, 1), None), (5, 5, (1, 1), None)]
    assert [type(m) for m in method.regressor].count(nn.ReLU) == 2
    assert method.alpha.shape == (5,)
    assert method.variance().tolist() == pytest.approx([5.0] * 5, rel=1e-6)


def test_vid_by_hand() -> None:
    # One pixel, two channels each. W1 = W2 = identity, W3 = [[1, 1], [0, 2]]:
    # s = (1, 2) → ReLU → (1, 2) → (1, 2) → μ = (3, 4); t = (2, 4), errors² (1, 0).
    method = VID("s", "t")
    s = torch.tensor([[1.0, 2.0]])[:, :, None, None]
    t = torch.tensor([[2.0, 4.0]])[:, :, None, None]
    out = outputs({"s": s}, {"t": t})
    method.setup(out, CONTEXT)
    set_weights(method, [[1, 0], [0, 1]], [[1, 0], [0, 1]], [[1, 1], [0, 2]])
    with torch.no_grad():  # softplus(α) = 1 and 2: α = log(e − 1), log(e² − 1)
        method.alpha.copy_(torch.tensor([math.log(math.e - 1), math.log(math.e**2 - 1)]))
    v1, v2 = 1 + EPS, 2 + EPS
    expected = 0.5 * ((math.log(v1) + 1 / v1) + (math.log(v2) + 0 / v2)) / 2
    loss = method.loss(out)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_vid_minimum_when_regressor_predicts_teacher() -> None:
    # μ = t everywhere leaves ½·log σ² = ½·log 5 per element: the NLL's floor at this σ².
    torch.manual_seed(0)
    f = torch.rand(3, 2, 2, 2)  # non-negative, so identity weights pass the ReLUs
    method = VID("f", "f")
    out = outputs({"f": f}, {"f": f})
    method.setup(out, CONTEXT)
    set_weights(method, *[[[1, 0], [0, 1]]] * 3)
    assert method.loss(out).tolist() == pytest.approx([0.5 * math.log(5.0)] * 3, rel=1e-5)


def test_vid_vectors_are_one_by_one_maps() -> None:
    method = VID("s", "t", hidden_channels=7)
    out = outputs({"s": torch.ones(2, 3)}, {"t": torch.ones(2, 4)})
    method.setup(out, CONTEXT)
    assert method.regressor[0].out_channels == 7
    assert method.loss(out).shape == (2,)


def test_vid_spatial_mismatch_names_both_modules() -> None:
    out = outputs({"block2": torch.ones(2, 4, 8, 8)}, {"layer3": torch.ones(2, 6, 4, 4)})
    with pytest.raises(UserError, match=r"'block2'.*\(4, 8, 8\).*'layer3'.*\(6, 4, 4\)"):
        VID("block2", "layer3").setup(out, CONTEXT)


def test_vid_rejects_bad_options() -> None:
    for kwargs in ({"eps": 0.0}, {"init_variance": 1e-6}, {"hidden_channels": 0}):
        with pytest.raises(ValueError):
            VID("s", "t", **kwargs)


def test_vid_gradient_reaches_student_tensor_and_helpers_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4)
    method = VID("s", "t")
    out = outputs({"s": s}, {"t": t})
    method.setup(out, CONTEXT)
    method.loss(out).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_vid_training_step_leaves_teacher_unchanged(student, teacher, tiny_data, monkeypatch):
    monkeypatch.setitem(smskd.methods.registry.METHODS, "vid", VID)
    train, test = tiny_data
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = Stage(methods=["vid"], epochs=1, ce_weight=0.0)
    probe = next(iter(test))
    models, methods = _build_stage(stage, student, teacher, None, probe, torch.device("cpu"))
    assert (methods[0].student_layer, methods[0].teacher_layer) == ("block2", "block2")
    objective = StageObjective(0.0, [(methods[0], 1.0)], ReferenceConfig())
    x, y = next(iter(train))
    student.train()
    total, _ = step_loss(models, objective, x, y, None)
    total.backward()
    assert math.isfinite(total.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert {"alpha", "regressor.0.weight"} <= set(dict(methods[0].named_parameters()))
    for p in methods[0].parameters():
        assert p.grad is not None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    models.student_taps.remove()
    models.teacher_taps.remove()


def test_vid_in_two_stage_run(student, teacher, tiny_data, monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "vid", VID)
    train, test = (next(iter(loader)) for loader in tiny_data)  # one batch each keeps it fast
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=["vid"], epochs=1)]
    result = run_stages(
        student, teacher, stages, [train], [test], progress=False, log=lambda _: None
    )
    values = [r["train_vid"] for r in result.history if "train_vid" in r]
    assert values and all(math.isfinite(v) for v in values)
