"""Typed, validated schema of a run: YAML ⇄ objects.

Every mistake is caught at load time and reported in one line that names the key
and, where there is a fixed set, the valid choices. The same classes are the
Python API: ``Stage(methods=["kd"], epochs=10)`` is validated as it is built.
"""

from __future__ import annotations

import difflib
import re
import stat
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NoReturn

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from smskd.errors import UserError, choices, quote

if TYPE_CHECKING:
    from smskd.data.augment import Augment


def _leaf_types(annotation: Any) -> set[Any]:
    """What a field's values, or its list's items, may be: ``list[int] | None`` → int, None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return {type(arg) for arg in args}
    if origin in (typing.Union, types.UnionType, list):
        return set().union(*map(_leaf_types, args))
    return {annotation}


def _switches_are_not_numbers(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Pydantic's lax mode reads true as 1 and 'yes' or 1 as true: here a number takes
    numbers and a switch takes true or false."""
    takes = _leaf_types(cls.model_fields[info.field_name].annotation)  # type: ignore[index]
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) and bool not in takes and takes & {int, float}:
            raise ValueError(f"expected a number, not {str(item).lower()}")
        if bool in takes and isinstance(item, (int, float, str)) and type(item) not in takes:
            raise ValueError(f"expected true or false, not {quote(item)}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    _switches = field_validator("*", mode="before")(_switches_are_not_numbers)


def _name_shorthand(value: Any) -> Any:
    """Let ``"kd"`` stand for ``{"name": "kd"}`` in YAML and in Python."""
    return {"name": value} if isinstance(value, str) else value


class MethodSpec(BaseModel):
    """One KD method in a stage: its registry name, loss weight β and its options.

    Options are the method's own keyword arguments (``temperature`` for ``kd``,
    ``student_layer`` for ``fitnets``...), checked against its signature.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str
    weight: float | None = Field(default=None, ge=0, description="β (default: the method's own)")

    _wrap = model_validator(mode="before")(_name_shorthand)
    _switches = field_validator("*", mode="before")(_switches_are_not_numbers)

    @model_validator(mode="after")
    def _check_method(self) -> MethodSpec:
        from smskd.methods.registry import validate_options

        self.__pydantic_extra__ = validate_options(self.name, self.options)
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = False


class ScheduleConfig(_Strict):
    """Per-epoch LR schedule of one stage (each stage starts a fresh one)."""

    name: Literal["constant", "cosine", "multistep"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(default=0.1, gt=0)

    _wrap = model_validator(mode="before")(_name_shorthand)


class Stage(_Strict):
    """One stage: its KD methods (summed), CE weight, epochs, optimizer and schedule.

    SMSKD has one method per stage; ``joint`` is one stage with several; ``scratch``
    is a stage with none. From the second stage on the previous stage's student is
    the frozen reference (see :class:`ReferenceConfig`).
    """

    name: str | None = Field(default=None, description="label in logs (default: method names)")
    methods: list[MethodSpec] = Field(default_factory=list)
    epochs: int = Field(gt=0)
    ce_weight: float = Field(default=1.0, ge=0, description="weight of the task loss CE(s, y)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _trains_something(self) -> Stage:
        names = [m.name for m in self.methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"method {repeated[0]!r} appears twice in one stage; give one entry (its "
                "weight scales it) or put the copies in separate stages"
            )
        if not self.methods and self.ce_weight == 0:
            raise ValueError("ce_weight is 0 and the stage has no methods: nothing to train")
        return self

    @property
    def label(self) -> str:
        return self.name or ("+".join(m.name for m in self.methods) or "ce")


class ReferenceConfig(_Strict):
    """Reference loss from stage 2 on (DESIGN.md §1; open choices in PAPER.md).

    ``w_i = λ·(1 − TCP_i)`` (``inverse_tcp``), ``λ·TCP_i`` (``tcp``), ``λ`` (``fixed``)
    or no reference term at all (``none``); ``TCP_i = softmax(t_i / tcp_temperature)[y_i]``
    (``tcp_temperature: tau`` ties it to ``temperature``). ``weight_scale: batch_mean``
    rescales each batch's weights to mean λ: TCP keeps the per-sample shape, and a
    confident teacher (TCP ≈ 1) no longer switches the reference off. ``snapshot``: the
    reference is the student at the previous stage's ``last`` epoch, or at its ``best``
    validation epoch (needs ``data.val_split``). ``anchor``: what the reference holds
    fixed, its logits, or its logits and its penultimate embedding (per sample, the
    mean squared difference of the embeddings is added to the logit term).
    """

    weighting: Literal["inverse_tcp", "tcp", "fixed", "none"] = "inverse_tcp"
    lam: float = Field(default=1.0, ge=0, description="λ, the weight's scale")
    temperature: float = Field(default=4.0, gt=0, description="τ of the reference KL")
    tcp_temperature: float | Literal["tau"] = Field(
        default=1.0, description="T of the TCP softmax; `tau`: the same as temperature"
    )
    weight_scale: Literal["raw", "batch_mean"] = Field(
        default="raw", description="`batch_mean`: w rescaled to mean λ in every batch"
    )
    snapshot: Literal["last", "best"] = Field(
        default="last", description="the previous stage's last or best-validation student"
    )
    anchor: Literal["logits", "logits+embedding"] = "logits"
    loss: Literal["kl", "mse_logits"] = Field(
        default="kl", description="τ²·KL(softmax(r/τ) ‖ softmax(s/τ)) or MSE of the logits"
    )

    @field_validator("tcp_temperature")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("must be greater than 0, or `tau`")
        return value

    @property
    def needs_teacher(self) -> bool:
        return self.weighting in ("inverse_tcp", "tcp")

    @property
    def tcp_softmax_temperature(self) -> float:
        return self.temperature if self.tcp_temperature == "tau" else self.tcp_temperature


def why_teacher_needed(
    stages: Sequence[Stage], reference: ReferenceConfig, continued: bool = False
) -> str | None:
    """Why ``stages`` with ``reference`` need a teacher, or None if they do not: the rule
    in one place, for a config (checked as it loads) and for ``run_stages``, which is
    given models and no config."""
    if any(stage.methods for stage in stages):
        return "its stages use KD methods"
    if (len(stages) > 1 or continued) and reference.needs_teacher:
        return f"reference.weighting {reference.weighting!r} reads the teacher's TCP"
    return None


def check_one_schedule(stages: Sequence[Stage]) -> None:
    """``schedule_across_stages: continue`` runs one optimizer setting and one LR
    schedule over every stage: the stages must agree on them."""
    first = stages[0]
    for k, stage in enumerate(stages[1:], 1):
        for key in ("optimizer", "schedule"):
            if getattr(stage, key) != getattr(first, key):
                raise ValueError(
                    f"schedule_across_stages: 'continue' runs one {key} over all stages, but "
                    f"stages.{k}.{key} differs from stages.0.{key}; make them equal or use "
                    "'restart'"
                )


class ContinuedRun(_Strict):
    """A run that goes on from an earlier staged run, whose end is ``student.checkpoint``:
    its first stage is stage ``stages + 1`` of that run and is anchored to that student
    (the reference), and every seed and data order continues after ``epochs`` epochs, so
    that the stages trained here are the ones the whole run would have trained."""

    stages: int = Field(gt=0, description="stages the earlier run had")
    epochs: int = Field(gt=0, description="student epochs the earlier run had")


class TapLayoutConfig(_Strict):
    """Default taps of a model that declares none: stage outputs and the embedding."""

    features: list[str] = Field(default_factory=list)
    embedding: str | None = None


class ModelSpec(_Strict):
    """A model: a zoo ``name`` (or ``torchvision/<arch>``, ``timm/<arch>``), or a
    ``factory: "package.module:function"``; ``kwargs`` go to its builder; ``taps``
    names its stage outputs for the feature methods' defaults."""

    name: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    taps: TapLayoutConfig | None = None

    _wrap = model_validator(mode="before")(_name_shorthand)

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> ModelSpec:
        from smskd.models.adapters import resolve_factory
        from smskd.models.registry import check_model_name

        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of 'name' (a zoo model) or 'factory'")
        if self.name is not None:
            check_model_name(self.name)
        elif (info.context or {}).get("import_code", True):
            try:
                resolve_factory(self.factory)
            except UserError as err:
                raise ValueError(str(err)) from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.factory or "?"


class AugmentConfig(_Strict):
    """Training augmentation: random crop after zero padding, random horizontal flip."""

    crop_padding: int = Field(default=4, ge=0)
    flip: bool = True


class DataConfig(_Strict):
    """The dataset and how batches are made.

    ``augment``: null = the dataset's default (crop+flip for CIFAR and image folders,
    none for digits and Fashion-MNIST), false = none, or an explicit setting.
    ``options`` go to the dataset's loader (``labels: coarse`` for cifar100; ``size``,
    ``channels``, ``in_memory`` for image-folder). ``val_split`` holds out a validation
    split from the training images: a count, or a fraction of them; class-stratified and
    fixed by ``val_seed`` alone, so every run and recipe that shares these keys holds out
    the same images. Everything chosen (best epoch, the reference snapshot ``best``, a
    sweep's tuned β) is chosen on it; the test split is only reported (DESIGN.md §6).
    ``train_subset`` then trains on a fixed, class-stratified subset of that many of the
    remaining training images (the test split is whole).
    """

    name: str = "digits"
    root: str | None = None
    batch_size: int = Field(default=64, gt=0)
    eval_batch_size: int = Field(default=512, gt=0)
    augment: AugmentConfig | bool | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    val_split: int | float | None = Field(
        default=None, gt=0, description="validation images held out of the training split"
    )
    val_seed: int = Field(default=0, ge=0, lt=2**32, description="which images val_split holds out")
    train_subset: int | None = Field(default=None, gt=0)
    download: bool = False
    num_workers: int = Field(default=2, ge=0)  # image-folder DataLoader workers

    _wrap = model_validator(mode="before")(_name_shorthand)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from smskd.data.registry import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {quote(name)}; valid: {choices(DATASETS)}")
        return name

    @field_validator("val_split")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not value < 1:
            raise ValueError(
                f"{value} is neither a count (a whole number) nor a fraction below 1; "
                "write e.g. 5000 or 0.1"
            )
        return value

    @model_validator(mode="after")
    def _known_options(self) -> DataConfig:
        from smskd.data.registry import check_options

        check_options(self.name, self.options)
        return self

    @property
    def is_text(self) -> bool:
        """Whether the dataset is token windows for language models."""
        from smskd.data.registry import DATASETS

        entry = DATASETS.get(self.name)
        return entry is not None and entry.sequences

    @property
    def has_validation(self) -> bool:
        """Whether runs get a validation split: ``val_split``, or the dataset's own."""
        from smskd.data.registry import DATASETS

        entry = DATASETS.get(self.name)
        return self.val_split is not None or (entry is not None and entry.own_validation)

    def validation_size(self, num_train: int) -> int:
        """How many of ``num_train`` training images ``val_split`` holds out (0: none)."""
        if self.val_split is None:
            return 0
        if isinstance(self.val_split, float):
            return max(1, round(self.val_split * num_train))
        return self.val_split

    def training_augment(self) -> Augment | None:
        """What training batches get: ``augment`` resolved against the dataset's default;
        None when they are not augmented at all."""
        from smskd.data.augment import Augment
        from smskd.data.registry import DATASETS

        default = DATASETS[self.name].augment
        if self.augment is None:
            chosen = default
        elif self.augment is False:
            chosen = None
        elif self.augment is True:
            chosen = default or Augment()
        else:
            chosen = Augment(self.augment.crop_padding, self.augment.flip)
        return None if chosen is None or chosen.is_identity else chosen


# The output cache's settings: how fast a run goes, never what it computes.
CACHE_SETTINGS = ("cache_teacher", "cache_max_gib", "cache_dir", "cache_disk_gib")


class PerformanceConfig(_Strict):
    """Speed switches. Each leaves the training maths unchanged up to rounding
    (tests hold every one against the plain fp32 path).

    ``precision``: the networks' forwards under autocast (``bf16``; ``fp16`` with a
    gradient scaler); losses stay fp32. ``channels_last``: NHWC weights and inputs
    (faster convolutions on GPUs and recent CPUs). ``compile``: ``torch.compile`` each
    stage's forwards (the first steps of every stage pay for compiling).
    ``cache_teacher``: the teacher's outputs on every training image are computed once
    and read from memory at every step instead of a teacher forward (bit for bit the
    same outputs). Without augmentation that is done once per stage (and, from stage 2,
    for the frozen reference's logits too). With crop/flip augmentation an image is
    one of a few dozen views (50 for padding 2 with flips), more than a run has epochs,
    so the outputs on every view are kept in ``cache_dir`` and shared by every run with
    the same teacher and training images: a sweep's runs, and several workers at once,
    compute them once together. It needs an in-memory dataset. A stage whose outputs
    (logits plus the features its methods tap) need more than ``cache_max_gib`` GiB of
    memory reads them from the files in ``cache_dir`` as the steps need them (memory-
    mapped) if they fit in ``cache_disk_gib`` GiB (FitNets' hint maps on every view),
    and otherwise runs the teacher as usual. None of these settings changes what a run
    computes, so a run may be resumed with them changed.
    """

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    cache_teacher: bool = False
    cache_max_gib: float = Field(default=4.0, gt=0)
    cache_dir: str | None = None
    cache_disk_gib: float = Field(default=0.0, ge=0)

    def without_cache(self) -> PerformanceConfig:
        """These switches with the cache's settings at their defaults: what a run
        computes is the same either way."""
        default = PerformanceConfig()
        return self.model_copy(update={key: getattr(default, key) for key in CACHE_SETTINGS})


class TrackingConfig(_Strict):
    """Where a run's numbers go besides ``metrics.jsonl``, ``metrics.csv`` and
    ``steps.csv``, which are always written.

    ``backends``: ``tensorboard`` (event files in ``RUN_DIR/tensorboard``) and/or
    ``mlflow`` (one MLflow run per training run). ``every_steps``: the per-step loss
    terms are averaged over this many steps per logged point (1 logs every step;
    one host synchronization per point). ``mlflow_uri``: the tracking store; by
    default ``$MLFLOW_TRACKING_URI``, else a local SQLite store ``mlflow.db`` in the
    outermost run directory (a sweep's runs share one). A bare list is shorthand:
    ``tracking: [tensorboard, mlflow]``.
    """

    backends: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    every_steps: int = Field(default=10, gt=0)
    mlflow_uri: str | None = None
    mlflow_experiment: str = Field(default="smskd", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, value: Any) -> Any:
        return {"backends": value} if isinstance(value, (list, tuple)) else value

    @field_validator("backends")
    @classmethod
    def _once_each(cls, backends: list[str]) -> list[str]:
        return list(dict.fromkeys(backends))

    def mlflow_store_uri(self, root: str | Path) -> str:
        """The MLflow store: the config's, else the environment's, else ``ROOT/mlflow.db``."""
        import os

        uri = self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


class TeacherConfig(_Strict):
    """The teacher: loaded from ``checkpoint``, or trained from scratch when it is null."""

    model: ModelSpec
    checkpoint: str | None = None
    epochs: int = Field(default=30, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    def training_stage(self) -> Stage:
        return Stage(
            name="teacher", epochs=self.epochs, optimizer=self.optimizer, schedule=self.schedule
        )


class StudentConfig(_Strict):
    """The student: initialized from ``checkpoint`` when given, else from scratch."""

    model: ModelSpec
    checkpoint: str | None = None


class RunConfig(_Strict):
    """A whole run: data, teacher, student, the stage list and the reference loss.

    ``extra_teachers`` makes the teacher an ensemble: the stages see the average of
    ``teacher``'s and their logits (the paper's multi-teacher baseline), so only
    response-based methods, which read logits alone, can use it.
    """

    seed: int = Field(default=0, ge=0, lt=2**32, description="seeds init, data order, augmentation")
    device: str = Field(default="auto", description="`auto` (CUDA if present), `cpu`, `cuda:1`…")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)
    student: StudentConfig
    stages: list[Stage] = Field(min_length=1)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    checkpoint_every_steps: int | None = Field(
        default=None,
        gt=0,
        description="a checkpoint every N steps too (one after every epoch is always written)",
    )
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="a NaN/Inf loss stops the run (naming stage, epoch, step) or skips the batch",
    )
    sync_batchnorm: bool = Field(
        default=False,
        description="under torchrun: BatchNorm statistics over the global batch (GPUs only)",
    )
    continues: ContinuedRun | None = Field(
        default=None, description="the run goes on from an earlier staged run's student"
    )
    schedule_across_stages: Literal["restart", "continue"] = Field(
        default="restart",
        description="a fresh optimizer and LR schedule per stage, or one schedule over all "
        "stages' epochs with the student's momentum carried",
    )
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        # What resolve_device and distributed.setup handle; torch knows more (meta, xpu…)
        # that fail only once training starts.
        if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", device):
            raise ValueError(
                f"unknown device {quote(device)}; valid: 'auto', 'cpu', 'cuda', 'cuda:N' "
                "(GPU number N), 'mps'"
            )
        return device

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> RunConfig:
        reason = why_teacher_needed(self.stages, self.reference, self.continues is not None)
        if self.teacher is None and reason is not None:
            raise ValueError(f"teacher: required because {reason}; add a 'teacher:' section")
        if self.extra_teachers:
            self._logit_methods_only()
        if self.performance.cache_teacher:
            self._cacheable()
        if self.continues is not None:
            if self.student.checkpoint is None:
                raise ValueError(
                    "continues: the run goes on from an earlier staged run's student; give "
                    "it as student.checkpoint"
                )
            if self.schedule_across_stages == "continue":
                raise ValueError(
                    "continues: one schedule over all stages needs the whole run's epochs; "
                    "use schedule_across_stages: restart"
                )
            if self.reference.snapshot == "best":
                raise ValueError(
                    "continues: the first stage is anchored to student.checkpoint, the "
                    "earlier run's last epoch; use reference.snapshot: last"
                )
        best = self.reference.snapshot == "best" and len(self.stages) > 1
        if best and not self.data.has_validation:
            raise ValueError(
                "reference.snapshot: 'best' takes the previous stage's best validation "
                "epoch; set data.val_split (e.g. 0.1) or use snapshot: last"
            )
        if self.schedule_across_stages == "continue":
            check_one_schedule(self.stages)
        return self

    def _cacheable(self) -> None:
        if self.performance.cache_disk_gib and self.performance.cache_dir is None:
            raise ValueError(
                "performance.cache_disk_gib: outputs read from disk live in "
                "performance.cache_dir; set it, or set cache_disk_gib: 0"
            )
        if self.data.training_augment() is not None and self.performance.cache_dir is None:
            raise ValueError(
                "performance.cache_teacher: the training images are augmented, so the "
                "teacher's outputs on every view of them are more than one run needs; set "
                "performance.cache_dir to a directory the runs with this teacher share, "
                "set data.augment: false, or turn the cache off"
            )
        if self.data.name == "image-folder" and not self.data.options.get("in_memory"):
            raise ValueError(
                "performance.cache_teacher needs an in-memory dataset; set "
                "data.options.in_memory: true or turn the cache off"
            )

    def _logit_methods_only(self) -> None:
        from smskd.methods.registry import METHODS

        if self.teacher is None:
            raise ValueError("extra_teachers: needs a 'teacher:' section to average with")
        for k, stage in enumerate(self.stages):
            for spec in stage.methods:
                if METHODS[spec.name].family != "response":
                    raise ValueError(
                        f"stages.{k}: method {spec.name!r} taps one teacher's layers, but "
                        "extra_teachers averages several teachers' logits; use a response-"
                        "based method (kd, dkd, dist, lskd) or drop extra_teachers"
                    )

    @property
    def all_teachers(self) -> list[TeacherConfig]:
        return [self.teacher, *self.extra_teachers] if self.teacher is not None else []

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)

    def experiment_yaml(self) -> str:
        """The YAML of what the run computes: without the output cache's settings, which
        change how fast it goes, never its numbers (a run resumes, and a sweep reuses a
        finished run, with them changed)."""
        return self.model_copy(update={"performance": self.performance.without_cache()}).to_yaml()


