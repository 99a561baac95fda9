"""Models from outside the zoo: user factories, torchvision/timm names."""

from __future__ import annotations

import importlib.util
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smskd.config import ModelSpec, load_config
from smskd.errors import UserError
from smskd.experiment import distill, make_model, prepare_data
from smskd.models.taps import ModelLayout

FACTORY = textwrap.dedent(
    """
    from torch import nn

    def tiny_cnn(num_classes, width=4):
        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
        )

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch) -> str:
    (tmp_path / "user_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    return "user_models"


def test_factory_student_with_config_taps_runs_smskd(user_module: str, tmp_path: Path) -> None:
    cfg = load_config(
        {
            "teacher": {"model": "convnet-s", "epochs": 1},
            "student": {
                "model": {
                    "factory": f"{user_module}:tiny_cnn",
                    "kwargs": {"width": 6},
                    "taps": {"features": ["1", "3"], "embedding": "6:input"},
                }
            },
            "stages": [
                {"methods": ["kd"], "epochs": 1},
                {"methods": [{"name": "fitnets", "teacher_layer": "block1"}], "epochs": 1},
                {"methods": ["rkd"], "epochs": 1},
            ],
        }
    )
    result = distill(cfg, tmp_path / "run", progress=False)
    assert [r["stage_name"] for r in result.history] == ["kd", "fitnets", "rkd"]
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    weights = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert weights["2.weight"].shape == (12, 6, 3, 3)  # width=6 reached the factory
    student = make_model(cfg.student.model, prepare_data(cfg.data, 0, torch.device("cpu")))
    assert student.tap_layout == ModelLayout(("1", "3"), "6:input")
    assert student.tap_layout.role("hint") == "1"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("user_models", "must look like 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("user_models:missing", "has no 'missing'"),
        ("user_models:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_factories_fail_at_load(user_module: str, factory: str, message: str) -> None:
    raw = {"student": {"model": {"factory": factory}}, "stages": [{"epochs": 1}]}
    with pytest.raises(UserError, match=message):
        load_config(raw)


def test_name_or_factory_not_both() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(name="convnet-s", factory="x:y")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_external_model_names_need_their_library(library: str) -> None:
    raw = {"student": {"model": f"{library}/resnet18"}, "stages": [{"epochs": 1}]}
    if importlib.util.find_spec(library) is not None:
        assert load_config(raw).student.model.name == f"{library}/resnet18"
    else:
        with pytest.raises(UserError, match=f"needs {library}, which is not installed"):
            load_config(raw)
