"""Forward hooks on named modules, and default layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smskd.errors import UserError
from smskd.methods.registry import build_method
from smskd.models.convnet import ConvNet
from smskd.models.taps import FeatureTaps, ModelLayout, layout_of


def test_captures_outputs_and_inputs_and_removes_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with FeatureTaps(model, ["0", "2:input"]) as taps:
        model(x)
        assert torch.equal(taps.features["0"], model[0](x))
        assert torch.equal(taps.features["2:input"], torch.relu(model[0](x)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unknown_module_lists_real_names() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(UserError, match=r"student has no module named 'layer9'.*0, 1"):
        FeatureTaps(model, ["layer9"], "student")


def test_tapped_bn_output_keeps_pre_relu_values() -> None:
    model = ConvNet(num_classes=3, widths=(4, 8, 8)).eval()
    with FeatureTaps(model, ["block1.1"]) as taps:  # the BN right before a ReLU
        model(torch.randn(4, 1, 8, 8))
        assert taps.features["block1.1"].min() < 0


def test_layouts() -> None:
    assert layout_of(ConvNet(num_classes=3)).role("hint") == "block2"
    assert layout_of(ConvNet(num_classes=3)).role("features") == ["block1", "block2", "block3"]
    # Any other model: the embedding is the input of its last Linear; no feature defaults.
    auto = layout_of(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert auto == ModelLayout(features=(), embedding="2:input")
    assert auto.role("hint") is None


@pytest.mark.parametrize("tap", ["", ":input"])
def test_an_empty_module_name_is_refused_not_the_whole_model(tap: str) -> None:
    # named_modules() calls the model itself "": tapping it would silently take the
    # model's output (or input) as a "feature".
    with pytest.raises(UserError, match=r"taps\.features: .* names no module"):
        ModelLayout(features=("block1", tap))
    with pytest.raises(UserError, match=r"taps\.embedding: .* names no module"):
        ModelLayout(embedding=tap)
    layouts = {"student": layout_of(ConvNet(3)), "teacher": layout_of(ConvNet(3))}
    with pytest.raises(UserError, match=r"method 'rkd' option 'teacher_layer': .* names no"):
        build_method("rkd", {"teacher_layer": tap}, layouts["student"], layouts["teacher"])
    with pytest.raises(UserError, match=r"method 'at' option 'student_layers': .* names no"):
        build_method("at", {"student_layers": ["block1", tap]}, *layouts.values())


def test_a_bare_linear_model_has_no_embedding_to_tap() -> None:
    assert layout_of(nn.Linear(3, 2)) == ModelLayout()