# --------------------------------------------------------------------------- loading


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] = (), *, trust_code: bool = True
) -> RunConfig:
    """Read a YAML file (or a dict), apply ``key.path=value`` overrides, validate.

    ``trust_code=False`` is for a config you did not write (a run directory you
    received, DESIGN.md §7): it is read without importing anything, and one that names
    code (a model ``factory``) is refused unless the user opts in (``--trust-code``).
    """
    if isinstance(source, dict):
        raw, where = source, "config"
    else:
        raw = read_yaml_mapping(source, "config file", "seed, data, stages, ...")
        where = str(source)
    for override in overrides:
        apply_override(raw, override)
    cfg = validate(RunConfig, raw, where, import_code=trust_code)
    _refuse_idle_reference(raw, cfg, where)
    if not trust_code:
        _refuse_code(cfg, where)
    return cfg


def read_stored_config(path: str | Path) -> RunConfig:
    """A run directory's ``config.yaml`` read to be compared, never built: validated
    without importing any code it names (the directory may come from someone else)."""
    raw = read_yaml_mapping(path, "config file", "seed, data, stages, ...")
    return validate(RunConfig, raw, str(path), import_code=False)


def _refuse_code(cfg: RunConfig, where: str) -> None:
    named = [m.factory for m in (cfg.student.model, *(t.model for t in cfg.all_teachers))]
    factories = [f for f in named if f is not None]
    if factories:
        raise UserError(
            f"{where} names code to import (factory {factories[0]!r}); a run directory you "
            "received is data, and smskd runs no code it names: pass --trust-code "
            "(trust_code=True) only if you trust where it came from"
        )


