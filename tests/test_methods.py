"""KD, FitNets and RKD against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smskd.config import ReferenceConfig, Stage
from smskd.errors import UserError
from smskd.methods import KD, RKD, FitNets, Outputs, StageContext
from smskd.methods.registry import METHODS
from smskd.train.epoch import StageObjective, step_loss
from smskd.train.stage import build_stage

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)


def outputs(student_feats=None, teacher_feats=None, s_logits=None, t_logits=None) -> Outputs:
    s_logits = torch.zeros(2, 2) if s_logits is None else s_logits
    return Outputs(
        student_logits=s_logits,
        teacher_logits=torch.zeros_like(s_logits) if t_logits is None else t_logits,
        labels=torch.zeros(len(s_logits), dtype=torch.long),
        student_features=student_feats or {},
        teacher_features=teacher_feats or {},
    )


# ------------------------------------------------------------------------------ KD


def test_kd_by_hand() -> None:
    out = outputs(
        s_logits=torch.tensor([[1.0, 0.0], [2.0, 0.0]]),
        t_logits=torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
    )
    loss = KD(temperature=2.0).loss(out)
    assert loss.shape == (2,)
    # softmax([0, .5]) = (a, b) against softmax([.5, 0]) = (b, a): KL = (b − a)/2; × τ² = 4.
    assert loss[0].item() == pytest.approx(2 * math.tanh(0.25), rel=1e-5)
    assert loss[1].item() == pytest.approx(0.0, abs=1e-7)


def test_kd_three_classes_by_hand() -> None:
    s, t, tau = [0.3, -1.2, 2.0], [1.0, 0.5, -0.5], 4.0

    def soft(v: list[float]) -> list[float]:
        e = [math.exp(x / tau) for x in v]
        return [x / sum(e) for x in e]

    p, q = soft(t), soft(s)
    expected = tau**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    loss = KD().loss(outputs(s_logits=torch.tensor([s]), t_logits=torch.tensor([t])))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError):
        KD(temperature=0.0)


# ------------------------------------------------------------------------- FitNets


def test_fitnets_identity_regressor_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    method = FitNets("s", "t")
    out = outputs({"s": s}, {"t": t})
    method.setup(out, CONTEXT)
    assert isinstance(method.regressor, nn.Identity)
    assert method.loss(out).tolist() == pytest.approx([(0 + 4) / 2, (9 + 16) / 2])


def test_fitnets_linear_regressor_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[1.0, 1.0, 1.0]])
    method = FitNets("s", "t")
    out = outputs({"s": s}, {"t": t}, s_logits=torch.zeros(1, 2))
    method.setup(out, CONTEXT)
    assert isinstance(method.regressor, nn.Linear)
    with torch.no_grad():
        method.regressor.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        method.regressor.bias.zero_()
    # r(s) = (1, 2, 3); squared errors (0, 1, 4), mean 5/3.
    assert method.loss(out).item() == pytest.approx(5 / 3)


def test_fitnets_conv_regressor_for_feature_maps() -> None:
    method = FitNets("s", "t")
    method.setup(outputs({"s": torch.ones(2, 4, 3, 3)}, {"t": torch.ones(2, 6, 3, 3)}), CONTEXT)
    conv = method.regressor
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 6, (1, 1))


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "kind", "kernel"),
    [
        ((4, 8, 8), (6, 4, 4), nn.Conv2d, (3, 3)),  # student twice as large: stride-2 conv
        ((4, 4, 4), (6, 8, 8), nn.ConvTranspose2d, (4, 4)),  # half as large: transposed
        ((4, 7, 6), (6, 4, 4), nn.Conv2d, (4, 3)),  # larger by (3, 2): a (4, 3) kernel
    ],
)
def test_fitnets_bridges_resolutions_like_convreg(student_shape, teacher_shape, kind, kernel):
    method = FitNets("s", "t")
    out = outputs({"s": torch.ones(2, *student_shape)}, {"t": torch.zeros(2, *teacher_shape)})
    method.setup(out, CONTEXT)
    assert type(method.regressor) is kind and method.regressor.kernel_size == kernel
    assert method.regressor(out.student_features["s"]).shape == (2, *teacher_shape)
    assert method.loss(out).shape == (2,)


def test_fitnets_unbridgeable_shapes_name_both_modules() -> None:
    method = FitNets("block2", "layer3")
    with pytest.raises(UserError, match=r"block2.*\(4, 2, 2\).*layer3.*\(6, 8, 8\)"):
        method.setup(
            outputs({"block2": torch.ones(2, 4, 2, 2)}, {"layer3": torch.ones(2, 6, 8, 8)}), CONTEXT
        )


# ----------------------------------------------------------------------------- RKD

STUDENT_POINTS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # a 3-4-5 triangle
TEACHER_POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right isosceles


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_by_hand() -> None:
    method = RKD("s", "t", distance_weight=1.0, angle_weight=0.0)
    loss = method.loss(outputs({"s": STUDENT_POINTS}, {"t": TEACHER_POINTS}, torch.zeros(3, 2)))
    student = [3 / 4, 4 / 4, 5 / 4]  # pair distances over their mean (3 + 4 + 5)/3
    mean_t = (1 + 1 + math.sqrt(2)) / 3
    teacher = [1 / mean_t, 1 / mean_t, math.sqrt(2) / mean_t]
    # Each pair appears twice in the 3×3 matrix; the diagonal is 0 in both.
    expected = 2 * sum(huber(s - t) for s, t in zip(student, teacher, strict=True)) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_by_hand() -> None:
    method = RKD("s", "t", distance_weight=0.0, angle_weight=1.0)
    loss = method.loss(outputs({"s": STUDENT_POINTS}, {"t": TEACHER_POINTS}, torch.zeros(3, 2)))
    # Cosines of the angle at each vertex: student 0, 3/5, 4/5; teacher 0, 1/√2, 1/√2.
    # Each appears twice among the 27 triplets; the rest (zeros, ones) agree.
    r = 1 / math.sqrt(2)
    expected = 2 * (huber(0.0) + huber(0.6 - r) + huber(0.8 - r)) / 27
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rkd_default_weights_and_scalar_loss() -> None:
    method = RKD("s", "t")
    assert (method.distance_weight, method.angle_weight) == (25.0, 50.0)
    loss = method.loss(outputs({"s": STUDENT_POINTS}, {"t": TEACHER_POINTS}, torch.zeros(3, 2)))
    assert loss.dim() == 0


@pytest.mark.parametrize("name", ["kd", "fitnets", "rkd"])  # the others: tests/methods/
def test_zero_loss_when_student_equals_teacher(name: str) -> None:
    torch.manual_seed(0)
    feats = torch.randn(4, 5)
    logits = torch.randn(4, 3)
    method = {
        "kd": lambda: KD(),
        "fitnets": lambda: FitNets("f", "f"),
        "rkd": lambda: RKD("f", "f"),
    }[name]()
    out = outputs({"f": feats}, {"f": feats}, logits, logits)
    method.setup(out, CONTEXT)
    assert method.loss(out).abs().max().item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------- gradients, frozen teacher, stage run


# What `smskd methods` lists, by family; each registers itself as smskd.methods is imported.
BUILT_IN = {
    "kd", "dkd", "dist", "lskd",
    "fitnets", "at", "nst", "vid", "ft", "reviewkd",
    "rkd", "sp", "pkt", "cc", "crd",
}  # fmt: skip
# Default taps on the zoo's ConvNet, per layout role a method's tap_roles name.
TAPS_BY_ROLE = {
    "features": ["block1", "block2", "block3"],
    "hint": ["block2"],
    "last_feature": ["block3"],
    "embedding": ["fc:input"],
}
CAN_BE_NEGATIVE = {"vid"}  # a Gaussian negative log-likelihood: ½·log σ² may be < 0


def test_the_15_built_in_methods_are_registered() -> None:
    assert len(BUILT_IN) == 15 and set(METHODS) >= BUILT_IN


def default_taps(name: str, side: str) -> list[str]:
    roles = [role for who, role in METHODS[name].tap_roles.values() if who == side]
    return [tap for role in roles for tap in TAPS_BY_ROLE[role]]


# The zoo CNNs have no per-token features: the language-model feature methods are
# tested on transformers (tests/test_lm_methods.py, tests/test_language_models.py).
IMAGE_METHODS = sorted(name for name, cls in METHODS.items() if not cls.needs_sequences)


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_training_steps_move_student_and_helpers_never_the_teacher(
    name, student, live_teacher, indexed_data
) -> None:
    """Two real steps with a teacher handed over unfrozen (train mode, requires_grad):
    gradients reach the student and the method's helpers, and the teacher — its
    BatchNorm statistics included — stays exactly as it was."""
    train, _ = indexed_data
    stage = Stage(methods=[name], epochs=1, ce_weight=0.0)
    built = build_stage(
        stage,
        student,
        live_teacher,
        None,
        next(iter(train)),
        torch.device("cpu"),
        len(train.dataset),
    )
    models, methods = built.models, built.methods
    method = methods[0]
    try:
        assert method.student_taps() == default_taps(name, "student")
        assert method.teacher_taps() == default_taps(name, "teacher")
        if not method.helpers:
            assert list(method.parameters()) == []
        # After the build: its probe runs the teacher in the mode it is handed in
        # (run_stages freezes it first); from here on the stage itself must keep it.
        teacher_before = {k: v.clone() for k, v in live_teacher.state_dict().items()}
        student_before = [p.detach().clone() for p in student.parameters()]
        helpers_before = [p.detach().clone() for p in method.parameters()]
        objective = StageObjective(0.0, [(method, 1.0)], ReferenceConfig())
        params = [*student.parameters(), *method.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        models.train()
        for step, (x, y, index) in enumerate(list(train)[:2]):
            optimizer.zero_grad()
            total, _ = step_loss(models, objective, x, y, index)
            total.backward()
            if step == 0:
                assert any(
                    p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()
                )
                assert all(p.grad is not None for p in method.parameters())
            optimizer.step()
        assert math.isfinite(total.item())
        assert name in CAN_BE_NEGATIVE or total.item() > 0
        pairs = zip(student.parameters(), student_before, strict=True)
        assert any(not torch.equal(p, q) for p, q in pairs)
        moved = [
            not torch.equal(p, q) for p, q in zip(method.parameters(), helpers_before, strict=True)
        ]
        # Every helper learns; FT's conv biases right before BatchNorm get exactly zero
        # gradient (the normalization removes them), so there only most of them do.
        assert all(moved) or (name == "ft" and sum(moved) > len(moved) // 2)
        assert all(p.requires_grad and p.grad is None for p in live_teacher.parameters())
        for key, value in live_teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), key
    finally:
        models.student_taps.remove()
        models.teacher_taps.remove()
