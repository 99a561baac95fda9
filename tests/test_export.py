"""smskd.cli.export: a finished run's student as ONNX / TorchScript / safetensors."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import smskd.cli.export as export
from smskd.cli.export import CHECK_BATCH, ExportResult, export_student
from smskd.config import load_config
from smskd.errors import UserError
from smskd.experiment import distill, prepare_data
from smskd.models.convnet import ConvNet
from smskd.store.checkpoint import load_weights, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# KD → FitNets (a helper regressor) → RKD with a bigger teacher: the file must hold none of it.
TINY = [
    "teacher.model=convnet-s",
    "teacher.epochs=1",
    "stages.*.epochs=1",
    "data.train_subset=128",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    distill(load_config(ROOT / "configs" / "quickstart.yaml", TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def student(run: Path) -> torch.nn.Module:
    """The run's student, built by hand (convnet-xs), not through smskd.cli.export."""
    model = ConvNet(num_classes=10, in_channels=1, widths=(8, 16, 32))
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def digits(run: Path) -> torch.Tensor:
    """All 359 real test images, normalized as in training."""
    cfg = load_config(run / "config.yaml")
    test = prepare_data(cfg.data, cfg.seed, torch.device("cpu")).test
    return torch.cat([batch[0] for batch in test])


def logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def assert_reproduces(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=export.RTOL * np.abs(want).max())