def _refuse_idle_reference(raw: dict[str, Any], cfg: RunConfig, where: str) -> None:
    """A ``reference:`` section in a one-stage config sets nothing (the reference acts from
    stage 2 on). Not a RunConfig check: recipes derive one-stage runs from multi-stage
    configs. ``weighting: none`` says what happens; a run directory's config.yaml lists
    every key, the reference its recipe was derived from included."""
    section = raw.get("reference")
    if len(cfg.stages) > 1 or not section or cfg.reference.weighting == "none":
        return
    if cfg.continues is not None:  # the one stage goes on from a staged run: it is anchored
        return
    if section != cfg.reference.model_dump(mode="json"):
        raise UserError(
            f"{where}: reference: the reference loss acts from stage 2 on and this config "
            "has one stage; remove the 'reference:' section or add a stage"
        )


def read_yaml_mapping(source: str | Path, what: str, keys: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; every failure is one UserError line."""
    path = Path(source)
    raw = parse_yaml(_read_text(path, what), str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys ({keys}) at the top")
    return raw


def validate(
    model: type[BaseModel], raw: Any, where: str = "config", *, import_code: bool = True
) -> Any:
    """``raw`` as ``model``, or one UserError line; ``import_code=False`` checks a model
    ``factory`` by its form only, importing nothing (a config that is data, not code)."""
    try:
        return model.model_validate(raw, context={"import_code": import_code})
    except ValidationError as err:
        raise UserError(f"{where}: {describe_error(model, err)}") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """``stages.*.epochs=2`` sets ``epochs`` in every stage; values are parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r} must look like key.path=value")
    value = parse_yaml(text, f"override {override!r}") if text else None
    parts = key.split(".")
    targets: list[Any] = [raw]
    for part in parts[:-1]:
        targets = [child for node in targets for child in _children(node, part, key)]
    for node in targets:
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"override {key!r}: {parts[-2]!r} holds a value, not a section")


