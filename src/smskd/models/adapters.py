"""Models from outside the zoo: a user's factory function, torchvision, timm.

``factory: "package.module:function"`` is imported and called with the spec's
kwargs, plus ``num_classes`` / ``in_channels`` when its signature takes them and
the kwargs do not set them. ``torchvision/<arch>`` and ``timm/<arch>`` build those
libraries' architectures (random init: nothing is downloaded at run time) when the
library is installed; both are optional, never needed by smskd itself.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from smskd.errors import UserError

EXTERNAL_PREFIXES = ("torchvision/", "timm/")


def resolve_factory(reference: str) -> Callable[..., nn.Module]:
    """``"package.module:function"`` → the callable, or a UserError saying what is wrong."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"model factory {reference!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"model factory {reference!r}: cannot import {module_name!r} ({err}); is it "
            "installed, or on PYTHONPATH?"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"model factory {reference!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"model factory {reference!r} is not callable")
    return target


def call_builder(
    builder: Callable[..., nn.Module],
    what: str,
    num_classes: int,
    in_channels: int,
    kwargs: dict[str, Any],
) -> nn.Module:
    """Call ``builder`` with ``kwargs`` and the class/channel counts it accepts."""
    arguments = dict(kwargs)
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key not in arguments and (key in parameters or takes_any):
            arguments[key] = value
    try:
        model = builder(**arguments)
    except (TypeError, ValueError, IndexError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} cannot be built with kwargs {kwargs}: {detail}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{what} returned {type(model).__name__}, not an nn.Module")
    return model


def check_external(name: str) -> None:
    """Fail at config load, not after training, when torchvision/timm is missing."""
    library, _, arch = name.partition("/")
    if not arch:
        raise ValueError(f"model {name!r}: give an architecture after '{library}/'")
    try:
        importlib.import_module(library)
    except ImportError:
        raise ValueError(
            f"model {name!r} needs {library}, which is not installed (pip install {library}); "
            "or use a zoo model (`smskd models`)"
        ) from None


def build_external(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> nn.Module:
    try:
        check_external(name)
    except ValueError as err:
        raise UserError(str(err)) from None
    library, _, arch = name.partition("/")
    if library == "torchvision":
        import torchvision

        if in_channels != 3:
            raise UserError(f"model {name!r}: torchvision models take 3 input channels")
        builder = lambda **kw: torchvision.models.get_model(arch, **kw)  # noqa: E731
        return call_builder(
            builder,
            f"model {name!r}",
            num_classes,
            in_channels,
            {"weights": None, "num_classes": num_classes, **kwargs},
        )
    import timm

    builder = lambda **kw: timm.create_model(arch, **kw)  # noqa: E731
    return call_builder(
        builder,
        f"model {name!r}",
        num_classes,
        in_channels,
        {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels, **kwargs},
    )
