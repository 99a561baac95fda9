"""Tracking: CSV/JSONL always; TensorBoard and MLflow read back from what they wrote."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest
from fakes import fail_on_call

import smskd.train.epoch as engine
from smskd.config import Stage, TrackingConfig, load_config
from smskd.errors import UserError
from smskd.store.tracking import MetricsLog, flatten
from smskd.train.stages import run_stages

QUIET = {"progress": False, "log": lambda _: None}
STEPS_PER_EPOCH = 4  # tiny_data: 128 samples, batch 32


def stages() -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.1}),
        Stage(methods=["rkd"], epochs=2, optimizer={"lr": 0.1}, schedule={"name": "cosine"}),
    ]


def read_steps(run_dir) -> dict[str, dict[int, float]]:
    """steps.csv as key → {global_step: value}, refusing a step logged twice."""
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    with (run_dir / "steps.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["global_step"])
            assert step not in curves[row["key"]], f"{row['key']} logged twice at step {step}"
            curves[row["key"]][step] = float(row["value"])
    return curves


def test_csv_and_jsonl_always_and_step_means_add_up_to_the_epoch_means(
    student, live_teacher, tiny_data, tmp_path
):
    result = run_stages(
        student,
        live_teacher,
        stages(),
        *tiny_data,
        out_dir=tmp_path,
        tracking=TrackingConfig(every_steps=1),
        **QUIET,
    )
    curves = read_steps(tmp_path)
    assert set(curves) >= {"step/ce", "step/kd", "step/rkd", "step/reference", "step/lr"}
    assert set(curves) >= {"step/loss", "step/acc", "step/ref_weight_mean"}
    assert sorted(curves["step/loss"]) == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert sorted(curves["step/reference"]) == list(range(2 * STEPS_PER_EPOCH + 1, 17))
    for record in result.history:
        first = (record["global_epoch"] - 1) * STEPS_PER_EPOCH + 1
        steps = range(first, first + STEPS_PER_EPOCH)
        for key in ("loss", "ce", "acc"):
            mean = sum(curves[f"step/{key}"][s] for s in steps) / STEPS_PER_EPOCH
            assert mean == pytest.approx(record[f"train_{key}"], rel=1e-5), key
        assert [curves["step/lr"][s] for s in steps] == pytest.approx([record["lr"]] * 4)
    # metrics.csv: every epoch record, with the columns stage 2 added
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["test_acc"]) for r in rows] == [r["test_acc"] for r in result.history]
    assert rows[0]["train_reference"] == "" and float(rows[3]["train_reference"]) > 0
    assert 0 <= float(rows[3]["train_acc"]) <= 100


def test_windows_average_every_steps_and_flush_at_epoch_end(
    student, live_teacher, tiny_data, tmp_path
):
    run_stages(
        student,
        live_teacher,
        stages()[:1],
        *tiny_data,
        out_dir=tmp_path,
        tracking=TrackingConfig(every_steps=3),
        **QUIET,
    )
    # 4 steps an epoch: points at 3, 4 (epoch end), 6, 8 (epoch end)
    assert sorted(read_steps(tmp_path)["step/loss"]) == [3, 4, 6, 8]


def test_metrics_log_rewrites_its_table_when_cut_back(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log({"global_epoch": 1, "test_acc": 50.0})
    log.log({"global_epoch": 2, "test_acc": 60.0, "train_reference": 0.5, "hist": [0.25, 0.75]})
    table = (tmp_path / "metrics.csv").read_text().splitlines()
    assert table == [
        "global_epoch,test_acc,train_reference,hist",
        "1,50.0,,",
        "2,60.0,0.5,0.25 0.75",
    ]
    MetricsLog(tmp_path / "metrics.jsonl").keep_until(1)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "global_epoch,test_acc",
        "1,50.0",
    ]


def test_flatten_makes_scalar_hyper_parameters():
    assert flatten({"a": {"b": 1}, "c": [2, 3], "d": [{"e": "x"}], "f": None}) == {
        "a.b": 1,
        "c": "[2, 3]",
        "d.0.e": "x",
        "f": "null",
    }


def test_tracking_config_shorthand_and_choices():
    assert TrackingConfig.model_validate(["tensorboard", "mlflow", "tensorboard"]).backends == [
        "tensorboard",
        "mlflow",
    ]
    with pytest.raises(
        UserError, match=r"tracking\.backends\.0: Input should be 'tensorboard' or 'mlflow'"
    ):
        load_config(
            {"student": {"model": "convnet-xs"}, "stages": [{"epochs": 1}], "tracking": ["wandb"]}
        )


def test_a_missing_backend_package_names_its_extra(monkeypatch, student, tiny_data, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install 'smskd\[mlflow\]'"):
        run_stages(
            student,
            None,
            [Stage(epochs=1)],
            *tiny_data,
            out_dir=tmp_path,
            tracking=TrackingConfig(backends=["mlflow"]),
            **QUIET,
        )
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before training


def test_backends_need_a_run_directory(student, tiny_data):
    with pytest.raises(UserError, match="pass out_dir"):
        run_stages(student, None, [Stage(epochs=1)], *tiny_data, tracking=["tensorboard"], **QUIET)


# ----------------------------------------------------------------- TensorBoard


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    """What TensorBoard shows: tag → {step: value}, refusing a step shown twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        steps = [e.step for e in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step shows twice: {steps}"
        scalars[tag] = {e.step: e.value for e in points}
    return scalars


def test_tensorboard_event_files_hold_steps_epochs_stages_and_hparams(
    student, live_teacher, indexed_data, tmp_path
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_stages(
        student,
        live_teacher,
        stages(),
        *indexed_data,
        out_dir=tmp_path,
        tracking=TrackingConfig(backends=["tensorboard"], every_steps=2),
        **QUIET,
    )
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    steps = read_steps(tmp_path)
    for key in ("step/ce", "step/kd", "step/rkd", "step/reference", "step/ref_weight_mean"):
        assert scalars[key] == pytest.approx(steps[key], rel=1e-6), key
    assert [scalars["epoch/test_acc"][4 * e] for e in (1, 2, 3, 4)] == pytest.approx(
        [r["test_acc"] for r in result.history]
    )
    assert scalars["epoch/train_acc"][16] == pytest.approx(result.history[-1]["train_acc"])
    assert scalars["stage"][8] == 1 and scalars["stage"][10] == 2  # the stage boundary
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["stages.1.methods.0.name"].string_value == "rkd"
    assert hparams["seed"].number_value == 0
    marks = [e for e in events.Tensors("stage/text_summary")]
    assert [m.step for m in marks] == [1, 9]
    assert b"stage 2: rkd" in marks[1].tensor_proto.string_val[0]


def test_tensorboard_after_resume_shows_every_step_once(
    student, live_teacher, indexed_data, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    tracking = TrackingConfig(backends=["tensorboard"], every_steps=1)
    # stage 1, epoch 2: the checkpoint is after epoch 1 (step 4)
    fail_on_call(monkeypatch, "step_loss", 7, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(
            student,
            live_teacher,
            stages(),
            *indexed_data,
            out_dir=tmp_path,
            tracking=tracking,
            **QUIET,
        )
    monkeypatch.undo()
    run_stages(
        student,
        live_teacher,
        stages(),
        *indexed_data,
        out_dir=tmp_path,
        resume=True,
        tracking=tracking,
        **QUIET,
    )
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one event file per process
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    steps = read_steps(tmp_path)  # refuses duplicates
    assert sorted(steps["step/loss"]) == list(range(1, 17))
    # The steps 5, 6 the crashed process logged are purged, the resumed ones kept.
    assert scalars["step/loss"] == pytest.approx(steps["step/loss"], rel=1e-6)


# ----------------------------------------------------------------------- MLflow


def test_mlflow_run_holds_params_metrics_and_continues_after_resume(
    student, live_teacher, indexed_data, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingConfig(backends=["mlflow"], every_steps=2, mlflow_experiment="tests")
    from smskd.train.interrupt import RunStopped

    fail_on_call(monkeypatch, "step_loss", 11, RunStopped("stopped", 15))
    with pytest.raises(RunStopped):
        run_stages(
            student,
            live_teacher,
            stages(),
            *indexed_data,
            out_dir=tmp_path,
            tracking=tracking,
            name="tracked",
            **QUIET,
        )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_stages(
        student,
        live_teacher,
        stages(),
        *indexed_data,
        out_dir=tmp_path,
        resume=True,
        tracking=tracking,
        name="tracked",
        **QUIET,
    )
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the same run, continued
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["stages.1.methods.0.name"] == "rkd"
    assert run.data.params["reference.weighting"] == "inverse_tcp"  # the default
    test_acc = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/test_acc")}
    assert test_acc == {
        4 * e: pytest.approx(r["test_acc"]) for e, r in enumerate(result.history, 1)
    }
    reference = client.get_metric_history(run_id, "step/reference")
    # Step 10 was logged before the stop and again after the resume (MLflow keeps
    # both); the checkpoint ended a point, so both carry the same value.
    again = [m.value for m in reference if m.step == 10]
    assert len(again) == 2 and again[0] == pytest.approx(again[1], rel=1e-6)
    assert min(m.step for m in reference) == 10 and max(m.step for m in reference) == 16
    assert run.data.tags["smskd.stage1"] == "kd, from step 1"
    assert run.data.tags["smskd.stage2"] == "rkd, from step 9"
    assert client.get_metric_history(run_id, "step/lr")[-1].value == pytest.approx(
        result.history[-1]["lr"]
    )


def test_distill_puts_teacher_and_student_runs_in_one_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from smskd.experiment import distill

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        {
            "data": {"name": "digits", "train_subset": 200, "batch_size": 50},
            "teacher": {"model": "convnet-xs", "epochs": 1},
            "student": {"model": "convnet-xs"},
            "stages": [{"methods": ["kd"], "epochs": 1}],
            "tracking": ["mlflow"],
        }
    )
    distill(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "teacher" / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smskd").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["student", "teacher"]
    student_run = next(r for r in runs if r.info.run_name == "student")
    assert student_run.data.params["data.name"] == "digits"
    assert student_run.data.params["tracking.backends"] == '["mlflow"]'


def test_a_mid_epoch_resume_logs_what_an_uninterrupted_run_logs(
    student, live_teacher, indexed_data, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    initial = {k: v.clone() for k, v in student.state_dict().items()}
    common = {
        "tracking": TrackingConfig(backends=["tensorboard"], every_steps=2),
        "checkpoint_every_steps": 3,  # mid-epoch checkpoints off the 2-step grid
        **QUIET,
    }
    whole = tmp_path / "whole"
    run_stages(student, live_teacher, stages(), *indexed_data, out_dir=whole, **common)
    student.load_state_dict(initial)
    cut = tmp_path / "cut"
    fail_on_call(
        monkeypatch, "step_loss", 12, RuntimeError("power cut")
    )  # stage 2, epoch 1, step 4: the checkpoint is after step 3
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(student, live_teacher, stages(), *indexed_data, out_dir=cut, **common)
    monkeypatch.undo()
    run_stages(student, live_teacher, stages(), *indexed_data, out_dir=cut, resume=True, **common)
    expected, got = read_steps(whole), read_steps(cut)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert tensorboard_scalars(cut / "tensorboard")["step/loss"] == pytest.approx(
        expected["step/loss"], rel=1e-5
    )
    events = EventAccumulator(str(cut / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [m.step for m in events.Tensors("stage/text_summary")] == [1, 9]  # no second mark


def test_skipped_batches_stay_out_of_the_step_curves(
    student, live_teacher, tiny_data, tmp_path, monkeypatch
):
    real = engine.step_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        total, terms = real(*args, **kwargs)
        if calls["n"] == 2:
            total = total * float("nan")
            terms = {k: v * float("nan") for k, v in terms.items()}
        return total, terms

    monkeypatch.setattr(engine, "step_loss", poisoned)
    result = run_stages(
        student,
        live_teacher,
        [Stage(methods=["kd"], epochs=1)],
        *tiny_data,
        out_dir=tmp_path,
        nonfinite="skip",
        tracking=TrackingConfig(every_steps=4),  # one point: the epoch's 4 steps
        **QUIET,
    )
    record = result.history[0]
    assert record["train_skipped_batches"] == 1
    curves = read_steps(tmp_path)
    assert curves["step/loss"] == {4: pytest.approx(record["train_loss"], rel=1e-5)}
    assert curves["step/kd"] == {4: pytest.approx(record["train_kd"], rel=1e-5)}


def test_a_checkpoint_from_before_global_steps_resumes_at_the_right_step(
    student, live_teacher, indexed_data, tmp_path, monkeypatch
):
    from smskd.store.checkpoint import atomic_save, safe_load

    fail_on_call(
        monkeypatch, "step_loss", 7, RuntimeError("power cut")
    )  # the checkpoint is after epoch 1 (step 4)
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(student, live_teacher, stages(), *indexed_data, out_dir=tmp_path, **QUIET)
    monkeypatch.undo()
    last = tmp_path / "checkpoints" / "last.pt"
    state = safe_load(last)
    assert state.pop("global_step") == 4
    atomic_save(state, last)  # as an older smskd wrote it
    run_stages(
        student, live_teacher, stages(), *indexed_data, out_dir=tmp_path, resume=True, **QUIET
    )
    # every_steps 10 and epochs of 4 steps: points at 10 and at every epoch end
    assert sorted(read_steps(tmp_path)["step/loss"]) == [4, 8, 10, 12, 16]


def test_a_run_directory_from_before_the_tracking_key_still_resumes(tmp_path, capsys):
    import yaml

    from smskd.experiment import distill

    raw = {
        "data": {"name": "digits", "train_subset": 200, "batch_size": 50},
        "teacher": {"model": "convnet-xs", "epochs": 1},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
    }
    distill(load_config(raw), tmp_path / "run", progress=False)
    for saved in (tmp_path / "run" / "config.yaml", tmp_path / "run" / "teacher" / "config.yaml"):
        old = yaml.safe_load(saved.read_text())
        del old["tracking"]  # as the config was written before the key existed
        saved.write_text(yaml.safe_dump(old, sort_keys=False))
    capsys.readouterr()
    distill(load_config(raw), tmp_path / "run", resume=True, progress=False)
    assert "student: already complete" in capsys.readouterr().out
    changed = {**raw, "seed": 1}
    with pytest.raises(UserError, match="different config"):
        distill(load_config(changed), tmp_path / "run", resume=True, progress=False)


@pytest.mark.slow  # two sweeps: four runs and a teacher
def test_a_sweep_puts_its_runs_in_one_mlflow_store_and_keeps_teacher_names(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import yaml
    from mlflow.tracking import MlflowClient

    from smskd.study.sweep import run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    tiny = ["stages.*.epochs=1", "teacher.epochs=1", "data.train_subset=200"]

    def sweep(out, extra, only=()):
        path = tmp_path / f"{out}.yaml"
        content = {"name": "t", "base": str(quickstart), "seeds": [0], "set": tiny + extra}
        path.write_text(yaml.safe_dump({**content, "recipes": ["single"]}))
        run_sweep(path, tmp_path / out, only=only, progress=False, log=lambda _: None)
        return tmp_path / out

    tracked = sweep("tracked", ["tracking.backends=[mlflow]"])
    client = MlflowClient(f"sqlite:///{tracked / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smskd").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == ["single-fitnets", "single-kd", "single-rkd", "teacher"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not list(tracked.rglob("*/mlflow.db"))  # no store per run
    untracked = sweep("untracked", [], only=["single-kd"])
    # Where numbers go is not part of a teacher's identity: the same directory name.
    assert [p.name for p in (tracked / "teachers").iterdir()] == [
        p.name for p in (untracked / "teachers").iterdir()
    ]
