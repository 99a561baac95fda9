"""A finished run's student as one deployable file: ONNX, safetensors or TorchScript.

A run directory holds what training needs (``config.yaml``, ``student.pt``,
checkpoints, the teacher). Deployment needs the student alone, in eval mode, in a
format that runs without smskd: :func:`export_student` rebuilds the student from
the run's ``config.yaml`` and ``student.pt``, writes it in the chosen format and,
before the file is put in place, checks that the exported bytes reproduce the
PyTorch student's logits on real test images (at a batch size other than the one
it was exported with, so the batch axis is proven dynamic). A file that fails
the check is never written. The file is written like every checkpoint here
(:mod:`smskd.store.checkpoint`): to a temporary file beside ``out``, renamed over it,
with an ``OUT.sha256`` sidecar, so that a crash never leaves half a file.

* ``onnx``: the torch.export-based exporter (``pip install 'smskd[onnx]'``), one
  self-contained file (weights inside), input ``input`` (N×C×H×W, float32), output
  ``logits`` (N×classes), N dynamic; checked with onnxruntime when it is installed.
* ``torchscript``: ``torch.jit.trace``, for ``torch.jit.load`` (C++ libtorch, older
  PyTorch deployments); TorchScript is deprecated by PyTorch, so prefer ONNX.
* ``safetensors``: the student's ``state_dict`` (``pip install safetensors``), for
  PyTorch code that builds the model itself; the run's model spec is in its metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smskd.config import RunConfig, load_config
from smskd.errors import UserError, choices
from smskd.experiment import TEACHER_WEIGHTS, Data, make_model, prepare_data
from smskd.extras import require
from smskd.store.checkpoint import atomic_write_bytes, load_state_dict, load_weights

FORMATS = ("onnx", "safetensors", "torchscript")

# Exported at batch 2, checked at 32: torch.export specializes sizes 0 and 1, and a
# check at another size than the export's proves the batch axis really is dynamic.
EXPORT_BATCH = 2
CHECK_BATCH = 32

# Largest accepted max|exported − student| as a fraction of max|student logits|.
# float32 rounds at 1.2e-7; reordered sums and onnxruntime's fused kernels (BN folded
# into convs) measured 1e-7..1e-6 of the logit scale over the zoo (convnet, resnet,
# wrn, vgg, mobilenetv2, shufflenet). 1e-4 leaves 100× headroom for deeper nets and
# stays far below a real mistake: BN left in train mode moves the logits by ~0.5.
RTOL = 1e-4

_PACKAGES = {
    "onnx": (("onnx", "onnxscript"), "pip install 'smskd[onnx]'"),
    "safetensors": (
        ("safetensors",),
        "pip install safetensors (or pip install 'smskd[safetensors]')",
    ),
    "torchscript": ((), ""),
}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_student` wrote and how well it reproduces the student.

    ``max_abs_diff`` and ``checked_with`` are None when the file was not checked
    (``check=False``, or onnxruntime is missing); ``notes`` say why, and anything
    else worth knowing (a fallback exporter, a deprecated format).
    """

    path: Path
    format: str
    bytes: int
    max_abs_diff: float | None
    checked_with: str | None
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line for the CLI."""
        line = f"wrote {self.path} ({self.format}, {_size(self.bytes)})"
        if self.checked_with is not None and self.max_abs_diff is not None:
            line += (
                f"; {self.checked_with} reproduces the student's logits "
                f"(max abs diff {self.max_abs_diff:.2g})"
            )
        else:
            line += "; not checked"
        return "; ".join([line, *self.notes])


def export_student(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    check: bool = True,
    opset: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    trust_code: bool = False,
) -> ExportResult:
    """Write the student of the finished run ``run_dir`` to ``out`` as ``fmt``.

    The run's ``config.yaml`` is data: a model ``factory`` it names is imported only
    with ``trust_code`` (DESIGN.md §7).

    ``fmt`` is ``"onnx"``, ``"safetensors"`` or ``"torchscript"`` (see the module
    doc); ``opset`` is the ONNX opset (default: the exporter's). The student is
    built from ``RUN_DIR/config.yaml`` and loaded from ``RUN_DIR/student.pt``, in
    eval mode, on the CPU.

    Example inputs are the first test images of the run's dataset, loaded as the
    run loaded them (never downloaded). Where they cannot be loaded (e.g. the run
    was copied to a machine without the dataset) pass ``input_shape=(C, H, W)``:
    the data is then not read at all, the inputs are standard-normal noise of that
    shape (seeded; the scale of normalized images), and the number of classes is
    read from the size of the checkpoint's last tensor (the classifier's), which
    the strict load of ``student.pt`` then confirms.

    With ``check`` (the default) the exported bytes are loaded back (onnxruntime,
    ``torch.jit.load``, a fresh model from the config) and run on a batch of
    ``CHECK_BATCH`` inputs; a max abs difference from the student's logits over
    ``RTOL`` times their largest magnitude is a UserError, and nothing is written.
    Without onnxruntime an ONNX file is written unchecked, which the result says.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid: {choices(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError(f"an opset applies to --format onnx only, not {fmt!r}")
    _require_packages(fmt)
    run = Path(run_dir)
    config_path, weights = _run_files(run)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; give the file to write")
    if out.resolve() in (weights.resolve(), config_path.resolve()):
        raise UserError(f"--out {str(out)!r} would overwrite the run's own files; choose another")
    cfg = load_config(config_path, trust_code=trust_code)
    if input_shape is None:
        data, inputs = _test_data(cfg)
    else:
        data, inputs = _noise_data(weights, input_shape)
    model = _student(cfg, data, weights)
    reference = _logits(model, inputs, input_shape)

    blob, notes = _SERIALIZE[fmt](model, inputs[:EXPORT_BATCH], opset, cfg, data)
    diff, checked_with = None, None
    if not check:
        notes.append("check turned off")
    else:
        outcome = _CHECK[fmt](blob, inputs, lambda: make_model(cfg.student.model, data))
        if isinstance(outcome, str):  # a reason for skipping the check
            notes.append(outcome)
        else:
            checked_with, got = outcome
            diff = _compare(fmt, got, reference)
    try:
        atomic_write_bytes(blob, out)
    except OSError as err:
        raise UserError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return ExportResult(out, fmt, len(blob), diff, checked_with, tuple(notes))


# --------------------------------------------------------------------------- inputs


def _require_packages(fmt: str) -> None:
    modules, hint = _PACKAGES[fmt]
    require(modules, f"--format {fmt}", hint)


def _run_files(run: Path) -> tuple[Path, Path]:
    if not run.is_dir():
        if run.is_file():
            raise UserError(
                f"{str(run)!r} is a file; give the run directory (with config.yaml and student.pt)"
            )
        raise UserError(f"run directory {str(run)!r} does not exist")
    config_path, weights = run / "config.yaml", run / "student.pt"
    if not config_path.is_file():
        raise UserError(
            f"{str(run)!r} holds no config.yaml, so it is not a run directory; give the --out "
            "directory of smskd distill"
        )
    if not os.path.lexists(weights):  # anything else there: safe_load says what it is
        if (run / TEACHER_WEIGHTS).is_file():
            raise UserError(
                f"{str(run)!r} is a teacher run (teacher.pt, no student.pt); export exports a "
                "distill run's student"
            )
        raise UserError(
            f"{str(run)!r} has no student.pt: the run has not finished (still running, or "
            f"stopped); finish it with smskd distill CONFIG --out {run} --resume"
        )
    return config_path, weights


def _test_data(cfg: RunConfig) -> tuple[Data, Tensor]:
    # No download (an example batch is not worth a dataset fetch) and no loader
    # workers (one batch does not repay starting them).
    data_cfg = cfg.data.model_copy(update={"download": False, "num_workers": 0})
    try:
        data = prepare_data(data_cfg, cfg.seed, torch.device("cpu"))
        inputs = _first_inputs(data.test, CHECK_BATCH)
    except (UserError, OSError) as err:
        raise UserError(
            f"cannot load the run's test data for example inputs ({_first_line(err)}); pass "
            "--input-shape C,H,W to export with random inputs of that shape instead"
        ) from None
    return data, inputs


def _first_inputs(batches: Iterable[Any], n: int) -> Tensor:
    """The first ``n`` inputs of ``batches``, samples repeated if the split is smaller."""
    taken: list[Tensor] = []
    count = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        taken.append(x)
        count += len(x)
        if count >= n:
            break
    if count == 0:
        raise UserError("the test split is empty")
    pool = torch.cat(taken)
    return pool[torch.arange(n) % len(pool)].contiguous()


def _noise_data(weights: Path, input_shape: tuple[int, int, int]) -> tuple[Data, Tensor]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"input shape must be C,H,W (three positive integers), got {shape}")
    state = load_state_dict(weights)
    last = next((v for v in reversed(state.values()) if v.ndim in (1, 2)), None)
    if last is None:
        raise UserError(f"cannot tell the number of classes from {str(weights)!r}")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(CHECK_BATCH, *shape, generator=generator)
    return Data((), (), int(last.shape[0]), shape[0], 0), inputs


def _student(cfg: RunConfig, data: Data, weights: Path) -> nn.Module:
    model = make_model(cfg.student.model, data)
    load_weights(model, weights, "student")
    return model.eval().requires_grad_(False)


def _logits(model: nn.Module, inputs: Tensor, input_shape: tuple[int, int, int] | None) -> Tensor:
    try:
        with torch.no_grad():
            logits = model(inputs)
    except RuntimeError as err:
        if input_shape is None:
            raise  # it trained on these inputs: a failure here is a bug, keep the traceback
        raise UserError(
            f"the student does not accept inputs of shape {tuple(input_shape)}: {_first_line(err)}"
        ) from None
    if not isinstance(logits, Tensor):
        raise UserError(f"the student returns {type(logits).__name__}, not a logits tensor")
    if not torch.isfinite(logits).all():
        raise UserError("the student's logits are not finite (NaN/Inf weights); nothing to export")
    return logits


# --------------------------------------------------------------------------- writers

Serializer = Callable[[nn.Module, Tensor, int | None, RunConfig, Data], tuple[bytes, list[str]]]


@contextmanager
def _warnings_dropped(drop: Callable[[warnings.WarningMessage], bool]) -> Iterator[list[str]]:
    """Hold back the warnings ``drop`` accepts (their texts go into the yielded list);
    the others are issued again, as they would have been."""
    dropped: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield dropped
    finally:
        for w in caught:
            if drop(w):
                dropped.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _is_jit_deprecation(w: warnings.WarningMessage) -> bool:
    return issubclass(w.category, DeprecationWarning) and "torch.jit" in str(w.message)


def _onnx_noise(w: warnings.WarningMessage) -> bool:
    # torch's own pytree deprecation, raised inside torch.export: nothing a user can act on.
    # The legacy exporter's deprecation is dropped too: it is used knowingly (see notes).
    text = str(w.message)
    return (issubclass(w.category, FutureWarning) and "LeafSpec" in text) or (
        issubclass(w.category, DeprecationWarning) and "legacy TorchScript-based ONNX" in text
    )


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_bytes(
    model: nn.Module, example: Tensor, opset: int | None, cfg: RunConfig, data: Data
) -> tuple[bytes, list[str]]:
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    # The exporter logs one line per torchvision op it cannot register when torchvision
    # is absent: irrelevant to these models, and four lines of noise per export.
    with (
        _quiet_logger("torch.onnx._internal.exporter._registration"),
        _warnings_dropped(_onnx_noise),
    ):
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
                **names,
            )
            # Serialized in memory, weights inside: program.save() would default to a
            # second NAME.data file, named after the temporary file it is written to.
            return program.model_proto.SerializeToString(), []
        except Exception as err:  # torch.export raises many types; the fallback decides
            reason = _first_line(err)
        # Every zoo model exports with torch.export; a factory or external model with
        # data-dependent Python control flow may not, and the TorchScript-based exporter
        # (deprecated, but traced, so it takes any one path) may still do; the check
        # then tells whether that path is the right one.
        buffer = io.BytesIO()
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,
            )
        except Exception as err:
            raise UserError(
                f"the student cannot be exported to ONNX: torch.export: {reason}; the "
                f"TorchScript-based exporter: {_first_line(err)}; try --format torchscript "
                "or safetensors"
            ) from None
    return buffer.getvalue(), [
        f"torch.export could not capture the student ({reason}); used the TorchScript-based "
        "ONNX exporter"
    ]


