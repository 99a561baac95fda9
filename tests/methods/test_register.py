"""A user's own method, registered: usable by name, options checked, refusals clear."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import smskd.methods.registry as registry
from smskd import DistillMethod, Outputs, Stage, UserError, register_method, run_stages
from smskd.config import load_config


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Registrations stay inside the test (the config reference lists the registry)."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))


class L2Logits(DistillMethod):
    name = "l2-logits"
    family = "response"
    citation = "a test"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def loss(self, out: Outputs) -> Tensor:
        return self.scale * (out.student_logits - out.teacher_logits).pow(2).mean(dim=1)


def test_a_registered_method_trains_as_a_stage(student, live_teacher, tiny_data) -> None:
    assert register_method(L2Logits) is L2Logits
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=[{"name": "l2-logits"}], epochs=2)]
    result = run_stages(student, live_teacher, stages, *tiny_data, progress=False, log=print)
    losses = [r["train_l2-logits"] for r in result.history if r["stage"] == 2]
    assert losses[1] < losses[0]  # the student moves towards the teacher's logits
    cfg = load_config(
        {
            "teacher": {"model": "convnet-xs"},
            "student": {"model": "convnet-xs"},
            "stages": [{"methods": [{"name": "l2-logits", "scale": 2}], "epochs": 1}],
        }
    )
    assert cfg.stages[0].methods[0].options == {"scale": 2}


def test_its_options_are_checked_like_the_built_ins() -> None:
    register_method(L2Logits)
    with pytest.raises(
        ValueError, match="method 'l2-logits' has no option 'scal'; valid options: 'scale'"
    ):
        Stage(methods=[{"name": "l2-logits", "scal": 2}], epochs=1)


def test_refusals_name_the_fix() -> None:
    class Taken(L2Logits):
        name = "kd"

    with pytest.raises(UserError, match=r"'kd' is taken by smskd\.methods\.kd\.KD"):
        register_method(Taken)

    class NoFamily(DistillMethod):
        name = "x"
        citation = "c"

    with pytest.raises(UserError, match="needs the class attribute"):
        register_method(NoFamily)

    class Unhinted(L2Logits):
        name = "unhinted"

        def __init__(self, scale=1.0):  # no type hint: its option cannot be checked
            super().__init__()

    with pytest.raises(UserError, match="type hint on every option"):
        register_method(Unhinted)
    with pytest.raises(UserError, match="DistillMethod subclass"):
        register_method(torch.nn.Linear)
    assert register_method(L2Logits) is register_method(L2Logits)  # twice is fine


def test_a_method_without_options_and_a_redefined_class(student, live_teacher, tiny_data) -> None:
    class Plain(DistillMethod):  # no __init__ of its own: nn.Module's (*args, **kwargs)
        name, family, citation = "plain", "response", "a test"

        def loss(self, out: Outputs) -> Tensor:
            return (out.student_logits - out.teacher_logits).abs().mean(dim=1)

    register_method(Plain)
    run_stages(
        student,
        live_teacher,
        [Stage(methods=["plain"], epochs=1)],
        *tiny_data,
        progress=False,
        log=lambda _: None,
    )

    class Plain(DistillMethod):  # a notebook cell run again, edited
        name, family, citation = "plain", "response", "a test, edited"

        def loss(self, out: Outputs) -> Tensor:
            return out.student_logits.new_zeros(len(out.student_logits))

    assert register_method(Plain) is registry.METHODS["plain"]
