"""One run from a :class:`~smskd.config.RunConfig`: data, models, teacher, run directory.

This is where the config becomes objects; :func:`smskd.train.stages.run_stages`
below it sees only models, stages and batches. A run directory holds
``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/`` and the final
weights (``student.pt``, or ``teacher.pt`` for a teacher run), each checkpoint
with its ``.sha256`` sidecar; ``.lock`` while a run is writing to it
(:mod:`smskd.store.runlock`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from smskd.config import (
    DataConfig,
    ModelSpec,
    RunConfig,
    TeacherConfig,
    load_config,
    read_stored_config,
    validate,
)
from smskd.data.augment import Augment
from smskd.data.download import download
from smskd.data.image_folder import ImageFolderSource
from smskd.data.memory import (
    ArraySplit,
    InMemoryLoader,
    check_batch_size,
    stratified_holdout,
    stratified_subset,
)
from smskd.data.registry import DATASETS, load_dataset
from smskd.data.text import TokenCorpus
from smskd.errors import UserError
from smskd.models.ensemble import LogitAverage
from smskd.models.registry import build_from_factory, build_model
from smskd.models.taps import ModelLayout
from smskd.store import rundir
from smskd.store.checkpoint import export_weights, load_state_dict, load_weights, move_checkpoint
from smskd.store.runlock import RunInUse, run_lock
from smskd.train import distributed
from smskd.train.epoch import evaluate
from smskd.train.output_cache import claim_cache_dir
from smskd.train.stages import RunResult, check_stages, resolve_device, run_stages

TEACHER_WEIGHTS = "teacher.pt"


PROBE_SIZE = 2048  # validation images the forgetting measures are taken on
# Validation windows of a text corpus the forgetting measures are taken on: each keeps
# a vocabulary-wide logit row per token and stage, so far fewer than images.
PROBE_WINDOWS = 32


@dataclass
class Data:
    """Batches for training, validation and testing, and what the models must fit.
    ``probe``: the fixed validation images the forgetting measures are taken on, in
    training-size batches (relation losses depend on the batch size)."""

    train: Iterable
    test: Iterable
    num_classes: int
    in_channels: int
    num_train: int
    val: Iterable | None = None
    probe: Iterable | None = None
    corpus: TokenCorpus | None = None  # a language model's text: tokenizer, characters


def prepare_data(
    cfg: DataConfig, seed: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> Data:
    """Loaders for ``cfg``: in-memory batches, or a per-image DataLoader for folders."""
    entry = DATASETS[cfg.name]
    root = cfg.root
    if cfg.download:
        if entry.download_root is None:
            raise UserError(f"dataset {cfg.name!r} cannot be downloaded; pass data.root")
        root = str(download(cfg.name, root or entry.download_root()))
    source = load_dataset(cfg.name, root, **cfg.options)
    augment = cfg.training_augment()
    if isinstance(source, ImageFolderSource):
        return _folder_loaders(cfg, source, augment, seed, rank, world_size)
    if isinstance(source, TokenCorpus):
        return _text_loaders(cfg, source, seed, device, rank, world_size)
    train_split, val_split = _held_out(cfg, source.train)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(train_split):
            left = " left after data.val_split" if val_split is not None else ""
            raise UserError(
                f"data.train_subset {cfg.train_subset} is larger than the {len(train_split)} "
                f"training images{left} of {cfg.name}; use at most {len(train_split)}, or "
                "drop it to train on them all"
            )
        train_split = stratified_subset(train_split, cfg.train_subset, seed=0)
    check_batch_size(cfg.batch_size, len(train_split))
    shards = {"rank": rank, "world_size": world_size}
    val = probe = None
    if val_split is not None:
        val = InMemoryLoader(
            val_split, source, cfg.eval_batch_size, shuffle=False, device=device, **shards
        )
        probe_split = stratified_subset(val_split, PROBE_SIZE, seed=cfg.val_seed)
        # Whole on every rank (rank 0 measures alone): the matrix must not depend on
        # how many processes train.
        probe = InMemoryLoader(
            probe_split,
            source,
            min(cfg.batch_size, len(probe_split)),
            shuffle=False,
            drop_last=True,
            device=device,
        )
    train = InMemoryLoader(
        train_split,
        source,
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        drop_last=True,
        device=device,
        augment=augment,
        **shards,
    )
    test = InMemoryLoader(
        source.test, source, cfg.eval_batch_size, shuffle=False, device=device, **shards
    )
    return Data(train, test, source.num_classes, source.in_channels, len(train_split), val, probe)


def _held_out(cfg: DataConfig, train: ArraySplit) -> tuple[ArraySplit, ArraySplit | None]:
    """The training images less ``cfg.val_split``, and the validation split itself."""
    size = cfg.validation_size(len(train))
    if not size:
        return train, None
    if size >= len(train):
        raise UserError(
            f"data.val_split {cfg.val_split} holds out {size} of the {len(train)} training "
            f"images of {cfg.name}, leaving none to train on; hold out fewer (e.g. 0.1)"
        )
    num_classes = len(train.labels.unique())
    if size < num_classes:
        raise UserError(
            f"data.val_split {cfg.val_split} holds out {size} images, fewer than the "
            f"{num_classes} classes of {cfg.name}; hold out at least {num_classes}"
        )
    val, rest = stratified_holdout(train, size, seed=cfg.val_seed)
    return rest, val


def _text_loaders(
    cfg: DataConfig,
    corpus: TokenCorpus,
    seed: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> Data:
    """Token windows of a corpus split by document: its own validation split, no
    augmentation, the probe the first validation windows."""
    for key, fix in (
        ("val_split", "the corpus has its own validation documents"),
        ("train_subset", "cap the training text with the option max_train_chars"),
        ("augment", "text has no augmentation"),
    ):
        if getattr(cfg, key) not in (None, False):
            raise UserError(f"data.{key} is for images: drop it ({fix})")
    check_batch_size(cfg.batch_size, len(corpus.train))
    shards = {"rank": rank, "world_size": world_size, "device": device}

    def split(name: str) -> InMemoryLoader:
        loader = InMemoryLoader(
            getattr(corpus, name), corpus, cfg.eval_batch_size, shuffle=False, **shards
        )
        loader.characters = corpus.characters[name]  # evaluate() adds bits per character
        return loader

    probe_split = ArraySplit(*(t[:PROBE_WINDOWS] for t in (corpus.val.images, corpus.val.labels)))
    return Data(
        train=InMemoryLoader(
            corpus.train, corpus, cfg.batch_size, shuffle=True, seed=seed, drop_last=True, **shards
        ),
        test=split("test"),
        num_classes=corpus.vocab_size,
        in_channels=corpus.in_channels,
        num_train=len(corpus.train),
        val=split("val"),
        probe=InMemoryLoader(
            probe_split, corpus, min(cfg.batch_size, len(probe_split)), False, device=device
        ),
        corpus=corpus,
    )


def _folder_loaders(
    cfg: DataConfig,
    source: ImageFolderSource,
    augment: Augment | None,
    seed: int,
    rank: int,
    world_size: int,
) -> Data:
    for key in ("train_subset", "val_split"):
        if getattr(cfg, key) is not None:
            raise UserError(f"data.{key} works for in-memory datasets; use in_memory: true")
    check_batch_size(cfg.batch_size, source.num_train)
    train_set = source.dataset("train", augment, seed)
    test_set: Dataset = source.dataset("val", None, seed)
    if world_size > 1:  # contiguous shards, each sample once: evaluation sums are exact
        base, extra = divmod(len(test_set), world_size)
        start = rank * base + min(rank, extra)
        test_set = Subset(test_set, range(start, start + base + (rank < extra)))
    # DistributedSampler also for one process: its set_epoch gives each epoch its order.
    sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed)
    workers = {"num_workers": cfg.num_workers, "persistent_workers": False}
    # As InMemoryLoader: a shard no larger than one batch keeps it, or no step would run.
    drop_last = len(sampler) > cfg.batch_size
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=drop_last, **workers)
    test = DataLoader(test_set, cfg.eval_batch_size, shuffle=False, **workers)
    return Data(train, test, source.num_classes, source.in_channels, len(train_set))


def make_model(spec: ModelSpec, data: Data) -> nn.Module:
    if spec.factory is not None:
        model = build_from_factory(spec.factory, data.num_classes, data.in_channels, spec.kwargs)
    else:
        if spec.name == "hf-pretrained" and isinstance(spec.kwargs.get("path"), str):
            check_tokenizer(Path(spec.kwargs["path"]), data, f"hf-pretrained {spec.kwargs['path']}")
        model = build_model(spec.name, data.num_classes, data.in_channels, spec.kwargs)
    if spec.taps is not None:
        # The config's taps win over the model's own defaults.
        model.tap_layout = ModelLayout(tuple(spec.taps.features), spec.taps.embedding)
    return model


@contextmanager
def _locked(out: Path, device: torch.device) -> Iterator[None]:
    """Rank 0 holds ``OUT/.lock`` for the block; if it is taken, every rank fails."""
    with ExitStack() as stack:
        refused: UserError | None = None
        if distributed.current().is_main:
            try:
                stack.enter_context(run_lock(out))
            except UserError as err:
                refused = err
        if distributed.any_rank(refused is not None, device):
            raise refused or RunInUse(f"{out} is in use by another run (see rank 0)")
        yield


def _prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Make ``out`` a run directory before anything is written into it (rundir.claim):
    refuse one that is not smskd's, and a finished or half-done run unless ``resume``
    or ``force``; ``force`` removes what smskd wrote there, nothing else.

    Called with ``OUT/.lock`` held (:func:`_locked`), so no other run is writing here.
    """
    rundir.claim(out, rundir.RUN, write=False)  # every rank checks; only rank 0 writes
    if (out / "config.yaml").exists() and not (resume or force):
        raise UserError(
            f"{out} already holds a run; pass --resume to continue it, --force to start "
            "over (it removes only the files smskd wrote), or choose another --out"
        )
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if distributed.current().is_main:
        if force:
            rundir.clear(out, rundir.RUN)
        rundir.claim(out, rundir.RUN)
    distributed.barrier()