def _torchscript_bytes(
    model: nn.Module, example: Tensor, opset: int | None, cfg: RunConfig, data: Data
) -> tuple[bytes, list[str]]:
    # trace, not script: it takes any model whose forward runs (script refuses much
    # third-party code), and for these CNNs the trace keeps the batch axis dynamic (the
    # check runs another batch size). check_trace=False: the check below does it better.
    buffer = io.BytesIO()
    with _warnings_dropped(_is_jit_deprecation) as deprecations:
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, buffer)
    notes = []
    if deprecations:  # one line in the result, not one warning per torch.jit call
        notes.append(f"TorchScript is deprecated in PyTorch {torch.__version__}; prefer onnx")
    return buffer.getvalue(), notes


def _safetensors_bytes(
    model: nn.Module, example: Tensor, opset: int | None, cfg: RunConfig, data: Data
) -> tuple[bytes, list[str]]:
    import safetensors.torch

    # Own contiguous copies: safetensors refuses tensors that share memory (tied weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # Weights alone do not say which model they fit: the metadata does.
    metadata = {
        "format": "pt",
        "smskd.student": json.dumps(cfg.student.model.model_dump(mode="json")),
        "smskd.num_classes": str(data.num_classes),
        "smskd.in_channels": str(data.in_channels),
    }
    return safetensors.torch.save(tensors, metadata=metadata), []


