"""The forgetting matrix: every stage end measured on the probe, against values
computed by hand from the saved stage-end students."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fakes import make_student
from torch.utils.data import DataLoader, TensorDataset

from smskd import Stage, run_stages
from smskd.store.checkpoint import load_state_dict

QUIET = {"progress": False, "log": lambda _: None}


def _split(tiny_data):
    train, test = tiny_data
    x, y = train.dataset.tensors
    return (
        DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32),
        DataLoader(TensorDataset(x[96:], y[96:]), batch_size=16),  # the probe: 2 batches
        test,
    )


def _stages() -> list[Stage]:
    return [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.2}),
        Stage(methods=[{"name": "fitnets", "weight": 2.0}], epochs=1, optimizer={"lr": 0.2}),
        Stage(methods=["rkd"], epochs=1, optimizer={"lr": 0.2}),
    ]


def _probed_run(tiny_data, teacher, folder, **extra):
    """The three stages into ``folder``, validated and measured on the probe."""
    train, probe, test = _split(tiny_data)
    return run_stages(
        make_student(),
        teacher,
        _stages(),
        train,
        test,
        val_data=probe,
        probe_data=probe,
        out_dir=folder,
        **extra,
        **QUIET,
    )


@pytest.fixture
def measured(tiny_data, teacher, tmp_path):
    return _probed_run(tiny_data, teacher, tmp_path), _split(tiny_data)[1], tmp_path


def _stage_end(folder, k):
    student = make_student()
    student.load_state_dict(load_state_dict(folder / "checkpoints" / f"stage{k}.pt"))
    return student.eval()


def test_each_stage_end_is_measured_as_by_hand(measured, teacher) -> None:
    result, probe, folder = measured
    assert [row["stage"] for row in result.forgetting] == [1, 2, 3]
    assert json.loads((folder / "forgetting.json").read_text())["rows"] == result.forgetting
    x = torch.cat([b[0] for b in probe])
    y = torch.cat([b[1] for b in probe])
    with torch.no_grad():
        t = teacher(x)
        logits = {k: _stage_end(folder, k)(x) for k in (1, 2, 3)}
    for k, row in enumerate(result.forgetting, 1):
        s, m = logits[k], row["measures"]
        assert m["probe_acc"] == pytest.approx(100 * (s.argmax(1) == y).float().mean().item())
        agree = (s.argmax(1) == t.argmax(1)).float().mean().item()
        assert m["teacher_agreement"] == pytest.approx(100 * agree)
        # KD, τ = 4: τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) per sample, averaged per probe batch
        p_t = F.softmax(t / 4, 1)
        kd = 16 * (p_t * (p_t.log() - F.log_softmax(s / 4, 1))).sum(1)
        assert m["loss:kd"] == pytest.approx(kd.mean().item(), rel=1e-4)
        for j in range(1, k):
            p_j = F.softmax(logits[j], 1)
            kl = (p_j * (p_j.log() - F.log_softmax(s, 1))).sum(1).mean().item()
            assert m[f"kl_to_stage{j}"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert f"kl_to_stage{k}" not in m
    # FitNets' regressor is trained in stage 2: before it there is no honest value.
    assert result.forgetting[0]["measures"]["loss:fitnets"] is None
    assert result.forgetting[1]["measures"]["loss:fitnets"] is not None
    assert all(row["measures"]["loss:rkd"] is not None for row in result.forgetting)


def test_measuring_does_not_change_training(tiny_data, teacher) -> None:
    train, probe, test = _split(tiny_data)
    plain = run_stages(make_student(), teacher, _stages(), train, test, **QUIET)
    probed = run_stages(make_student(), teacher, _stages(), train, test, probe_data=probe, **QUIET)
    for key, value in plain.student.state_dict().items():
        assert torch.equal(value, probed.student.state_dict()[key]), key
    assert plain.forgetting == [] and len(probed.forgetting) == 3


def test_rows_lost_in_a_crash_are_measured_from_the_saved_stages(
    measured, teacher, tiny_data
) -> None:
    """A run killed between a stage's end and its row measures that stage on resume,
    from stage<k>.pt and the stage's saved method helpers."""
    result, _, folder = measured
    (folder / "forgetting.json").unlink()
    again = _probed_run(tiny_data, teacher, folder, resume=True)
    assert [r["stage"] for r in again.forgetting] == [1, 2, 3]
    for before, after in zip(result.forgetting, again.forgetting, strict=True):
        assert before["measures"].keys() == after["measures"].keys()
        for key, value in before["measures"].items():
            again_value = after["measures"][key]
            assert (again_value is None) == (value is None), key
            if value is not None:
                assert again_value == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_method_keyed_on_training_indices_is_left_out_of_the_probe(indexed_data, teacher) -> None:
    train, test = indexed_data
    x, y, index = train.dataset.tensors
    probe = DataLoader(TensorDataset(x[96:], y[96:], index[96:]), batch_size=16)
    stages = [Stage(methods=["kd"], epochs=1), Stage(methods=["crd"], epochs=1)]
    result = run_stages(make_student(), teacher, stages, train, test, probe_data=probe, **QUIET)
    assert [row["measures"]["loss:crd"] for row in result.forgetting] == [None, None]
    assert all(row["measures"]["loss:kd"] is not None for row in result.forgetting)


def test_a_stage_with_crd_before_a_method_with_helpers_measures_it(indexed_data, teacher) -> None:
    # CRD is left out of the probe; FitNets after it must still get its own regressor.
    train, test = indexed_data
    x, y, index = train.dataset.tensors
    probe = DataLoader(TensorDataset(x[96:], y[96:], index[96:]), batch_size=16)
    stages = [Stage(methods=["crd", "fitnets"], epochs=1)]
    result = run_stages(make_student(), teacher, stages, train, test, probe_data=probe, **QUIET)
    measures = result.forgetting[0]["measures"]
    assert measures["loss:crd"] is None and measures["loss:fitnets"] > 0


def test_a_method_in_two_stages_has_a_column_per_stage(tiny_data, teacher) -> None:
    """kd at T=4, then at T=1: one column could not mean one loss all the way down."""
    train, probe, test = _split(tiny_data)
    stages = [
        Stage(methods=[{"name": "kd", "temperature": 4.0}], epochs=1),
        Stage(methods=[{"name": "kd", "temperature": 1.0}], epochs=1),
    ]
    result = run_stages(make_student(), teacher, stages, train, test, probe_data=probe, **QUIET)
    first, second = (row["measures"] for row in result.forgetting)
    assert {k for k in first if k.startswith("loss:")} == {"loss:kd@1", "loss:kd@2"}
    x = torch.cat([b[0] for b in probe])
    with torch.no_grad():
        student, t = result.student.eval()(x), teacher(x)
    # The last row's stage-1 column is KD at T=4 (with the τ² factor), the other at T=1.
    for key, tau in (("loss:kd@1", 4.0), ("loss:kd@2", 1.0)):
        kl = F.kl_div(F.log_softmax(student / tau, 1), F.softmax(t / tau, 1), reduction="none")
        assert second[key] == pytest.approx(kl.sum(1).mean().item() * tau**2, rel=1e-4), key
