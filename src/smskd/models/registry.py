"""Model names → builders. Builders take ``num_classes`` and ``in_channels``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from smskd.errors import UserError, choices
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


def build_model(
    name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid: {choices(MODELS)}")
    try:
        return MODELS[name].build(
            num_classes=num_classes, in_channels=in_channels, **(kwargs or {})
        )
    except (TypeError, ValueError, IndexError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"model {name!r} cannot be built with kwargs {kwargs or {}}: {detail}"
        ) from None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
