"""Capture intermediate activations of any ``nn.Module`` with forward hooks.

A tap is a module name as ``model.named_modules()`` spells it (``"layer2"``,
``"features.3"``). ``"NAME:input"`` captures what goes *into* the module instead of
what comes out; ``"fc:input"`` is the pre-classifier embedding of most networks.
Models stay untouched: no ``is_feat`` flags, no rewritten ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from smskd.errors import UserError

INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class ModelLayout:
    """Default tap names of a model, so methods need no per-model configuration.

    ``features`` are the outputs of the model's stages, shallow to deep; ``embedding``
    is the vector the classifier reads. Transformers also name, per layer, shallow to
    deep, their ``attention`` probabilities and ``values``. Zoo models declare theirs as a class
    attribute ``tap_layout``; for any other model, :func:`layout_of` finds the
    embedding as the input of the last ``nn.Linear`` and leaves ``features`` empty
    (feature methods then ask the user to name the layers).
    """

    features: tuple[str, ...] = ()
    embedding: str | None = None
    attention: tuple[str, ...] = ()
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for tap in (*self.features, *self.attention, *self.values):
            check_tap_name(tap, "taps.features")
        if self.embedding is not None:
            check_tap_name(self.embedding, "taps.embedding")

    def role(self, role: str) -> str | list[str] | None:
        """Resolve a role (``hint``, ``embedding``, ``last_feature``, ``features``,
        ``last_attention``, ``last_values``) to taps."""
        if role == "embedding":
            return self.embedding
        if role in ("last_attention", "last_values"):
            per_layer = self.attention if role == "last_attention" else self.values
            return per_layer[-1] if per_layer else None
        if not self.features:
            return None
        if role == "features":
            return list(self.features)
        if role == "hint":
            # FitNets' hint is the teacher's middle layer (Romero et al. 2015, §3).
            return self.features[(len(self.features) - 1) // 2]
        if role == "last_feature":
            return self.features[-1]
        raise ValueError(f"unknown tap role {role!r}")


def layout_of(model: nn.Module) -> ModelLayout:
    declared = getattr(model, "tap_layout", None)
    if isinstance(declared, ModelLayout):
        return declared
    # Not the model itself (name ""): a bare nn.Linear has no embedding of its own.
    linears = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    embedding = f"{linears[-1]}{INPUT_SUFFIX}" if linears else None
    return ModelLayout(features=(), embedding=embedding)


def check_tap_name(tap: str, option: str) -> None:
    """Refuse a tap with an empty module name: ``named_modules`` calls the whole model
    ``""``, so ``""`` or ``":input"`` would silently tap the model's output or input."""
    if not split_tap(tap)[0]:
        raise UserError(
            f"{option}: {tap!r} names no module (an empty name would tap the whole model); "
            "give a module name as model.named_modules() spells it, e.g. 'layer3' or 'fc:input'"
        )


def split_tap(tap: str) -> tuple[str, bool]:
    """``"fc:input"`` → ``("fc", True)``; ``"layer1"`` → ``("layer1", False)``."""
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


@dataclass
class FeatureTaps:
    """Forward hooks on named modules; ``features`` holds the latest captures.

    Use as a context manager (or call :meth:`remove`) so the hooks do not outlive
    the stage: a ``deepcopy`` of a hooked model would copy the hooks too.
    """

    model: nn.Module
    taps: Iterable[str]
    role: str = "model"
    features: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        modules = dict(self.model.named_modules())
        self.taps = tuple(dict.fromkeys(self.taps))
        self._handles = []
        for tap in self.taps:
            name, want_input = split_tap(tap)
            if name not in modules:
                raise UserError(
                    f"{self.role} has no module named {name!r} to tap; "
                    f"some of its modules: {_sample_names(modules)}"
                )
            module = modules[name]
            if want_input:
                handle = module.register_forward_pre_hook(self._capture_input(tap))
            else:
                handle = module.register_forward_hook(self._capture_output(tap))
            self._handles.append(handle)

    def _capture_output(self, tap: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.features[tap] = output

        return hook

    def _capture_input(self, tap: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            self.features[tap] = inputs[0]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _sample_names(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = [n for n in modules if n]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
