"""Model names → builders. Builders take ``num_classes`` and ``in_channels``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from smskd.errors import UserError, choices
from smskd.models.adapters import (
    EXTERNAL_PREFIXES,
    build_external,
    call_builder,
    check_external,
    resolve_factory,
)
from smskd.models.convnet import ConvNet


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {
    "convnet-xs": ModelEntry(partial(ConvNet, widths=(8, 16, 32)), "3-stage CNN, widths 8/16/32"),
    "convnet-s": ModelEntry(partial(ConvNet, widths=(16, 32, 64)), "3-stage CNN, widths 16/32/64"),
    "convnet-m": ModelEntry(
        partial(ConvNet, widths=(32, 64, 128)), "3-stage CNN, widths 32/64/128"
    ),
    "convnet-l": ModelEntry(
        partial(ConvNet, widths=(64, 128, 256)), "3-stage CNN, widths 64/128/256"
    ),
}


def check_model_name(name: str) -> None:
    """Raise ValueError (for config validation) unless ``name`` can be built here."""
    if name.startswith(EXTERNAL_PREFIXES):
        check_external(name)
    elif name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid: {choices(MODELS)}, or torchvision/<arch>, "
            "timm/<arch>, or factory: 'package.module:function'"
        )


def build_model(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A zoo model, or ``torchvision/<arch>`` / ``timm/<arch>`` when installed."""
    if name.startswith(EXTERNAL_PREFIXES):
        return build_external(name, num_classes, in_channels, kwargs or {})
    try:
        check_model_name(name)
    except ValueError as err:
        raise UserError(str(err)) from None
    return call_builder(
        MODELS[name].build, f"model {name!r}", num_classes, in_channels, kwargs or {}
    )


def build_from_factory(
    factory: str, num_classes: int, in_channels: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    return call_builder(
        resolve_factory(factory),
        f"model factory {factory!r}",
        num_classes,
        in_channels,
        kwargs or {},
    )


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
