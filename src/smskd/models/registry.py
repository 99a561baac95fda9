"""Model names → builders. Builders take ``num_classes`` and ``in_channels``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from smskd.errors import UserError, choices
from smskd.models import (
    causal_lm,
    mobilenetv2,
    resnet_cifar,
    resnet_imagenet_style,
    shufflenet,
    vgg,
    wrn,
)
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


_SMALL: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "convnet-xs": (
        partial(ConvNet, widths=(8, 16, 32)),
        "3-stage CNN for 8×8/28×28, widths 8/16/32",
    ),
    "convnet-s": (partial(ConvNet, widths=(16, 32, 64)), "3-stage CNN for 8×8/28×28, 16/32/64"),
    "convnet-m": (partial(ConvNet, widths=(32, 64, 128)), "3-stage CNN for 8×8/28×28, 32/64/128"),
    "convnet-l": (partial(ConvNet, widths=(64, 128, 256)), "3-stage CNN for 8×8/28×28, 64/128/256"),
}

MODELS: dict[str, ModelEntry] = {
    name: ModelEntry(build, description)
    for zoo in (
        _SMALL,
        resnet_cifar.ZOO,
        wrn.ZOO,
        vgg.ZOO,
        mobilenetv2.ZOO,
        shufflenet.ZOO,
        resnet_imagenet_style.ZOO,
        causal_lm.ZOO,
    )
    for name, (build, description) in zoo.items()
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
    elif name in causal_lm.ZOO:
        causal_lm.check_available(name)


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


def listed_parameter_count(name: str, num_classes: int, in_channels: int) -> int | None:
    """``name``'s parameter count with default kwargs, for listings; None when it cannot be
    built so (``hf-pretrained`` needs a path; ``gpt2``/``llama`` need transformers)."""
    try:
        return parameter_count(build_model(name, num_classes, in_channels))
    except UserError:
        return None
