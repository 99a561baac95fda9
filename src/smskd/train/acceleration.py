"""How the networks run: mixed precision, memory format and ``torch.compile``.

These change speed, not the objective: the forwards run under autocast in the
chosen precision, every loss is computed in fp32 on float32 copies of the outputs,
and fp16 scales the loss so that small gradients do not flush to zero.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smskd.config import PerformanceConfig
from smskd.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Acceleration:
    """The speed switches of :class:`~smskd.config.PerformanceConfig`, bound to a device."""

    device_type: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, cfg: PerformanceConfig | None, device: torch.device) -> Acceleration:
        cfg = cfg or PerformanceConfig()
        cuda = device.type == "cuda"
        if cfg.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise UserError("performance.precision bf16: this GPU lacks bfloat16; use fp16")
        return cls(device.type, cfg.precision, cfg.channels_last, cfg.compile)

    def autocast(self) -> AbstractContextManager:
        """Forwards in the chosen precision; a no-op for fp32."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.precision])

    def inputs(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: nn.Module) -> nn.Module:
        """Weights in the memory format the inputs will have (in place)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def compiled(self, model: nn.Module | None) -> nn.Module | None:
        """``torch.compile`` of ``model`` for this stage (it must hold the stage's taps
        already: hooks registered after compiling would not fire)."""
        if model is None or not self.compile:
            return model
        return torch.compile(model)  # type: ignore[return-value]

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 has fp32's exponent range and does not."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)


def as_float(value: Tensor | None) -> Tensor | None:
    """fp32 for the losses; free for what is fp32 already (the same tensor); None stays."""
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value
