"""One run from a :class:`~smskd.config.RunConfig`: data, models, teacher, run directory.

This is where the config becomes objects; :func:`smskd.pipeline.run_stages`
below it sees only models, stages and batches. A run directory holds
``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/`` and the final
weights (``student.pt``, or ``teacher.pt`` for a teacher run).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smskd.checkpoint import load_weights
from smskd.config import ModelSpec, RunConfig, load_config, validate
from smskd.data.memory import ArrayDataset, InMemoryLoader
from smskd.data.registry import load_dataset
from smskd.engine import evaluate
from smskd.errors import UserError
from smskd.models.registry import build_from_factory, build_model
from smskd.pipeline import RunResult, check_stages, resolve_device, run_stages
from smskd.taps import ModelLayout

TEACHER_WEIGHTS = "teacher.pt"


@dataclass
class Data:
    dataset: ArrayDataset
    train: InMemoryLoader
    test: InMemoryLoader


def prepare_data(cfg: RunConfig, device: torch.device) -> Data:
    dataset = load_dataset(cfg.data.name, cfg.data.root)
    train = InMemoryLoader(
        dataset.train,
        dataset,
        cfg.data.batch_size,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
        device=device,
    )
    test = InMemoryLoader(
        dataset.test, dataset, cfg.data.eval_batch_size, shuffle=False, device=device
    )
    return Data(dataset, train, test)


def make_model(spec: ModelSpec, dataset: ArrayDataset) -> nn.Module:
    if spec.factory is not None:
        model = build_from_factory(
            spec.factory, dataset.num_classes, dataset.in_channels, spec.kwargs
        )
    else:
        model = build_model(spec.name, dataset.num_classes, dataset.in_channels, spec.kwargs)
    if spec.taps is not None:
        # The config's taps win over the model's own defaults.
        model.tap_layout = ModelLayout(tuple(spec.taps.features), spec.taps.embedding)
    return model


def _claim_run_dir(out: Path, cfg_yaml: str, resume: bool, force: bool) -> None:
    """Refuse to clobber another run; on resume, insist on the same config."""
    saved = out / "config.yaml"
    if saved.exists():
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it, --force to start "
                "over, or choose another --out"
            )
        elif saved.read_text() != cfg_yaml:
            raise UserError(
                f"{out} holds a run with a different config; pass --force to start over "
                "or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(cfg_yaml)


def train_teacher(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train ``cfg.teacher.model`` on labels alone; weights land in ``OUT/teacher.pt``."""
    if cfg.teacher is None:
        raise UserError("config has no 'teacher:' section to train")
    out = Path(out_dir)
    teacher_cfg = cfg.model_copy(
        update={"teacher": cfg.teacher.model_copy(update={"checkpoint": None})}
    )
    device = resolve_device(cfg.device)
    data = prepare_data(cfg, device)
    torch.manual_seed(cfg.seed)
    teacher = make_model(cfg.teacher.model, data.dataset)
    _claim_run_dir(out, teacher_cfg.to_yaml(), resume, force)
    result = run_stages(
        teacher,
        None,
        [cfg.teacher.training_stage()],
        data.train,
        data.test,
        seed=cfg.seed,
        device=device,
        out_dir=out,
        resume=resume,
        progress=progress,
        name="teacher",
    )
    (out / "student.pt").replace(out / TEACHER_WEIGHTS)
    return result


def resolve_teacher(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool, force: bool, progress: bool
) -> RunConfig:
    """Fill ``teacher.checkpoint``, training the teacher into ``OUT/teacher`` if needed."""
    if cfg.teacher is None or cfg.teacher.checkpoint is not None:
        return cfg
    teacher_dir = Path(out_dir) / "teacher"
    weights = teacher_dir / TEACHER_WEIGHTS
    if not (weights.exists() and resume):
        train_teacher(cfg, teacher_dir, resume=resume, force=force, progress=progress)
    return cfg.model_copy(
        update={"teacher": cfg.teacher.model_copy(update={"checkpoint": str(weights)})}
    )


def _models(cfg: RunConfig, dataset: ArrayDataset) -> tuple[nn.Module, nn.Module | None]:
    """Student and teacher of ``cfg``, with the weights it names (if they exist yet)."""
    torch.manual_seed(cfg.seed)
    student = make_model(cfg.student.model, dataset)
    if cfg.student.checkpoint is not None:
        load_weights(student, cfg.student.checkpoint, "student")
    teacher = None
    if cfg.teacher is not None:
        teacher = make_model(cfg.teacher.model, dataset)
        if cfg.teacher.checkpoint is not None:
            load_weights(teacher, cfg.teacher.checkpoint, "teacher")
    return student, teacher


def check_run(cfg: RunConfig) -> None:
    """Everything that can be checked without training, checked before any training:
    data, models, checkpoints, and every stage's taps and helper shapes."""
    data = prepare_data(cfg, torch.device("cpu"))
    student, teacher = _models(cfg, data.dataset)
    check_stages(student, teacher, cfg.stages, next(iter(data.train)), len(data.dataset.train))


def distill(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    name: str = "student",
) -> RunResult:
    """Run ``cfg.stages`` into ``out_dir`` (training the teacher first if none is given)."""
    out = Path(out_dir)
    check_run(cfg)
    if force and out.exists():
        shutil.rmtree(out)
    cfg = resolve_teacher(cfg, out, resume=resume, force=False, progress=progress)
    _claim_run_dir(out, cfg.to_yaml(), resume, force=False)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg, device)
    student, teacher = _models(cfg, data.dataset)
    return run_stages(
        student,
        teacher,
        cfg.stages,
        data.train,
        data.test,
        reference=cfg.reference,
        seed=cfg.seed,
        device=device,
        out_dir=out,
        resume=resume,
        progress=progress,
        name=name,
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset_name: str | None = None,
    model_name: str | None = None,
    root: str | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Test accuracy of saved weights; model and data default to the run's config.yaml."""
    path = Path(checkpoint)
    saved = path.parent / "config.yaml"
    cfg = load_config(saved) if saved.exists() else None
    if model_name is None:
        if cfg is None:
            raise UserError(f"no config.yaml beside {path}; pass --model NAME")
        is_teacher = path.name == TEACHER_WEIGHTS and cfg.teacher is not None
        model_spec = cfg.teacher.model if is_teacher else cfg.student.model  # type: ignore[union-attr]
    else:
        model_spec = validate(ModelSpec, {"name": model_name}, "--model")
    data_name = dataset_name or (cfg.data.name if cfg else "digits")
    if root is None and cfg is not None:
        root = cfg.data.root
    dataset = load_dataset(data_name, root)
    resolved = resolve_device(device)
    model = make_model(model_spec, dataset)
    load_weights(model, path)
    loader = InMemoryLoader(dataset.test, dataset, 512, shuffle=False, device=resolved)
    return evaluate(model.to(resolved), loader, resolved)
