"""Factor transfer against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.ft import FT

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=2)


def outputs(s: torch.Tensor, t: torch.Tensor) -> Outputs:
    return Outputs(
        student_logits=torch.zeros(len(s), 2),
        teacher_logits=torch.zeros(len(s), 2),
        labels=torch.zeros(len(s), dtype=torch.long),
        student_features={"s": s},
        teacher_features={"t": t},
    )


def identity_ft(out: Outputs, **kwargs: float) -> FT:
    """FT whose translator and paraphraser are identities, so the factors are the maps."""
    method = FT("s", "t", **kwargs)
    method.setup(out, CONTEXT)
    method.encoder, method.decoder, method.translator = nn.Identity(), nn.Identity(), nn.Identity()
    return method


def test_transfer_loss_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0, 2.0, 4.0], [3.0, 0.0, 0.0, 4.0]]).view(2, 1, 2, 2)
    t = torch.tensor([[0.0, 0.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    out = outputs(s, t)
    loss = identity_ft(out).loss(out)
    # Sample 1: (1,2,2,4)/5 vs (0,0,3,4)/5 → |.2|+|.4|+|−.2|+0 = .8, mean .2.
    # Sample 2: (3,0,0,4)/5 vs (1,0,0,0) → |−.4|+0+0+|.8| = 1.2, mean .3.
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx([0.2, 0.3], rel=1e-6)


def test_transfer_normalizes_the_whole_flattened_factor() -> None:
    # Two channels on a 1×2 map. Student channels (3, 0), (0, 1) → flattened (3, 0, 0, 1)/√10;
    # teacher (6, 0), (0, 8) → (0.6, 0, 0, 0.8). Mean |diff| = (|3/√10 − .6| + |1/√10 − .8|)/4.
    # Normalizing per channel, or per position over channels, would give (1, 0), (0, 1) on
    # both sides and a loss of 0.
    s = torch.tensor([[[[3.0, 0.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[6.0, 0.0]], [[0.0, 8.0]]]])
    out = outputs(s, t)
    r = math.sqrt(10)
    expected = (abs(3 / r - 0.6) + abs(1 / r - 0.8)) / 4
    assert identity_ft(out).loss(out).item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.2


def test_default_weight_and_plain_reconstruction_steps_at_that_weight() -> None:
    # β = 500 (the authors' CIFAR-10 setting); β · reconstruction_weight = 1 at the defaults.
    assert FT.default_weight == 500.0
    assert FT.default_weight * FT("s", "t").reconstruction_weight == pytest.approx(1.0)


def test_single_sample_batch_on_one_by_one_maps_gives_zero_loss_in_training() -> None:
    # BN in train mode cannot normalize one value per channel (a loader's short last batch).
    torch.manual_seed(0)
    probe = outputs(torch.randn(4, 3, 1, 1), torch.randn(4, 6, 1, 1))
    method = FT("s", "t")
    method.setup(probe, CONTEXT)
    s = torch.randn(1, 3, 1, 1, requires_grad=True)
    loss = method.loss(outputs(s, torch.randn(1, 6, 1, 1)))
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert s.grad is not None and not s.grad.any()
    assert method.loss(probe).abs().sum() > 0  # bigger batches are unaffected
    method.eval()  # running statistics: one sample is fine
    assert torch.isfinite(method.loss(outputs(s, torch.randn(1, 6, 1, 1)))).all()


def test_reconstruction_trains_paraphraser_but_leaves_value_alone() -> None:
    s = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    out = outputs(s, t)
    method = identity_ft(out, reconstruction_weight=0.5)
    method.decoder = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        method.decoder.weight.fill_(2.0)
    loss = method.loss(out)
    # The value is the transfer term alone: (3,4)/5 against (1,3)/√10.
    r = math.sqrt(10)
    assert loss.item() == pytest.approx((abs(0.6 - 1 / r) + abs(0.8 - 3 / r)) / 2, rel=1e-6)
    loss.sum().backward()
    # Reconstruction MSE = mean((w·t − t)²) = (w−1)²·(1+9)/2; d/dw = 2(w−1)·5 = 10 at w = 2,
    # times the weight 0.5.
    assert method.decoder.weight.grad.item() == pytest.approx(5.0, rel=1e-6)


def test_factor_channels_follow_the_rate() -> None:
    out = outputs(torch.ones(2, 4, 3, 3), torch.ones(2, 16, 3, 3))
    method = FT("s", "t")
    method.setup(out, CONTEXT)
    convs = [m for m in method.translator if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 4), (4, 8), (8, 8)]
    convs = [m for m in method.encoder if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 16), (16, 8), (8, 8)]
    assert method.decoder(method.encoder(out.teacher_features["t"])).shape == (2, 16, 3, 3)
    assert method.loss(out).shape == (2,)
    assert any(isinstance(m, nn.BatchNorm2d) for m in method.encoder)
    official = FT("s", "t", batch_norm=False)  # the official code's BN-free layers
    official.setup(out, CONTEXT)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in official.modules())


def test_zero_when_student_equals_teacher_and_translator_equals_paraphraser() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 4, 3, 3)
    out = outputs(f, f.clone())
    method = FT("s", "t")
    method.setup(out, CONTEXT)
    method.translator.load_state_dict(method.encoder.state_dict())
    assert method.loss(out).abs().max().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reconstruction_weight", [0.0, 1 / 500])
def test_gradients_reach_student_translator_and_only_reconstruction_moves_paraphraser(
    reconstruction_weight: float,
) -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 4, 3, 3, requires_grad=True)
    t = torch.randn(3, 6, 3, 3)
    out = outputs(s, t)
    method = FT("s", "t", reconstruction_weight=reconstruction_weight)
    method.setup(out, CONTEXT)
    method.loss(out).mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad.abs().sum() > 0 for p in method.translator.parameters())
    paraphraser = [*method.encoder.parameters(), *method.decoder.parameters()]
    moved = [p.grad is not None and p.grad.abs().sum() > 0 for p in paraphraser]
    assert all(moved) if reconstruction_weight else not any(moved)


def test_spatial_mismatch_names_both_modules_and_shapes() -> None:
    method = FT("block3", "layer3")
    out = Outputs(
        torch.zeros(2, 2),
        torch.zeros(2, 2),
        torch.zeros(2, dtype=torch.long),
        {"block3": torch.ones(2, 4, 8, 8)},
        {"layer3": torch.ones(2, 6, 4, 4)},
    )
    with pytest.raises(UserError, match=r"block3.*\(4, 8, 8\).*layer3.*\(6, 4, 4\)"):
        method.setup(out, CONTEXT)


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        FT("s", "t", rate=0.0)
    with pytest.raises(ValueError):
        FT("s", "t", reconstruction_weight=-1.0)
