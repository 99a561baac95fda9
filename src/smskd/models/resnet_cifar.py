"""CIFAR ResNets: the 6n+2-layer networks of He et al. (2016), "Deep Residual Learning
for Image Recognition", CVPR, §4.2, in the variant the distillation literature trains
(RepDistiller, Tian et al. 2020, ``models/resnet.py``; mdistiller's
``mdistiller/models/cifar/resnet.py`` is the same network).

A 3×3 conv-BN-ReLU stem, three stages of ``n = (depth - 2) / 6`` basic blocks at full,
½ and ¼ resolution, global average pooling and a linear classifier. Widths are
16/16/32/64 (stem/stages) for ``resnet8``…``resnet110`` and 32/64/128/256 for the
"×4" networks ``resnet8x4`` and ``resnet32x4``.

Facts kept from RepDistiller, so that its pretrained checkpoints load unchanged:
projection shortcuts (1×1 conv + BN, He et al.'s option B) wherever a block changes
stride or width — including the first block of ``layer1`` of the ×4 networks
(32 → 64) — instead of the zero-padding option A of the paper; bias-free convs;
Kaiming-normal (fan-out) conv init, BN weight 1 / bias 0, PyTorch's default init for
the classifier; parameter names ``conv1``, ``bn1``, ``layerK.i.{conv1,bn1,conv2,bn2,
downsample.0,downsample.1}``, ``fc``.

Differences from RepDistiller: no ``is_feat``/``preact`` forward flags (features come
from taps); every ReLU is a separate, non-in-place module and the residual sum is not
in place, so hooks see unmodified values; ``layerK.i.relu2:input`` is the block's
pre-activation (RepDistiller's ``preact`` features when ``i`` is the last block);
adaptive average pooling replaces ``AvgPool2d(8)`` so other input sizes work (same
result on 32×32 inputs); ``in_channels`` is configurable.

Taps: ``layer1``..``layer3`` (stage outputs after the final ReLU, 32×32 → 8×8 on
CIFAR), ``fc:input`` (the pooled embedding). The stem output is ``relu``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from smskd.models.taps import ModelLayout

_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _builder(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return CifarResNet(
            depth, widths, num_classes=num_classes, in_channels=in_channels, **kwargs
        )

    return build


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet8": (_builder(8, _NARROW), "CIFAR ResNet-8, 3×1 basic blocks, widths 16/32/64"),
    "resnet14": (_builder(14, _NARROW), "CIFAR ResNet-14, 3×2 basic blocks, widths 16/32/64"),
    "resnet20": (_builder(20, _NARROW), "CIFAR ResNet-20, 3×3 basic blocks, widths 16/32/64"),
    "resnet32": (_builder(32, _NARROW), "CIFAR ResNet-32, 3×5 basic blocks, widths 16/32/64"),
    "resnet44": (_builder(44, _NARROW), "CIFAR ResNet-44, 3×7 basic blocks, widths 16/32/64"),
    "resnet56": (_builder(56, _NARROW), "CIFAR ResNet-56, 3×9 basic blocks, widths 16/32/64"),
    "resnet110": (
        _builder(110, _NARROW),
        "CIFAR ResNet-110, 3×18 basic blocks, widths 16/32/64",
    ),
    "resnet8x4": (
        _builder(8, _WIDE),
        "CIFAR ResNet-8×4, 3×1 basic blocks, widths 64/128/256 (stem 32)",
    ),
    "resnet32x4": (
        _builder(32, _WIDE),
        "CIFAR ResNet-32×4, 3×5 basic blocks, widths 64/128/256 (stem 32)",
    ),
}


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut, ReLU after the sum (He et al. 2016, Fig. 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)  # not in place: a tap on bn2 keeps its values


class CifarResNet(nn.Module):
    """CIFAR ResNet of ``depth = 6n + 2`` layers; ``widths`` = (stem, stage1, stage2, stage3)."""

    tap_layout = ModelLayout(features=("layer1", "layer2", "layer3"), embedding="fc:input")

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = _NARROW,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {widths}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
