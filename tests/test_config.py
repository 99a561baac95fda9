"""Config validation: every mistake is one line naming the key and the valid choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smskd.config import MethodSpec, RunConfig, Stage, apply_override, load_config
from smskd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "teacher": {"model": "convnet-m", "epochs": 1},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}, {"methods": ["rkd"], "epochs": 1}],
    }


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        load_config(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_round_trips_through_yaml() -> None:
    cfg = load_config(base())
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert cfg.stages[0].methods[0].name == "kd"
    assert cfg.reference.weighting == "inverse_tcp"


def test_unknown_key_names_key_and_valid_keys() -> None:
    raw = base()
    raw["stages"][0]["optimizer"] = {"lrr": 0.1}
    message = error_of(raw)
    assert "'stages.0.optimizer.lrr'" in message
    assert "'lr'" in message and "'momentum'" in message


def test_unknown_top_level_key() -> None:
    raw = {**base(), "epochs": 3}
    assert "unknown key 'epochs'" in error_of(raw) and "'stages'" in error_of(raw)


def test_wrong_type_names_key_and_value() -> None:
    raw = base()
    raw["stages"][1]["epochs"] = "many"
    message = error_of(raw)
    assert message.startswith("config: stages.1.epochs:") and "'many'" in message


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("stages", 0, "methods"),
            ["kdd"],
            "unknown method 'kdd'; valid: 'at', 'cc', 'crd', 'dist', 'dkd', 'fitnets'",
        ),
        (("student", "model"), "resnet1000", "unknown model 'resnet1000'; valid: 'convnet-l'"),
        (
            ("data",),
            {"name": "mnist"},
            "unknown dataset 'mnist'; valid: 'cifar10', 'cifar100', 'digits', 'fashion-mnist'",
        ),
        (("reference", "weighting"), "inverse", "reference.weighting"),
        (("stages", 0, "epochs"), -1, "stages.0.epochs: Input should be greater than 0"),
    ],
)
def test_bad_values(path: tuple, value: object, expected: str) -> None:
    raw = base()
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = value
    assert expected in error_of(raw)


def test_unknown_method_option_lists_valid_options() -> None:
    raw = base()
    raw["stages"][0]["methods"] = [{"name": "kd", "temprature": 3}]
    assert "method 'kd' has no option 'temprature'; valid options: 'temperature'" in error_of(raw)


def test_wrong_method_option_type() -> None:
    raw = base()
    raw["stages"][0]["methods"] = [{"name": "rkd", "angle_weight": "big"}]
    assert "method 'rkd' option 'angle_weight'" in error_of(raw)


def test_empty_stage_list() -> None:
    raw = {**base(), "stages": []}
    assert "stages" in error_of(raw)


def test_methods_without_teacher_section() -> None:
    raw = base()
    del raw["teacher"]
    assert "teacher: required because its stages use KD methods" in error_of(raw)


def test_missing_required_key() -> None:
    raw = base()
    del raw["student"]
    assert "student: required key is missing" in error_of(raw)


def test_python_api_validates_too() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        Stage(methods=["nope"], epochs=1)
    stage = Stage(methods=["kd", {"name": "fitnets", "weight": 3, "student_layer": "a"}], epochs=2)
    assert stage.methods[1] == MethodSpec(name="fitnets", weight=3, student_layer="a")
    assert stage.label == "kd+fitnets"


def test_overrides_with_wildcards() -> None:
    raw = base()
    apply_override(raw, "stages.*.epochs=7")
    apply_override(raw, "reference.lam=0.5")
    cfg = load_config(raw)
    assert [s.epochs for s in cfg.stages] == [7, 7]
    assert cfg.reference.lam == 0.5
    with pytest.raises(UserError, match="not an index"):
        apply_override(base(), "stages.5.epochs=1")
    with pytest.raises(UserError, match=r"key\.path=value"):
        apply_override(base(), "stages")


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_is_valid() -> None:
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), RunConfig)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    raw = base()
    raw["stages"][0]["methods"] = ["kdd"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "smskd", "distill", str(path), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown method 'kdd'" in proc.stderr and "Traceback" not in proc.stderr


def test_quickstart_yaml_is_the_quickstart_run() -> None:
    from smskd.quickstart import quickstart_config

    assert load_config(ROOT / "configs" / "quickstart.yaml") == quickstart_config()


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ({"name": "kd", "temperature": True}, "method 'kd' option 'temperature'"),
        ({"name": "kd", "temperature": "4"}, "method 'kd' option 'temperature'"),
        ({"name": "rkd", "angle_weight": float("inf")}, "method 'rkd' option 'angle_weight'"),
        ({"name": "kd", "weight": float("nan")}, "weight"),
    ],
)
def test_method_options_are_strictly_typed(method: dict, expected: str) -> None:
    raw = base()
    raw["stages"][0]["methods"] = [method]
    assert expected in error_of(raw)


def test_method_options_are_converted() -> None:
    raw = base()
    raw["stages"][0]["methods"] = [{"name": "kd", "temperature": 3}]
    option = load_config(raw).stages[0].methods[0].options["temperature"]
    assert option == 3.0 and isinstance(option, float)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"seed": 2**40}, "seed: Input should be less than"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"reference": {"lam": float("inf")}}, "reference.lam"),
        ({"teacher": {"modle": "convnet-m"}}, "unknown key 'teacher.modle'"),
        ({"stages": [{"methods": ["kd", "kd"], "epochs": 1}]}, "'kd' appears twice"),
        ({"stages": [{"ce_weight": 0, "epochs": 1}]}, "nothing to train"),
        ({"stages": ["kd"]}, "stages.0"),
    ],
)
def test_more_bad_values(change: dict, expected: str) -> None:
    assert expected in error_of({**base(), **change})


def test_override_into_a_value_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="holds a value, not a section"):
        apply_override({"data": {"batch_size": 4}}, "data.batch_size.x=1")
    with pytest.raises(UserError, match="holds a value, not a section"):
        apply_override({"seed": 1}, "seed.x.y=1")


def test_override_expands_name_shorthands() -> None:
    raw = base()  # methods: ["kd"], student.model: "convnet-xs"
    apply_override(raw, "stages.0.methods.0.temperature=2")
    apply_override(raw, "student.model.kwargs.widths=[4,8,8]")
    cfg = load_config(raw)
    assert cfg.stages[0].methods[0].options == {"temperature": 2.0}
    assert cfg.student.model.kwargs == {"widths": [4, 8, 8]}