_SERIALIZE: dict[str, Serializer] = {
    "onnx": _onnx_bytes,
    "torchscript": _torchscript_bytes,
    "safetensors": _safetensors_bytes,
}


# --------------------------------------------------------------------------- checks

# Each check runs the exported bytes on ``inputs``: (what ran them, logits), or why
# it could not.
Check = Callable[[bytes, Tensor, Callable[[], nn.Module]], tuple[str, Tensor] | str]


def _check_onnx(
    blob: bytes, inputs: Tensor, fresh: Callable[[], nn.Module]
) -> tuple[str, Tensor] | str:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime)"
    try:
        import onnxruntime
    except ImportError as err:
        return f"onnxruntime cannot be imported ({_first_line(err)})"
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph-optimizer notes are not for users
    try:
        session = onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"input": inputs.numpy()})
    except Exception as err:  # onnxruntime's own exception types, not importable by name
        raise UserError(
            f"onnxruntime cannot run the exported file on a batch of {len(inputs)}: "
            f"{_first_line(err)}"
        ) from None
    return f"onnxruntime {onnxruntime.__version__}", torch.from_numpy(logits)


def _check_torchscript(
    blob: bytes, inputs: Tensor, fresh: Callable[[], nn.Module]
) -> tuple[str, Tensor]:
    with _warnings_dropped(_is_jit_deprecation), torch.no_grad():
        loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        logits = loaded(inputs)
    return "torch.jit.load", logits