def hide_packages(monkeypatch, *names: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def jit_load(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch.jit warns of its own deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


def onnx_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def needs_onnx_export() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")


def test_the_student_is_worth_comparing(student, digits) -> None:
    out = logits(student, digits)
    assert out.shape == (359, 10)
    assert out.std(axis=0).max() > 1e-2  # logits vary with the input: a match means something


def test_onnx_runs_at_any_batch_size_and_matches_the_student(
    run, student, digits, tmp_path, capfd
) -> None:
    needs_onnx_export()
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    capfd.readouterr()
    result = export_student(run, "onnx", tmp_path / "student.onnx")
    captured = capfd.readouterr()
    # torch's own noise (torchvision registration, pytree deprecations) stays out of sight.
    assert "torchvision" not in captured.err and "LeafSpec" not in captured.err
    assert captured.out == ""

    session = onnx_session(result.path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch axis
    for n in (1, 64):  # neither is the export's batch of 2
        (got,) = session.run(["logits"], {"input": digits[:n].numpy()})
        assert_reproduces(got, logits(student, digits[:n]))

    # The reported difference is the one we measure ourselves on the checked batch.
    checked = digits[:CHECK_BATCH]
    (got,) = session.run(["logits"], {"input": checked.numpy()})
    ours = np.abs(got.astype(np.float64) - logits(student, checked).astype(np.float64)).max()
    assert result.max_abs_diff == pytest.approx(ours, rel=1e-6, abs=1e-12)
    assert 0 <= result.max_abs_diff <= export.RTOL * np.abs(logits(student, checked)).max()
    assert result.checked_with == f"onnxruntime {ort.__version__}"
    assert result.format == "onnx" and result.bytes == result.path.stat().st_size

    # One self-contained file with the student's weights only (no .data file, no teacher).
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.onnx.sha256"]
    # The exporter folds BatchNorm into the convolutions, so count rather than name: every
    # conv and linear weight is there, and no more than the student holds (convnet-s, the
    # teacher, has four times as many).
    stored = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    weights = [m.weight for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sum(w.numel() for w in weights) <= stored
    assert stored <= sum(t.numel() for t in student.state_dict().values())


def test_onnx_falls_back_to_the_torchscript_exporter(
    run, student, digits, tmp_path, monkeypatch
) -> None:
    needs_onnx_export()
    real = torch.onnx.export

    def no_torch_export(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("cannot capture this model\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torch_export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_student(run, "onnx", tmp_path / "legacy.onnx")
    assert not any("legacy TorchScript-based" in str(w.message) for w in caught)
    assert any("cannot capture this model" in n and "TorchScript-based" in n for n in result.notes)
    session = onnx_session(result.path)
    for n in (1, 64):
        (got,) = session.run(["logits"], {"input": digits[:n].numpy()})
        assert_reproduces(got, logits(student, digits[:n]))


def test_onnx_without_onnxruntime_is_written_unchecked(run, tmp_path, monkeypatch) -> None:
    needs_onnx_export()
    onnx = pytest.importorskip("onnx")
    hide_packages(monkeypatch, "onnxruntime")
    result = export_student(run, "onnx", tmp_path / "student.onnx")
    assert result.max_abs_diff is None and result.checked_with is None
    assert "not checked" in result.summary() and "pip install onnxruntime" in result.summary()
    onnx.checker.check_model(onnx.load(str(result.path)))


def test_torchscript_loads_back_and_matches_the_student(run, student, digits, tmp_path) -> None:
    with warnings.catch_warnings(record=True) as probe:
        warnings.simplefilter("always")
        torch.jit.trace(torch.nn.Identity(), torch.zeros(1))
    torch_warns = any("torch.jit" in str(w.message) for w in probe)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_student(run, "torchscript", tmp_path / "student.ts")
    # One note instead of a deprecation warning per torch.jit call.
    assert not any("torch.jit" in str(w.message) for w in caught)
    assert any("deprecated" in n for n in result.notes) == torch_warns

    loaded = jit_load(result.path)
    for n in (1, 64):
        assert_reproduces(logits(loaded, digits[:n]), logits(student, digits[:n]))
    ours = np.abs(logits(loaded, digits[:CHECK_BATCH]) - logits(student, digits[:CHECK_BATCH]))
    assert result.max_abs_diff == pytest.approx(float(ours.max()), abs=1e-12)
    assert result.checked_with == "torch.jit.load"


def test_safetensors_loads_into_a_fresh_model_with_identical_logits(
    run, student, digits, tmp_path
) -> None:
    st = pytest.importorskip("safetensors.torch")
    result = export_student(run, "safetensors", tmp_path / "student.safetensors")
    assert verify_checkpoint(result.path)  # with its .sha256 sidecar, like every checkpoint
    tensors = st.load_file(str(result.path))
    assert set(tensors) == set(student.state_dict())  # the student alone
    fresh = ConvNet(num_classes=10, in_channels=1, widths=(8, 16, 32))
    load_weights(fresh, result.path)  # strict, through smskd's own loader
    np.testing.assert_array_equal(logits(fresh.eval(), digits), logits(student, digits))
    assert result.max_abs_diff == 0.0 and result.checked_with.startswith("safetensors ")
    with open(result.path, "rb") as handle:  # the metadata names the model it fits
        header = handle.read(8 + int.from_bytes(handle.read(8), "little"))
    assert b"convnet-xs" in header


def test_summary_is_one_line(tmp_path) -> None:
    result = ExportResult(tmp_path / "s.onnx", "onnx", 40_631, 2.98e-7, "onnxruntime 1.32.0")
    line = result.summary()
    assert "\n" not in line
    assert line == (
        f"wrote {tmp_path / 's.onnx'} (onnx, 40.6 kB); onnxruntime 1.32.0 reproduces the "
        "student's logits (max abs diff 3e-07)"
    )
    unchecked = ExportResult(tmp_path / "s.onnx", "onnx", 12, None, None, ("no onnxruntime",))
    assert unchecked.summary().endswith("(onnx, 12 B); not checked; no onnxruntime")


def test_input_shape_exports_without_the_data(run, student, digits, tmp_path, monkeypatch) -> None:
    def no_data(*args, **kwargs):
        raise UserError("dataset 'digits': files are gone")

    monkeypatch.setattr(export, "prepare_data", no_data)
    with pytest.raises(UserError, match=r"files are gone.*--input-shape C,H,W"):
        export_student(run, "torchscript", tmp_path / "a.ts")
    result = export_student(run, "torchscript", tmp_path / "a.ts", input_shape=(1, 8, 8))
    assert result.max_abs_diff is not None
    loaded = jit_load(result.path)
    assert_reproduces(logits(loaded, digits), logits(student, digits))  # real inputs all the same
    with pytest.raises(UserError, match="does not fit"):  # 3 channels: the weights say 1
        export_student(run, "torchscript", tmp_path / "b.ts", input_shape=(3, 8, 8))
    with pytest.raises(UserError, match="three positive integers"):
        export_student(run, "torchscript", tmp_path / "b.ts", input_shape=(8, 8))
    assert not (tmp_path / "b.ts").exists()


# --------------------------------------------------------------------------- errors


def test_a_run_without_student_pt_has_not_finished(run, tmp_path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "config.yaml", unfinished / "config.yaml")
    with pytest.raises(UserError, match=r"no student\.pt: the run has not finished.*--resume"):
        export_student(unfinished, "torchscript", tmp_path / "s.ts")
    with pytest.raises(UserError, match="is a teacher run"):
        export_student(run / "teacher", "torchscript", tmp_path / "s.ts")


def test_a_directory_without_config_yaml_is_not_a_run(run, tmp_path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "student.pt", bare / "student.pt")
    with pytest.raises(UserError, match=r"no config\.yaml"):
        export_student(bare, "torchscript", tmp_path / "s.ts")
    with pytest.raises(UserError, match="does not exist"):
        export_student(tmp_path / "nowhere", "torchscript", tmp_path / "s.ts")
    with pytest.raises(UserError, match="give the run directory"):
        export_student(run / "student.pt", "torchscript", tmp_path / "s.ts")


def test_bad_format_and_out_are_user_errors(run, tmp_path) -> None:
    with pytest.raises(UserError, match="unknown export format 'tflite'; valid: 'onnx', "):
        export_student(run, "tflite", tmp_path / "s.tflite")
    with pytest.raises(UserError, match="onnx only"):
        export_student(run, "torchscript", tmp_path / "s.ts", opset=17)
    with pytest.raises(UserError, match="is a directory"):
        export_student(run, "torchscript", tmp_path)
    before = (run / "student.pt").read_bytes()
    with pytest.raises(UserError, match="overwrite the run's own files"):
        export_student(run, "torchscript", run / "student.pt")
    assert (run / "student.pt").read_bytes() == before


@pytest.mark.parametrize(
    ("fmt", "hidden", "hint"),
    [
        ("onnx", "onnxscript", "pip install 'smskd[onnx]'"),
        ("onnx", "onnx", "pip install 'smskd[onnx]'"),
        ("safetensors", "safetensors", "pip install safetensors"),
    ],
)
def test_a_missing_extra_names_the_install(run, tmp_path, monkeypatch, fmt, hidden, hint) -> None:
    hide_packages(monkeypatch, hidden)
    with pytest.raises(UserError, match=f"needs the {hidden} package: {re.escape(hint)}") as info:
        export_student(run, fmt, tmp_path / "s.out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s.out").exists()


# --------------------------------------------------------------------------- atomicity


def test_out_parent_is_created_and_no_temporary_file_is_left(run, tmp_path) -> None:
    out = tmp_path / "new" / "dir" / "student.ts"
    export_student(run, "torchscript", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.ts", "student.ts.sha256"]
    assert verify_checkpoint(out)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(
    run, tmp_path, monkeypatch, existing
) -> None:
    out = tmp_path / "student.ts"
    if existing:
        out.write_bytes(b"the previous export")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # after the bytes went in, before the rename
    with pytest.raises(UserError, match=r"cannot write .*No space left on device"):
        export_student(run, "torchscript", out)
    monkeypatch.undo()
    if existing:
        assert out.read_bytes() == b"the previous export"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["student.ts"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_file_that_fails_the_check_is_not_written(run, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export, "RTOL", -1.0)  # no difference can pass
    with pytest.raises(UserError, match=r"does not reproduce the student.*nothing was written"):
        export_student(run, "torchscript", tmp_path / "student.ts")
    assert list(tmp_path.iterdir()) == []
    result = export_student(run, "torchscript", tmp_path / "student.ts", check=False)
    assert result.max_abs_diff is None and "check turned off" in result.summary()
