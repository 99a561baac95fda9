"""Typed, validated schema of a run: YAML ⇄ objects.

Every mistake is caught at load time and reported in one line that names the key
and, where there is a fixed set, the valid choices. The same classes are the
Python API: ``Stage(methods=["kd"], epochs=10)`` is validated as it is built.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from smskd.errors import UserError, choices

if TYPE_CHECKING:
    from smskd.data.augment import Augment


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    or no reference term at all (``none``); ``TCP_i = softmax(t_i / tcp_temperature)[y_i]``.
    """

    weighting: Literal["inverse_tcp", "tcp", "fixed", "none"] = "inverse_tcp"
    lam: float = Field(default=1.0, ge=0, description="λ, the weight's scale")
    temperature: float = Field(default=4.0, gt=0, description="τ of the reference KL")
    tcp_temperature: float = Field(default=1.0, gt=0)
    loss: Literal["kl", "mse_logits"] = Field(
        default="kl", description="τ²·KL(softmax(r/τ) ‖ softmax(s/τ)) or MSE of the logits"
    )

    @property
    def needs_teacher(self) -> bool:
        return self.weighting in ("inverse_tcp", "tcp")


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
    def _known(self) -> ModelSpec:
        from smskd.models.adapters import resolve_factory
        from smskd.models.registry import check_model_name

        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of 'name' (a zoo model) or 'factory'")
        if self.name is not None:
            check_model_name(self.name)
        else:
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
    ``channels``, ``in_memory`` for image-folder). ``train_subset`` trains on a fixed,
    class-stratified subset of that many training images (the test split is whole).
    """

    name: str = "digits"
    root: str | None = None
    batch_size: int = Field(default=64, gt=0)
    eval_batch_size: int = Field(default=512, gt=0)
    augment: AugmentConfig | bool | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_subset: int | None = Field(default=None, gt=0)
    download: bool = False
    num_workers: int = Field(default=2, ge=0)  # image-folder DataLoader workers

    _wrap = model_validator(mode="before")(_name_shorthand)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from smskd.data.registry import DATASETS

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid: {choices(DATASETS)}")
        return name

    @model_validator(mode="after")
    def _known_options(self) -> DataConfig:
        from smskd.data.registry import check_options

        check_options(self.name, self.options)
        return self

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


class PerformanceConfig(_Strict):
    """Speed switches. Each leaves the training maths unchanged up to rounding
    (tests hold every one against the plain fp32 path).

    ``precision``: the networks' forwards under autocast (``bf16``; ``fp16`` with a
    gradient scaler); losses stay fp32. ``channels_last``: NHWC weights and inputs
    (faster convolutions on GPUs and recent CPUs). ``compile``: ``torch.compile`` each
    stage's forwards (the first steps of every stage pay for compiling).
    ``cache_teacher``: without augmentation a training image is the same every epoch,
    so the teacher's outputs (and, from stage 2, the frozen reference's logits) are
    computed once per stage and read from memory afterwards; it needs an in-memory
    dataset and ``augment`` off, and holds at most ``cache_max_gib`` GiB.
    """

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    cache_teacher: bool = False
    cache_max_gib: float = Field(default=4.0, gt=0)


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
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> RunConfig:
        uses_methods = any(stage.methods for stage in self.stages)
        needs_tcp = len(self.stages) > 1 and self.reference.needs_teacher
        if self.teacher is None and (uses_methods or needs_tcp):
            reason = (
                "its stages use KD methods"
                if uses_methods
                else (f"reference.weighting {self.reference.weighting!r} reads the teacher's TCP")
            )
            raise ValueError(f"teacher: required because {reason}; add a 'teacher:' section")
        if self.extra_teachers:
            self._logit_methods_only()
        if self.performance.cache_teacher:
            self._cacheable()
        return self

    def _cacheable(self) -> None:
        if self.data.training_augment() is not None:
            raise ValueError(
                "performance.cache_teacher: the training images are augmented, so the "
                "teacher sees a new image every epoch; set data.augment: false or turn "
                "the cache off"
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
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


def load_config(source: str | Path | dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or a dict), apply ``key.path=value`` overrides, validate."""
    if isinstance(source, dict):
        raw, where = source, "config"
    else:
        raw = read_yaml_mapping(source, "config file", "seed, data, stages, ...")
        where = str(source)
    for override in overrides:
        apply_override(raw, override)
    return validate(RunConfig, raw, where)


def read_yaml_mapping(source: str | Path, what: str, keys: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; every failure is one UserError line."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys ({keys}) at the top")
    return raw


def validate(model: type[BaseModel], raw: Any, where: str = "config") -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{where}: {describe_error(model, err)}") from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """``stages.*.epochs=2`` sets ``epochs`` in every stage; values are parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r} must look like key.path=value")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise UserError(f"override {override!r}: the value {text!r} is not valid YAML") from None
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
        valid = f"; valid keys: {choices(parent.model_fields)}" if parent else ""
        return f"unknown key {path!r}{valid}"
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
    ):
        msg += f" (got {first.get('input')!r})"
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