def _claim_config(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Write the run's resolved config; on resume, insist it is the one already there."""
    saved = out / "config.yaml"
    if resume and saved.exists() and not _same_config(saved, cfg):
        raise UserError(
            f"{out} holds a run with a different config; pass --force to start over "
            "or choose another --out"
        )
    distributed.barrier()  # every rank has compared before rank 0 writes
    if distributed.current().is_main:
        saved.write_text(cfg.to_yaml())
    distributed.barrier()


def _same_config(saved: Path, cfg: RunConfig) -> bool:
    """Whether ``saved`` holds the run ``cfg`` describes, as the schema reads it: a run
    directory written before a key existed (it has the default) still resumes, and so
    does one written with other output-cache settings."""
    if saved.read_text() == cfg.to_yaml():
        return True
    try:
        return read_stored_config(saved).experiment_yaml() == cfg.experiment_yaml()
    except UserError:
        return False


def train_teacher(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    export_safetensors: bool = False,
    tracking_root: str | Path | None = None,
) -> RunResult:
    """Train ``cfg.teacher.model`` on labels alone; weights land in ``OUT/teacher.pt``
    (and ``OUT/teacher.safetensors`` with ``export_safetensors``). ``tracking_root``:
    where the default MLflow store lives (default ``out_dir``)."""
    if cfg.teacher is None:
        raise UserError("config has no 'teacher:' section to train")
    out = Path(out_dir)
    teacher_cfg = cfg.model_copy(
        update={"teacher": cfg.teacher.model_copy(update={"checkpoint": None})}
    )
    dist, device_name = distributed.setup(cfg.device)
    device = resolve_device(device_name)
    data = prepare_data(cfg.data, cfg.seed, device, dist.rank, dist.world_size)
    torch.manual_seed(cfg.seed)
    teacher = make_model(cfg.teacher.model, data)
    with _locked(out, device):
        _prepare_run_dir(out, resume, force)
        _claim_config(out, teacher_cfg, resume)
        result = run_stages(
            teacher,
            None,
            [cfg.teacher.training_stage()],
            data.train,
            data.test,
            val_data=data.val,
            seed=cfg.seed,
            device=device,
            out_dir=out,
            resume=resume,
            progress=progress,
            name="teacher",
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            nonfinite=cfg.nonfinite,
            performance=cfg.performance,
            **_tracking(teacher_cfg, tracking_root or out),
        )
        if dist.is_main:
            # Before teacher.pt exists: a teacher that has it counts as finished.
            export_language_model(result.student, data, out)
            move_checkpoint(out / "student.pt", out / TEACHER_WEIGHTS)
            if export_safetensors:
                export_weights(out / TEACHER_WEIGHTS, out / "teacher.safetensors")
        distributed.barrier()  # the other ranks load teacher.pt next
    return result


TeacherPlace = Callable[[RunConfig, int, TeacherConfig], tuple[RunConfig, Path]]
"""Where teacher ``j`` of a run trains, and the config that trains it: a naming policy."""


def own_teachers(out_dir: str | Path) -> TeacherPlace:
    """A run's own teachers, each trained by the run's config with that teacher alone:
    the teacher into ``OUT/teacher``, extra teachers into ``OUT/teacher-2``, ``-3``..."""

    def place(cfg: RunConfig, j: int, teacher: TeacherConfig) -> tuple[RunConfig, Path]:
        alone = cfg.model_copy(update={"teacher": teacher, "extra_teachers": []})
        return alone, Path(out_dir) / ("teacher" if j == 0 else f"teacher-{j + 1}")

    return place


def resolve_teachers(
    cfg: RunConfig,
    place: TeacherPlace,
    *,
    resume: bool,
    progress: bool,
    tracking_root: str | Path,
    log: Callable[[str], None] | None = None,
) -> RunConfig:
    """``cfg`` with every teacher's ``checkpoint`` filled. A teacher without one trains
    first, in the directory ``place`` gives it, unless ``resume`` finds its weights
    there (``log``, if given, hears of each teacher that trains)."""
    resolved = []
    for j, teacher in enumerate(cfg.all_teachers):
        if teacher.checkpoint is None:
            trainer, teacher_dir = place(cfg, j, teacher)
            weights = teacher_dir / TEACHER_WEIGHTS
            if not (resume and weights.exists()):
                if log is not None:
                    log(f"training teacher {teacher.model.label} into {teacher_dir}")
                train_teacher(
                    trainer,
                    teacher_dir,
                    resume=resume,
                    progress=progress,
                    tracking_root=tracking_root,
                )
            teacher = teacher.model_copy(update={"checkpoint": str(weights)})
        resolved.append(teacher)
    if not resolved:
        return cfg
    return cfg.model_copy(update={"teacher": resolved[0], "extra_teachers": resolved[1:]})


def _teacher_model(spec: TeacherConfig, data: Data) -> nn.Module:
    teacher = make_model(spec.model, data)
    if spec.checkpoint is not None:
        check_tokenizer(Path(spec.checkpoint).parent / rundir.HF_FOLDER, data, "the teacher")
        load_weights(teacher, spec.checkpoint, "teacher")
    return teacher


def _models(cfg: RunConfig, data: Data) -> tuple[nn.Module, list[nn.Module]]:
    """Student and teachers of ``cfg``, with the weights it names; a teacher still to
    be trained has its architecture, all the checks need."""
    torch.manual_seed(cfg.seed)
    student = make_model(cfg.student.model, data)
    if cfg.student.checkpoint is not None:
        where = Path(cfg.student.checkpoint).parent / rundir.HF_FOLDER
        check_tokenizer(where, data, "the student")
        load_weights(student, cfg.student.checkpoint, "student")
    return student, [_teacher_model(spec, data) for spec in cfg.all_teachers]


def check_tokenizer(folder: Path, data: Data, who: str) -> None:
    """A language model saved with its tokenizer (``folder/tokenizer.json``, as every
    smskd run and most save_pretrained folders have it) must read this run's tokens:
    an equal vocabulary size can hide other ids, and distillation would silently
    compare unrelated tokens."""
    saved = folder / "tokenizer.json"
    if data.corpus is None or not saved.is_file():
        return
    from tokenizers import Tokenizer

    try:
        theirs = Tokenizer.from_file(str(saved)).to_str()
    except Exception as err:  # the file is data: any way it fails to parse is one line
        raise UserError(f"{saved}: not a tokenizer file ({str(err).splitlines()[0]})") from None
    if theirs != data.corpus.tokenizer.to_str():
        raise UserError(
            f"{who} was trained with another tokenizer ({saved}) than this run's data "
            f"({data.corpus.name}); use the data options (tokenizer, vocab_size, text) it "
            "was trained with"
        )


def _stage_teacher(teachers: list[nn.Module]) -> nn.Module | None:
    """What the stages distil from: the teacher, or several teachers' LogitAverage."""
    if len(teachers) > 1:
        return LogitAverage(teachers)
    return teachers[0] if teachers else None


def _checked(
    cfg: RunConfig, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[Data, nn.Module, list[nn.Module]]:
    """Data and models of ``cfg``, built once, and everything about them that can be
    checked without training: data, models, checkpoints, every stage's taps and
    helper shapes."""
    data = prepare_data(cfg.data, cfg.seed, device, rank, world_size)
    student, teachers = _models(cfg, data)
    check_stages(
        student, _stage_teacher(teachers), cfg.stages, next(iter(data.train)), data.num_train
    )
    return data, student, teachers


def check_run(cfg: RunConfig) -> None:
    """Check ``cfg`` as :func:`distill` does before it trains anything, on the CPU."""
    _checked(cfg, torch.device("cpu"))


def distill(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    name: str = "student",
    export_safetensors: bool = False,
    tracking_root: str | Path | None = None,
) -> RunResult:
    """Run ``cfg.stages`` into ``out_dir`` (training the teacher first if none is given).

    ``OUT/.lock`` is held throughout: a second run into ``out_dir`` is refused.
    With ``export_safetensors``, the weights are also written as ``student.safetensors``.
    ``tracking_root``: where the default MLflow store lives (default ``out_dir``; a
    sweep passes its own directory, so its runs share one store).
    """
    out = Path(out_dir)
    tracking_root = tracking_root or out
    dist, device_name = distributed.setup(cfg.device)
    if cfg.sync_batchnorm and dist.enabled and not device_name.startswith("cuda"):
        raise UserError("sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only)")
    device = resolve_device(device_name)
    # Checked before anything trains, a teacher to be trained too: its architecture is
    # all the checks need, and its weights are loaded once it has them.
    data, student, teachers = _checked(cfg, device, dist.rank, dist.world_size)
    if cfg.performance.cache_teacher and cfg.performance.cache_dir is not None:
        claim_cache_dir(Path(cfg.performance.cache_dir), write=False)
    with _locked(out, device):
        _prepare_run_dir(out, resume, force)
        planned = cfg.all_teachers
        cfg = resolve_teachers(
            cfg, own_teachers(out), resume=resume, progress=progress, tracking_root=tracking_root
        )
        for module, before, after in zip(teachers, planned, cfg.all_teachers, strict=True):
            if before.checkpoint is None:
                load_weights(module, after.checkpoint, "teacher")
        _claim_config(out, cfg, resume)
        if cfg.sync_batchnorm and dist.enabled:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        result = run_stages(
            student,
            _stage_teacher(teachers),
            cfg.stages,
            data.train,
            data.test,
            reference=cfg.reference,
            val_data=data.val,
            probe_data=data.probe,
            schedule_across_stages=cfg.schedule_across_stages,
            continues=(cfg.continues.stages, cfg.continues.epochs) if cfg.continues else None,
            seed=cfg.seed,
            device=device,
            out_dir=out,
            resume=resume,
            progress=progress,
            name=name,
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            nonfinite=cfg.nonfinite,
            performance=cfg.performance,
            **_tracking(cfg, tracking_root),
        )
        if export_safetensors and dist.is_main:
            export_weights(out / "student.pt", out / "student.safetensors")
        if dist.is_main:
            export_language_model(result.student, data, out)
        distributed.barrier()
    return result


def export_language_model(model: nn.Module, data: Data, out: Path) -> None:
    """A language model also goes to ``OUT/hf/`` as transformers' ``save_pretrained``
    writes it, with its tokenizer: it loads in plain transformers, no smskd needed."""
    if data.corpus is None or not hasattr(model, "save_pretrained"):
        return
    folder = out / rundir.HF_FOLDER
    folder.mkdir(exist_ok=True)
    # Written aside, then moved file by file (each move atomic): a kill leaves the files
    # of one export or the other, never a half-written one.
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf.", suffix=".tmp") as staging:
        model.save_pretrained(staging)
        data.corpus.tokenizer.save(str(Path(staging) / "tokenizer.json"))
        for name in rundir.HF_FILES:
            if (Path(staging) / name).is_file():
                os.replace(Path(staging) / name, folder / name)


def _tracking(cfg: RunConfig, root: str | Path) -> dict[str, Any]:
    """run_stages' tracking arguments: the config's, with the MLflow store resolved
    against ``root``, and the whole resolved config as hyper-parameters."""
    tracking = cfg.tracking
    if "mlflow" in tracking.backends:
        tracking = tracking.model_copy(update={"mlflow_uri": tracking.mlflow_store_uri(root)})
    return {"tracking": tracking, "hparams": cfg.model_dump(mode="json")}


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset_name: str | None = None,
    model_name: str | None = None,
    root: str | None = None,
    device: str = "auto",
    *,
    trust_code: bool = False,
) -> dict[str, float]:
    """Test accuracy of saved weights; model and data default to the run's config.yaml.

    That config is data (the run may come from someone else): nothing it names is
    imported unless ``trust_code``, and it downloads nothing.
    """
    path = Path(checkpoint)
    weights = load_state_dict(path)  # first: a file that is no checkpoint says so at once
    saved = path.parent / "config.yaml"
    cfg = load_config(saved, trust_code=trust_code) if saved.exists() else None
    if model_name is None:
        if cfg is None:
            raise UserError(f"no config.yaml beside {path}; pass --model NAME")
        is_teacher = path.stem == "teacher" and cfg.teacher is not None  # .pt, .safetensors
        model_spec = cfg.teacher.model if is_teacher else cfg.student.model  # type: ignore[union-attr]
    else:
        model_spec = validate(ModelSpec, {"name": model_name}, "--model")
    if cfg is not None and dataset_name in (None, cfg.data.name):
        data_cfg = cfg.data.model_copy(update={"download": False, "root": root or cfg.data.root})
    else:
        data_cfg = validate(DataConfig, {"name": dataset_name or "digits", "root": root}, "--data")
    resolved = resolve_device(device)
    data = prepare_data(data_cfg, cfg.seed if cfg else 0, resolved)
    model = make_model(model_spec, data)
    load_weights(model, path, state=weights)
    return evaluate(model.to(resolved), data.test, resolved)
