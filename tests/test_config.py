"""Config validation: every mistake is one line naming the key and the valid choices."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from smskd.cli.commands import main
from smskd.config import (
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    MethodSpec,
    ReferenceConfig,
    RunConfig,
    Stage,
    apply_override,
    load_config,
    parse_yaml,
    read_yaml_mapping,
)
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


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path: Path, capsys) -> None:
    """In-process (a real process printing this one line: tests/test_bad_inputs.py)."""
    raw = base()
    raw["stages"][0]["methods"] = ["kdd"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(path), "--out", str(tmp_path / "run")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0
    assert "unknown method 'kdd'" in stderr and "Traceback" not in stderr


def test_quickstart_yaml_is_the_quickstart_run() -> None:
    from smskd.cli.quickstart import quickstart_config

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


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("on", "on"),
        ("yes", "yes"),
        ("off", "off"),
        ("n", "n"),
        ("Y", "Y"),
        ("true", True),
        ("False", False),
        ("TRUE", True),
        ("010", 10),
        ("0o10", 8),
        ("0x1f", 31),
        ("-7", -7),
        ("2:00", "2:00"),
        ("1e3", 1000.0),
        ("-.inf", float("-inf")),
        ("1_000", "1_000"),
        ("2024-01-01", "2024-01-01"),
        ("~", None),
        ("'true'", "true"),
    ],
)
def test_yaml_scalars_follow_yaml_1_2(text: str, value: object) -> None:
    parsed = parse_yaml(f"key: {text}", "t")["key"]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["!!int abc", "!!bool yes", "!!timestamp 2024-01-01"])
def test_tags_outside_yaml_1_2_core_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="t: not valid YAML at line 1"):
        parse_yaml(f"key: {text}", "t")


def test_a_key_given_twice_names_both_lines() -> None:
    with pytest.raises(UserError, match="t: key 'seed' appears twice, at lines 1 and 3; keep one"):
        parse_yaml("seed: 1\ndata: {}\nseed: 2\n", "t")
    with pytest.raises(UserError, match="key 'name' appears twice, at lines 2 and 3"):
        parse_yaml("data:\n  name: digits\n  name: cifar10\n", "t")
    with pytest.raises(UserError, match="key 'lr' appears twice"):
        parse_yaml("a: &a {lr: 1}\nb: {<<: *a, lr: 2, lr: 3}\n", "t")


def test_merge_keys_are_not_repeats_and_written_keys_win() -> None:
    text = """
sgd: &sgd {name: sgd, lr: 0.1, momentum: 0.5}
outer:
  fast: &fast {<<: *sgd, lr: 0.2}