def _children(node: Any, part: str, key: str) -> list[Any]:
    if isinstance(node, list):
        if part == "*":
            children = list(node)
        else:
            i = _index(node, part, key)
            node[i] = _name_shorthand(node[i])
            children = [node[i]]
    elif isinstance(node, dict):
        # Descending into a shorthand ("model: convnet-xs") expands it to {"name": ...}.
        node[part] = _name_shorthand(node.get(part, {}))
        children = [node[part]]
    else:
        raise UserError(f"override {key!r}: the parent of {part!r} holds a value, not a section")
    return children


def _index(node: list[Any], part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise UserError(f"override {key!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def describe_error(model: type[BaseModel], err: ValidationError) -> str:
    """The first error, as ``key.path: what is wrong (valid keys/choices)``."""
    errors = err.errors()
    # An unknown key explains more than the "missing" error it usually causes.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [p for p in first["loc"] if p not in ("function-after", "function-before")]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        fields = parent.model_fields if parent else {}
        close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
        guess = f"; did you mean {close[0]!r}" if close else ""
        valid = f"; valid keys: {choices(fields)}" if fields else ""
        return f"unknown key {quote(path)}{guess}{valid}"
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if kind in (
        "int_parsing",
        "float_parsing",
        "bool_parsing",
        "string_type",
        "list_type",
        "dict_type",
        "model_type",
        "int_from_float",
        "model_attributes_type",
        "literal_error",
    ):
        msg += f" (got {quote(first.get('input'))})"
    return f"{path}: {msg}"


def _model_at(model: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    """Walk the schema along ``loc`` to the model class that holds the last key."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else annotation
    return annotation


# --------------------------------------------------------------------------- YAML

# What one YAML text may cost (DESIGN.md §7), checked as it is read.
MAX_YAML_BYTES = 2**20
MAX_YAML_DEPTH = 100  # nested lists and mappings, aliases expanded
MAX_YAML_NODES = 100_000  # keys and values, aliases expanded: refuses "billion laughs"
_TOO_DEEP = f"nested deeper than {MAX_YAML_DEPTH} levels, aliases expanded (smskd's limit)"

_TAG = "tag:yaml.org,2002:"
_NULL, _MERGE = _TAG + "null", _TAG + "merge"
# YAML 1.2's core schema, where PyYAML reads 1.1: "on", "yes", "n" stay strings, 2:00 is
# not 120, 010 is ten; name → (pattern, first characters, conversion).
_CORE_SCALARS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "bool": ("true|True|TRUE|false|False|FALSE", "tTfF", lambda text: text.lower() == "true"),
    "int": (
        "[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+",
        "-+0123456789",
        lambda text: int(text, {"0o": 8, "0x": 16}.get(text[:2], 10)),
    ),
    "float": (
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
        "-+.0123456789",
        lambda text: float(text.lower().replace(".inf", "inf").replace(".nan", "nan")),
    ),
}


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as smskd reads every YAML it is given (config and sweep files, ``--set``
    values): YAML 1.2 core scalars, no key given twice in one mapping, and the limits
    above; every failure is one UserError line that starts with ``where``."""
    try:
        loader = _Loader(text, where)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from None


_SPECIAL_FILES = {
    "p": "a named pipe (FIFO)",
    "c": "a character device",
    "b": "a block device",
    "s": "a socket",
}


def _read_text(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, ValueError):  # ValueError: a NUL in the path
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise UserError(f"{what} {str(path)!r}: cannot read it ({err.strerror})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {str(path)!r} is a directory; give a YAML file")
    if not stat.S_ISREG(mode):
        # Never opened: reading a FIFO waits for a writer, a device may never end.
        kind = _SPECIAL_FILES.get(stat.filemode(mode)[0], "a special file")
        raise UserError(f"{what} {str(path)!r} is not a regular file but {kind}; give a YAML file")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise UserError(
                f"{what} {str(path)!r} is larger than {MAX_YAML_BYTES >> 20} MiB, smskd's "
                "limit for a YAML file"
            )
        return data.decode("utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader made to read YAML 1.2's core schema (no dates, no sets, no
    binary), to refuse a key given twice in one mapping (a ``<<`` merge is not a second
    time), and to measure every node as it is composed, aliases expanded, so that the
    limits hold before anything large is built."""

    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, re.Pattern[str]]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag in (_NULL, _MERGE)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    yaml_constructors: ClassVar[dict[Any, Any]] = {
        tag: construct
        for tag, construct in yaml.SafeLoader.yaml_constructors.items()
        if tag is None or tag in (_NULL, _TAG + "str", _TAG + "seq", _TAG + "map")
    }

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self._open = 0  # collections being composed around the current node
        self._size: dict[int, tuple[int, int]] = {}  # id(node) → (nodes, depth)
        self._flat: set[int] = set()  # ids of the mappings whose merges are resolved

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._size:
                self._refuse(event.start_mark, f"alias *{event.anchor} is inside its own anchor")
            return node
        # Composing recurses: stop before Python's stack does, with the limit's message.
        if self._open > MAX_YAML_DEPTH:
            self._refuse(event.start_mark, _TOO_DEEP)
        self._open += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode):
            self._size[id(node)] = (1, 0)
            return
        pairs = node.value if isinstance(node, yaml.MappingNode) else [node.value]
        sizes = [self._size[id(child)] for pair in pairs for child in pair]
        nodes = 1 + sum(n for n, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        if depth > MAX_YAML_DEPTH:
            self._refuse(node.start_mark, _TOO_DEEP)
        if nodes > MAX_YAML_NODES:
            self._refuse(
                node.start_mark,
                f"the value here is more than {MAX_YAML_NODES} nodes once aliases are "
                "expanded (smskd's limit, against alias bombs); use fewer nested aliases",
            )
        self._size[id(node)] = (nodes, depth)

    def _refuse(self, mark: yaml.Mark, problem: str) -> NoReturn:
        raise UserError(f"{self.where}: line {mark.line + 1}: {problem}")

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Resolve ``<<`` merges: a key written here overrides a merged one, and of two
        merged mappings the first wins. Not PyYAML's: 6.0.3 and later keep the merged
        value over the written one where a mapping with merges is merged in turn."""
        if id(node) in self._flat:
            return
        self._flat.add(id(node))
        written = [pair for pair in node.value if pair[0].tag != _MERGE]
        self._refuse_repeated_keys(written)
        pairs: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in merged:
                if not isinstance(source, yaml.MappingNode):
                    raise yaml.constructor.ConstructorError(
                        None, None, "'<<' merges a mapping or a list of them", source.start_mark
                    )
                self.flatten_mapping(source)
                for pair in source.value:
                    pairs.setdefault(self._key(pair[0]), pair)
        pairs.update((self._key(pair[0]), pair) for pair in written)
        node.value = list(pairs.values())

    def _key(self, node: yaml.Node) -> Any:
        return self.construct_object(node) if isinstance(node, yaml.ScalarNode) else id(node)

    def _refuse_repeated_keys(self, pairs: list[tuple[yaml.Node, yaml.Node]]) -> None:
        lines: dict[Any, int] = {}
        for key_node, _ in pairs:
            key, line = self._key(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise UserError(
                    f"{self.where}: key {quote(key)} appears twice, at lines {lines[key]} "
                    f"and {line}; keep one"
                )
            lines[key] = line


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back: it quotes a string that YAML 1.1 or 1.2
    would read as something else ("on", "1e3")."""


def _construct_core(loader: _Loader, node: yaml.Node) -> Any:
    name = node.tag.removeprefix(_TAG)
    pattern, _, convert = _CORE_SCALARS[name]
    text = loader.construct_scalar(node)  # type: ignore[arg-type]
    if not re.fullmatch(pattern, text):  # under an explicit tag: !!int abc
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a YAML 1.2 {name}", node.start_mark
        )
    return convert(text)


def _core_schema() -> None:
    for name, (pattern, first, _) in _CORE_SCALARS.items():
        _Loader.add_constructor(_TAG + name, _construct_core)
        for cls in (_Loader, _Dumper):
            cls.add_implicit_resolver(_TAG + name, re.compile(f"(?:{pattern})$"), list(first))


_core_schema()
