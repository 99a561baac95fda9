"""Method names → classes, option checking, and construction for a stage."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from smskd.errors import UserError, choices
from smskd.methods.base import DistillMethod
from smskd.models.taps import ModelLayout, check_tap_name

# Name → class, filled by register_method: the built-ins as smskd.methods imports them.
METHODS: dict[str, type[DistillMethod]] = {}

FAMILIES = ("response", "feature", "relation")


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Make a :class:`DistillMethod` subclass usable by name, in ``Stage`` and in configs
    loaded in the same process (also as a decorator): every built-in method registers
    itself this way, and so can a user's.

    The class needs ``name``, ``family`` and ``citation`` class attributes and type
    hints on its constructor's options, which are checked like the built-ins' options.
    """
    if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
        raise UserError(f"register_method takes a DistillMethod subclass, not {cls!r}")
    missing = [a for a in ("name", "family", "citation") if not getattr(cls, a, None)]
    if missing:
        raise UserError(f"{cls.__name__} needs the class attribute(s) {', '.join(missing)}")
    if cls.family not in FAMILIES:
        raise UserError(f"{cls.__name__}.family must be one of {choices(FAMILIES)}")
    known = METHODS.get(cls.name)
    same = known is not None and (known.__module__, known.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )  # the same class defined again (a notebook cell run twice) replaces the old one
    if known is not None and not same:
        raise UserError(
            f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}; "
            "give your class another name"
        )
    try:
        _options_model(cls)
    except (NameError, KeyError, TypeError) as err:
        raise UserError(
            f"{cls.__name__}.__init__ needs a type hint on every option: {err}"
        ) from None
    METHODS[cls.name] = cls
    return cls


def _options_model(cls: type[DistillMethod]) -> Any:
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue  # nn.Module's own (*args, **kwargs) for a method without options
        # Tap arguments are filled from the model layout when not given.
        default = None if name in cls.tap_roles else param.default
        annotation = hints[name] | None if name in cls.tap_roles else hints[name]
        fields[name] = (annotation, ... if default is inspect.Parameter.empty else default)
    # strict: `temperature: true` must not pass as 1.0 (ints still pass as floats).
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    return create_model(f"{cls.__name__}Options", __config__=config, **fields)


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a method name and its keyword options; return them converted to their types."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {choices(METHODS)}")
    model = _options_model(METHODS[name])
    try:
        validated = model.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            valid = choices(model.model_fields) or "none"
            raise ValueError(
                f"method {name!r} has no option {key!r}; valid options: {valid}"
            ) from None
        raise ValueError(f"method {name!r} option {key!r}: {first['msg']}") from None
    return validated.model_dump(exclude_unset=True)


def build_method(
    name: str,
    options: dict[str, Any],
    student_layout: ModelLayout,
    teacher_layout: ModelLayout,
) -> DistillMethod:
    """Instantiate a method, filling unnamed tap arguments from the model layouts."""
    cls = METHODS[name]
    kwargs = dict(options)
    layouts = {"student": student_layout, "teacher": teacher_layout}
    for arg, (side, role) in cls.tap_roles.items():
        if kwargs.get(arg) is None:
            tap = layouts[side].role(role)
            if tap is None:
                raise UserError(
                    f"method {name!r} needs option {arg!r}: the {side} model declares no "
                    f"default for its {role!r} layer, so name one of its modules"
                )
            kwargs[arg] = tap
        for tap in [kwargs[arg]] if isinstance(kwargs[arg], str) else kwargs[arg]:
            check_tap_name(tap, f"method {name!r} option {arg!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise UserError(f"method {name!r}: {err}") from None


def describe_methods() -> list[dict[str, object]]:
    """Rows for ``smskd methods``."""
    rows = []
    for cls in METHODS.values():
        taps = ", ".join(f"{side} {role}" for side, role in cls.tap_roles.values()) or "logits"
        rows.append(
            {
                "name": cls.name,
                "family": cls.family,
                "citation": cls.citation,
                "taps": taps + (", sample index" if cls.needs_index else ""),
                "helpers": cls.helpers or "none",
                "default_weight": cls.default_weight,
            }
        )
    return rows