both: {<<: [*fast, {lr: 9, nesterov: true}], momentum: 0.9}
"""
    parsed = parse_yaml(text, "t")
    assert parsed["outer"]["fast"] == {"name": "sgd", "lr": 0.2, "momentum": 0.5}
    assert parsed["both"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True}


def test_ordinary_anchors_and_aliases_load() -> None:
    text = "opt: &opt {lr: 0.1}\nstages:\n  - {epochs: 1, optimizer: *opt}\n  - {epochs: 1}\n"
    raw = {**base(), **parse_yaml(text, "t")}
    raw["stages"][1]["optimizer"] = raw.pop("opt")
    assert [s.optimizer.lr for s in load_config(raw).stages] == [0.1, 0.1]


def test_an_alias_bomb_is_refused_at_once() -> None:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    started = time.perf_counter()
    with pytest.raises(UserError, match=f"line 5: the value here is more than {MAX_YAML_NODES}"):
        parse_yaml("\n".join(lines), "t")
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "text",
    [
        "deep: " + "[" * 5000 + "]" * 5000,
        # Each alias nests the one before it: shallow as written, 300 levels expanded.
        "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 300)),
    ],
    ids=["brackets", "aliases"],
)
def test_deep_nesting_is_refused_without_recursion_errors(text: str) -> None:
    with pytest.raises(UserError, match=f"nested deeper than {MAX_YAML_DEPTH} levels"):
        parse_yaml(text, "t")


def test_nesting_up_to_the_limit_loads() -> None:
    depth = MAX_YAML_DEPTH - 1  # the top-level mapping is a level too
    assert parse_yaml("a: " + "[" * depth + "]" * depth, "t")


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(UserError, match=r"line 1: alias \*a is inside its own anchor"):
        parse_yaml("a: &a [1, *a]", "t")


def test_overrides_read_yaml_like_files() -> None:
    raw = base()
    apply_override(raw, "stages.*.epochs=on")
    assert raw["stages"][0]["epochs"] == "on"
    with pytest.raises(UserError, match=r"override 'data=.*': key 'name' appears twice"):
        apply_override(base(), "data={name: digits, name: cifar10}")


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_YAML_BYTES + "\nseed: 0\n")
    with pytest.raises(UserError, match="larger than 1 MiB"):
        load_config(path)


def test_a_config_path_that_is_no_file_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(UserError, match="not a regular file but a character device"):
        load_config("/dev/null")
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    errors: list[str] = []

    def load() -> None:
        try:
            read_yaml_mapping(fifo, "sweep file", "name")
        except UserError as err:
            errors.append(str(err))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): let it through before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_yaml_mapping opened a FIFO")
    assert errors and "not a regular file but a named pipe (FIFO)" in errors[0]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("stages", 0, "epochs"), True, "stages.0.epochs: expected a number, not true"),
        (("stages", 0, "optimizer", "lr"), False, "optimizer.lr: expected a number, not false"),
        (("stages", 0, "schedule", "milestones"), [2, True], "milestones: expected a number"),
        (("stages", 0, "methods", 0, "weight"), True, "methods.0.weight: expected a number"),
        (("seed",), True, "seed: expected a number"),
        (("stages", 0, "optimizer", "nesterov"), "yes", "expected true or false, not 'yes'"),
        (("data", "augment"), "off", "data.augment: expected true or false, not 'off'"),
        (("performance", "compile"), 1, "performance.compile: expected true or false, not 1"),
    ],
)
def test_true_false_and_numbers_do_not_convert(path: tuple, value: object, expected: str) -> None:
    raw = base()
    raw["stages"][0] = {"methods": [{"name": "kd"}], "epochs": 1}
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[path[-1]] = value
    assert expected in error_of(raw)


def test_python_api_refuses_true_as_a_number() -> None:
    with pytest.raises(ValueError, match="expected a number, not true"):
        Stage(epochs=True)
    assert Stage(epochs=3, ce_weight=1).ce_weight == 1.0


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names(device: str) -> None:
    assert load_config({**base(), "device": device}).device == device


@pytest.mark.parametrize("device", ["meta", "cuda:", "cuda:x", "gpu", "CPU", "cpu:0", "xpu"])
def test_unknown_devices_are_refused_at_load(device: str) -> None:
    assert f"device: unknown device {device!r}; valid: 'auto', 'cpu'" in error_of(
        {**base(), "device": device}
    )


def test_look_alike_letters_are_escaped_in_keys_and_names() -> None:
    message = error_of({**base(), "\u0455eed": 1})
    assert "unknown key '\\u0455eed' (U+0455 CYRILLIC SMALL LETTER DZE is not ASCII)" in message
    assert "did you mean 'seed'" in message
    message = error_of({**base(), "data": {"name": "digit\u0455"}})
    assert "unknown dataset 'digit\\u0455' (U+0455" in message
    raw = base()
    raw["reference"] = {"weighting": "t\u0441p"}
    assert "(got 't\\u0441p' (U+0441 CYRILLIC SMALL LETTER ES is not ASCII))" in error_of(raw)


def test_a_reference_in_a_one_stage_config_is_refused(tmp_path: Path) -> None:
    one_stage = {**base(), "stages": [{"methods": ["kd"], "epochs": 1}]}
    message = error_of({**one_stage, "reference": {"lam": 2.0}})
    assert "reference: the reference loss acts from stage 2 on" in message
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(one_stage))
    with pytest.raises(UserError, match="one stage"):
        load_config(path, ["reference.weighting=tcp"])
    # "No reference" is true of one stage; a run directory's config.yaml lists every key.
    assert load_config({**one_stage, "reference": {"weighting": "none"}})
    saved = RunConfig.model_validate(one_stage).model_copy(
        update={"reference": ReferenceConfig(weighting="tcp")}
    )
    path.write_text(saved.to_yaml())
    assert load_config(path) == saved


def test_to_yaml_quotes_strings_yaml_would_read_as_numbers_or_booleans() -> None:
    raw = base()
    raw["stages"][0]["name"] = "1e3"
    raw["stages"][1]["name"] = "on"
    cfg = load_config(raw)
    text = cfg.to_yaml()
    assert load_config(parse_yaml(text, "t")) == cfg
    assert yaml.safe_load(text)["stages"][1]["name"] == "on"  # YAML 1.1 readers too
