"""MobileNetV2 for 32×32 inputs, with a width multiplier.

Architecture: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018 (arXiv:1801.04381). The CIFAR adaptation is the one of the knowledge-distillation
benchmarks: RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020;
github.com/HobbitLong/RepDistiller, ``models/mobilenetv2.py``, taken from Route Constrained
Optimization) and mdistiller (``mdistiller/models/cifar/mobilenetv2.py``, identical):

- stem 3×3 conv stride 2 (32 → 16), then seven inverted-residual stages
  (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
  (6, 160, 3, 2), (6, 320, 1, 1): the second stage keeps stride 1 where ImageNet's has 2, so
  a 32×32 input ends at 2×2;
- channels ``int(c * width_mult)``; the last 1×1 conv has 1280 channels unless
  ``width_mult > 1`` (then ``int(1280 * width_mult)``);
- initialisation: conv weights N(0, 2 / (k·k·out_channels)), BN γ=1 β=0, linear N(0, 0.01)
  with zero bias.

The KD papers' "MobileNetV2" student on CIFAR-100 (CRD, mdistiller's DKD tables, and, as far
as can be told, SMSKD, which compares against them) is RepDistiller's ``mobile_half``:
``width_mult=0.5``, 0.81M parameters at 100 classes. Zoo name ``mobilenetv2-half`` is that
network; ``mobilenetv2`` is the same design at width 1.0 (2.35M).

Differences from RepDistiller: adaptive average pooling (RepDistiller's fixed
``AvgPool2d(input_size // 16)`` asserts ``input_size % 32 == 0``; at 32×32 both average the
same 2×2 map), any ``in_channels``, non-in-place ReLUs. Module names and parameter shapes
follow RepDistiller's, so its state dicts load unchanged.

Taps: ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` (16×16, 8×8, 4×4, 2×2 at 32×32:
RepDistiller's f1..f4) and ``classifier.0:input`` (the pooled 1280-d embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from smskd.models.taps import ModelLayout


def _builder(width_mult: float) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("width_mult", width_mult)
        return MobileNetV2(num_classes=num_classes, in_channels=in_channels, **kwargs)

    return build


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mobilenetv2": (
        _builder(1.0),
        "CIFAR MobileNetV2, width 1.0 (2.35M params at 100 classes); kwarg width_mult",
    ),
    "mobilenetv2-half": (
        _builder(0.5),
        "CIFAR MobileNetV2, width 0.5 = RepDistiller's mobile_half, the KD papers' 'MobileNetV2'",
    ),
}


# (expansion t, channels c, repeats n, first stride s), as in RepDistiller's CIFAR version.
_SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),  # None: the model's expand_ratio (6)
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1×1 expand → 3×3 depthwise → 1×1 linear projection; identity shortcut when the
    stride is 1 and the width is unchanged. ``conv`` indices as RepDistiller's (0..7)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (see the module docstring). ``width_mult`` scales every stage;
    ``expand_ratio`` is the inverted-residual expansion t of stages 2..7."""

    tap_layout = ModelLayout(
        features=("blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        embedding="classifier.0:input",
    )

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or int(16 * width_mult) < 1:
            raise ValueError(f"width_mult must be at least 1/16, got {width_mult}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be at least 1, got {expand_ratio}")
        width = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, width, 3, stride=2)
        stages: list[nn.Module] = []
        for t, c, n, s in _SETTING:
            c_out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(width, c_out, s if i == 0 else 1, t or expand_ratio))
                width = c_out
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(stages)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(width, self.last_channel, 1, stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(self.avgpool(x).flatten(1))