def _check_safetensors(
    blob: bytes, inputs: Tensor, fresh: Callable[[], nn.Module]
) -> tuple[str, Tensor]:
    import safetensors.torch

    model = fresh()
    model.load_state_dict(safetensors.torch.load(blob))  # strict: every key, every shape
    with torch.no_grad():
        logits = model.eval()(inputs)
    return f"safetensors {importlib.metadata.version('safetensors')}", logits


_CHECK: dict[str, Check] = {
    "onnx": _check_onnx,
    "torchscript": _check_torchscript,
    "safetensors": _check_safetensors,
}


def _compare(fmt: str, got: Tensor, reference: Tensor) -> float:
    if got.shape != reference.shape:
        raise UserError(
            f"the {fmt} file gives logits of shape {tuple(got.shape)} for a batch of "
            f"{len(reference)}, the student {tuple(reference.shape)}; nothing was written"
        )
    diff = (got.double() - reference.double()).abs().max().item()
    tolerance = RTOL * reference.abs().max().item()
    if not diff <= tolerance:  # `not <=`: a NaN difference fails too
        raise UserError(
            f"the {fmt} file does not reproduce the student: max abs diff {diff:.3g} of logits "
            f"up to {reference.abs().max().item():.3g} (tolerance {tolerance:.3g}); nothing "
            "was written"
        )
    return diff


# --------------------------------------------------------------------------- helpers


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
