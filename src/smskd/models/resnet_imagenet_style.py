"""ResNet-18/34/50 (the ImageNet family's blocks and widths) with a CIFAR stem.

Architecture: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), Table 1: four stages of basic blocks (18, 34: [2, 2, 2, 2], [3, 4, 6, 3])
or bottleneck blocks (50: [3, 4, 6, 3], expansion 4) at widths 64/128/256/512. The CIFAR
version is the one the distillation benchmarks train (RepDistiller, Tian et al., ICLR 2020,
github.com/HobbitLong/RepDistiller ``models/resnetv2.py``; mdistiller's
``mdistiller/models/cifar/resnetv2.py`` is the same network, and ships the CIFAR-100
``ResNet50`` teacher most papers use): the ImageNet stem (7×7 stride-2 conv + max-pool) is
replaced by a 3×3 stride-1 conv-BN-ReLU to 64 channels, so a 32×32 input gives stage outputs
of 32×32, 16×16, 8×8 and 4×4. Stride sits on the 3×3 conv of a bottleneck ("ResNet v1.5").

Kept from RepDistiller, so that its and mdistiller's checkpoints load unchanged: projection
shortcuts (1×1 conv + BN) wherever a block changes stride or width, bias-free convs,
Kaiming-normal (fan-out) conv init, BN weight 1 / bias 0, PyTorch's default init for the
classifier, optional ``zero_init_residual`` (last BN of each block to 0; off by default, as
there), parameter names ``conv1``, ``bn1``, ``layerK.i.{conv1,bn1,conv2,bn2,conv3,bn3,
shortcut.0,shortcut.1}``, ``linear``.

Differences from RepDistiller: no ``is_feat``/``preact`` flags (features come from taps);
every ReLU is its own non-in-place module and the residual sum is not in place, so hooks see
unmodified values; ``layerK.i.relu2:input`` (basic block) or ``layerK.i.relu3:input``
(bottleneck) is the block's pre-activation, RepDistiller's ``preact`` feature for the last
block; ``in_channels`` is configurable.

Taps: ``layer1``..``layer4`` (stage outputs), ``linear:input`` (the pooled embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from smskd.models.taps import ModelLayout


def _builder(bottleneck: bool, blocks: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        block = Bottleneck if bottleneck else BasicBlock
        return ImageNetStyleResNet(
            block, blocks, num_classes=num_classes, in_channels=in_channels, **kwargs
        )

    return build


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "resnet18": (
        _builder(False, (2, 2, 2, 2)),
        "ResNet-18, CIFAR stem (3×3 conv, no max-pool), basic blocks 2/2/2/2, widths 64..512",
    ),
    "resnet34": (
        _builder(False, (3, 4, 6, 3)),
        "ResNet-34, CIFAR stem (3×3 conv, no max-pool), basic blocks 3/4/6/3, widths 64..512",
    ),
    "resnet50": (
        _builder(True, (3, 4, 6, 3)),
        "ResNet-50, CIFAR stem (3×3 conv, no max-pool), bottlenecks 3/4/6/3, 2048-d embedding",
    ),
}


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    """3×3 conv-BN-ReLU, 3×3 conv-BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)
        self.relu2 = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 conv-BN-ReLU, 3×3 (strided) conv-BN-ReLU, 1×1 conv-BN to 4× width, plus
    shortcut, then ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu3 = nn.ReLU()

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ImageNetStyleResNet(nn.Module):
    """ResNet with ImageNet-family stages and a CIFAR stem (see the module docstring)."""

    tap_layout = ModelLayout(
        features=("layer1", "layer2", "layer3", "layer4"), embedding="linear:input"
    )

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self._width = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017 (arXiv:1706.02677): each residual branch starts at zero.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(block(self._width, planes, stride if i == 0 else 1))
            self._width = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))
