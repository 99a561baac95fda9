"""Knowledge review (ABF + HCL) against values worked out by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.reviewkd import ReviewKD, hierarchical_context_loss

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)


def outputs(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> Outputs:
    b = len(next(iter(student.values())))
    return Outputs(
        student_logits=torch.zeros(b, 2),
        teacher_logits=torch.zeros(b, 2),
        labels=torch.zeros(b, dtype=torch.long),
        student_features=student,
        teacher_features=teacher,
    )


def make_identity(method: ReviewKD, channels: int, keep_own: float, keep_deeper: float) -> None:
    """ABFs that pass maps through (eval-mode BN with ε = 0 and unit statistics is the
    identity) and fuse with attention sigmoid(bias) = (keep_own, keep_deeper)."""
    method.eval()
    eye = torch.eye(channels)
    with torch.no_grad():
        for abf in method.abfs:
            abf.reduce[0].weight.copy_(eye.view(channels, channels, 1, 1))
            abf.project[0].weight.zero_()
            abf.project[0].weight[:, :, 1, 1] = eye
            for bn in (abf.reduce[1], abf.project[1]):
                bn.eps = 0.0
            if abf.attention is not None:
                abf.attention[0].weight.zero_()
                abf.attention[0].bias.copy_(torch.logit(torch.tensor([keep_own, keep_deeper])))


# ------------------------------------------------------------------------------ HCL


def test_hcl_on_a_1x1_map_is_plain_mse() -> None:
    s = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    assert hierarchical_context_loss(s, torch.zeros_like(s)).item() == pytest.approx(2.5)


def test_hcl_2x2_adds_only_the_1x1_level() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # Full: (1 + 4 + 9 + 16)/4 = 7.5; 1×1: mean 2.5 → 6.25 with weight ½; over 1.5.
    expected = (7.5 + 0.5 * 6.25) / 1.5
    assert hierarchical_context_loss(s, torch.zeros_like(s)).item() == pytest.approx(expected)


def test_hcl_8x8_uses_all_pyramid_levels() -> None:
    s = torch.zeros(2, 1, 8, 8)
    s[0, 0, :, 0] = 1.0  # sample 1: one lit column out of eight
    t = torch.zeros_like(s)
    # Full: 8/64. 4×4 cells: 4 of 16 hold .5 → 4·.25/16. 2×2 cells: 2 of 4 hold 4/16 →
    # 2·(1/16)/4. 1×1: 8/64 → (1/8)². Weights 1, ½, ¼, ⅛ over 1.875.
    expected = (1 / 8 + 0.5 * 1 / 16 + 0.25 * 1 / 32 + 0.125 * 1 / 64) / 1.875
    loss = hierarchical_context_loss(s, t)
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx([expected, 0.0])


def test_hcl_4x4_skips_the_4x4_level() -> None:
    s = torch.arange(16.0).view(1, 1, 4, 4)
    t = torch.zeros_like(s)
    full = sum(v * v for v in range(16)) / 16
    quads = [
        (0 + 1 + 4 + 5) / 4,
        (2 + 3 + 6 + 7) / 4,
        (8 + 9 + 12 + 13) / 4,
        (10 + 11 + 14 + 15) / 4,
    ]
    two = sum(q * q for q in quads) / 4
    one = 7.5**2
    expected = (full + 0.5 * two + 0.25 * one) / 1.75
    assert hierarchical_context_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ the whole method


def test_review_loss_by_hand_with_fusion() -> None:
    s = {
        "s0": torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 2, 2),
        "s1": torch.full((1, 1, 1, 1), 2.0),
    }
    t = {"t0": torch.zeros(1, 1, 2, 2), "t1": torch.ones(1, 1, 1, 1)}
    out = outputs(s, t)
    method = ReviewKD(["s0", "s1"], ["t0", "t1"], pooled_level=False)
    method.setup(out, CONTEXT)
    make_identity(method, channels=1, keep_own=0.5, keep_deeper=0.75)
    # Level 1 passes 2 through: HCL = (2 − 1)² = 1. Level 0 fuses ½·S0 + ¾·2 =
    # [[1.5, 2.5], [3.5, 4.5]]: full (2.25 + 6.25 + 12.25 + 20.25)/4 = 10.25, 1×1 mean 3 → 9.
    expected = 1.0 + (10.25 + 0.5 * 9.0) / 1.5
    assert method.loss(out).item() == pytest.approx(expected, rel=1e-6)


def test_pooled_level_and_upsampling_to_the_teacher_size() -> None:
    # One student level at 1×1, the teacher's at 2×2: the fused map is repeated
    # (nearest) to 2×2; the pooled level compares the means 3 and (1+2+3+4)/4 = 2.5.
    s = {"s": torch.full((1, 1, 1, 1), 3.0)}
    t = {"t": torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)}
    out = outputs(s, t)
    method = ReviewKD(["s"], ["t"])
    method.setup(out, CONTEXT)
    make_identity(method, channels=1, keep_own=0.5, keep_deeper=0.5)
    # Level 0 fuses ½·3 + ½·3 = 3 everywhere: full (4 + 1 + 0 + 1)/4 = 1.5, 1×1 (3 − 2.5)².
    level0 = (1.5 + 0.5 * 0.25) / 1.5
    assert method.loss(out).item() == pytest.approx(level0 + 0.25, rel=1e-6)


def test_zero_when_the_review_passes_student_maps_through_and_they_equal_the_teacher() -> None:
    torch.manual_seed(0)
    maps = {"a": torch.randn(2, 2, 4, 4), "b": torch.randn(2, 2, 2, 2)}
    out = outputs(maps, {k: v.clone() for k, v in maps.items()})
    method = ReviewKD(["a", "b"], ["a", "b"])
    method.setup(out, CONTEXT)
    make_identity(method, channels=2, keep_own=1 - 1e-6, keep_deeper=1e-6)
    assert method.loss(out).abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_abf_widths_follow_teacher_channels_and_mid_rule() -> None:
    s = {f"s{i}": torch.ones(2, c, 4, 4) for i, c in enumerate((4, 8, 8))}
    t = {f"t{i}": torch.ones(2, c, 4, 4) for i, c in enumerate((8, 16, 32))}
    out = outputs(s, t)
    method = ReviewKD(list(s), list(t))
    method.setup(out, CONTEXT)
    widths = [
        (a.reduce[0].in_channels, a.reduce[0].out_channels, a.project[0].out_channels)
        for a in method.abfs
    ]
    assert widths == [(4, 8, 8), (8, 8, 16), (8, 8, 32), (8, 8, 32)]  # + the pooled level
    assert [a.attention is not None for a in method.abfs] == [True, True, True, False]
    narrow = ReviewKD(list(s), list(t), pooled_level=False, max_mid_channels=3)
    narrow.setup(out, CONTEXT)
    assert {a.reduce[0].out_channels for a in narrow.abfs} == {3}
    assert len(narrow.abfs) == 3


def test_warmup_through_start_epoch() -> None:
    torch.manual_seed(0)
    s = {"s": torch.randn(2, 2, 2, 2)}
    t = {"t": torch.randn(2, 2, 2, 2)}
    out = outputs(s, t)
    method = ReviewKD(["s"], ["t"], warmup_fraction=0.25)
    method.setup(out, CONTEXT)
    method.eval()
    full = method.loss(out)
    method.start_epoch(0, 8)  # warm-up over 0.25·8 = 2 epochs
    assert method.loss(out).tolist() == pytest.approx((0.5 * full).tolist())
    for epoch in (1, 7):
        method.start_epoch(epoch, 8)
        assert method.loss(out).tolist() == pytest.approx(full.tolist())
    default = ReviewKD(["s"], ["t"])
    default.start_epoch(0, 240)  # the official 20 of 240 epochs
    assert default.warmup == pytest.approx(1 / 20)
    default.start_epoch(19, 240)
    assert default.warmup == 1.0
    off = ReviewKD(["s"], ["t"], warmup_fraction=0.0)
    off.start_epoch(0, 8)
    assert off.warmup == 1.0
    # Per-epoch factors: with the default 20/240, stages up to 12 epochs get no warm-up.
    default.start_epoch(0, 12)
    assert default.warmup == 1.0
    default.start_epoch(0, 24)
    assert default.warmup == pytest.approx(0.5)


def test_default_weight_is_the_cifar100_configs_five() -> None:
    assert ReviewKD.default_weight == 5.0


def test_training_batch_of_one_gives_zero_loss_not_a_batchnorm_error() -> None:
    torch.manual_seed(0)
    s = {"a": torch.randn(1, 2, 4, 4, requires_grad=True)}
    t = {"a": torch.randn(1, 3, 4, 4)}
    method = ReviewKD(["a"], ["a"])  # the pooled 1×1 level: one value per BN channel
    method.setup(outputs({"a": torch.randn(2, 2, 4, 4)}, {"a": torch.randn(2, 3, 4, 4)}), CONTEXT)
    method.train()
    loss = method.loss(outputs(s, t))
    assert loss.shape == (1,) and loss.item() == 0.0
    loss.sum().backward()  # still tied to the graph when it is a stage's only term
    assert s["a"].grad is not None and s["a"].grad.abs().max().item() == 0.0
    method.eval()  # running statistics: a single sample is fine
    assert method.loss(outputs(s, t)).item() > 0


def test_gradients_reach_student_and_every_abf_not_teacher() -> None:
    torch.manual_seed(0)
    s = {
        "a": torch.randn(3, 2, 4, 4, requires_grad=True),
        "b": torch.randn(3, 4, 2, 2, requires_grad=True),
    }
    # The engine hands over teacher maps without history; ReviewKD also detaches them,
    # so even teacher tensors that ask for gradients get none.
    t = {
        "a": torch.randn(3, 3, 4, 4, requires_grad=True),
        "b": torch.randn(3, 5, 2, 2, requires_grad=True),
    }
    out = outputs(s, t)
    method = ReviewKD(["a", "b"], ["a", "b"])
    method.setup(out, CONTEXT)
    method.loss(out).mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in s.values())
    assert all(v.grad is None for v in t.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())


def test_unequal_layer_lists_name_both_sides() -> None:
    method = ReviewKD(["block1", "block2"], ["layer1", "layer2", "layer3"])
    out = outputs({"block1": torch.ones(2, 1, 2, 2)}, {"layer1": torch.ones(2, 1, 2, 2)})
    with pytest.raises(UserError, match=r"2 \(block1, block2\).*3 \(layer1, layer2, layer3\)"):
        method.setup(out, CONTEXT)


def test_vectors_are_rejected_with_both_shapes() -> None:
    method = ReviewKD(["fc"], ["layer3"])
    out = outputs({"fc": torch.ones(2, 4)}, {"layer3": torch.ones(2, 6, 4, 4)})
    with pytest.raises(UserError, match=r"fc.*\(4,\).*layer3.*\(6, 4, 4\)"):
        method.setup(out, CONTEXT)


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        ReviewKD([], ["t"])
    with pytest.raises(ValueError):
        ReviewKD(["s"], ["t"], warmup_fraction=1.5)


# --------------------------------------------------------------- inside the pipeline
