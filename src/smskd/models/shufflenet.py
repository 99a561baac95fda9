"""ShuffleNet V1 and V2 for 32×32 inputs, as the distillation benchmarks train them.

Architectures: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018 (arXiv:1707.01083), and Ma et al., "ShuffleNet V2: Practical
Guidelines for Efficient CNN Architecture Design", ECCV 2018 (arXiv:1807.11164). The CIFAR
versions are RepDistiller's (Tian et al., ICLR 2020; github.com/HobbitLong/RepDistiller,
``models/ShuffleNetv1.py`` and ``models/ShuffleNetv2.py``, adapted from kuangliu's
pytorch-cifar); mdistiller's ``mdistiller/models/cifar/ShuffleNetv{1,2}.py`` are the same
networks. Against the papers' ImageNet networks they replace the 3×3 stride-2 stem conv and
the max-pool by a 1×1 conv-BN-ReLU to 24 channels at full resolution, so a 32×32 input gives
16×16, 8×8 and 4×4 stage outputs.

``shufflenetv1`` (RepDistiller's ``ShuffleV1``): groups 3, stage widths 240/480/960, 4/8/4
units. Each stage opens with a stride-2 unit whose grouped-conv branch gives
``width - c_in`` channels, concatenated with a 3×3 stride-2 average pool of its input; the
other units add an identity shortcut. Bottleneck width is a quarter of the unit's branch
width; the very first 1×1 conv (24 input channels) is not grouped, as in the paper.

``shufflenetv2`` (RepDistiller's ``ShuffleV2``, ``net_size=1``): stage widths 116/232/464,
then a 1×1 conv-BN-ReLU to 1024 channels before pooling. Each stage is one down-sampling
unit (both branches stride 2) and then ``(3, 7, 3)`` basic units (half the channels pass
through, half go through 1×1 → 3×3 depthwise → 1×1), so 4/8/4 units as in the paper.
``net_size`` (0.2, 0.3, 0.5, 1, 1.5, 2) picks RepDistiller's other configurations.

Initialisation: PyTorch's defaults, as in RepDistiller (it sets none).

Differences from RepDistiller: adaptive average pooling instead of ``avg_pool2d(out, 4)``
(the same on 32×32 inputs), any ``in_channels``, separate non-in-place ReLU modules, no
tuple-returning last units or ``is_feat`` flags. For V1, ``layerK.i.relu3:input`` is a
unit's pre-activation (RepDistiller's ``preact`` feature for the last unit). Parameter names
and shapes follow RepDistiller's, so its state dicts load unchanged.

Taps: ``layer1``..``layer3`` (stage outputs) and ``linear:input`` (the pooled embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from smskd.models.taps import ModelLayout


def _v1_builder(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _v2_builder(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels, **kwargs)


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "shufflenetv1": (
        _v1_builder,
        "CIFAR ShuffleNetV1, groups 3, widths 240/480/960 (RepDistiller's ShuffleV1)",
    ),
    "shufflenetv2": (
        _v2_builder,
        "CIFAR ShuffleNetV2 1×, widths 116/232/464, 1024-d head (RepDistiller's ShuffleV2)",
    ),
}

_STEM_WIDTH = 24

# RepDistiller's ShuffleNetV2 configurations: stage widths + head width, basic units/stage.
V2_CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ChannelShuffle(nn.Module):
    """[N, g·c, H, W] → [N, c·g, H, W]: interleave the channels of the ``groups`` groups."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stem(in_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_channels, _STEM_WIDTH, 1, bias=False), nn.BatchNorm2d(_STEM_WIDTH)


# --------------------------------------------------------------------------- V1


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1 → shuffle → 3×3 depthwise → grouped 1×1, plus an identity shortcut
    (stride 1) or a concatenated 3×3 average pool (stride 2); ReLU after the merge."""

    def __init__(
        self, c_in: int, c_branch: int, stride: int, groups: int, group_first: bool = True
    ) -> None:
        super().__init__()
        self.stride = stride
        mid = c_branch // 4
        g1 = groups if group_first else 1
        if c_in % g1 or mid % groups or c_branch % groups:
            raise ValueError(
                f"ShuffleNetV1 unit {c_in} → {mid} → {c_branch} channels does not split "
                f"into groups={groups}; pick out_planes that fit the groups"
            )
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, c_branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_branch)
        self.shortcut = (
            nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        )
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        merged = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu3(merged)


class ShuffleNetV1(nn.Module):
    """CIFAR ShuffleNetV1 (see the module docstring)."""

    tap_layout = ModelLayout(features=("layer1", "layer2", "layer3"), embedding="linear:input")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _stem(in_channels)
        self.relu1 = nn.ReLU()
        self._width = _STEM_WIDTH
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, width: int, blocks: int, groups: int) -> nn.Sequential:
        units = []
        for i in range(blocks):
            first = i == 0
            c_branch = width - self._width if first else width
            # The network's first 1×1 conv reads the 24-channel stem and is not grouped.
            group_first = self._width != _STEM_WIDTH
            units.append(
                ShuffleV1Unit(self._width, c_branch, 2 if first else 1, groups, group_first)
            )
            self._width = width
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


# --------------------------------------------------------------------------- V2


class ShuffleV2Unit(nn.Module):
    """Basic unit: split the channels in half, pass one half through, send the other through
    1×1-BN-ReLU → 3×3 depthwise-BN → 1×1-BN-ReLU, concatenate, shuffle (2 groups)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.split = c
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.relu3(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownUnit(nn.Module):
    """Down-sampling unit: both branches stride 2, each giving half the output channels.
    Left: 3×3 depthwise-BN → 1×1-BN-ReLU; right: 1×1-BN-ReLU → 3×3 depthwise-BN → 1×1-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2 (see the module docstring)."""

    tap_layout = ModelLayout(features=("layer1", "layer2", "layer3"), embedding="linear:input")

    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1.0) -> None:
        super().__init__()
        if net_size not in V2_CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(V2_CONFIGS)}, got {net_size}")
        widths, blocks = V2_CONFIGS[net_size]
        self.conv1, self.bn1 = _stem(in_channels)
        self.relu1 = nn.ReLU()
        self._width = _STEM_WIDTH
        self.layer1 = self._make_layer(widths[0], blocks[0])
        self.layer2 = self._make_layer(widths[1], blocks[1])
        self.layer3 = self._make_layer(widths[2], blocks[2])
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, width: int, blocks: int) -> nn.Sequential:
        units: list[nn.Module] = [ShuffleV2DownUnit(self._width, width)]
        units += [ShuffleV2Unit(width) for _ in range(blocks)]
        self._width = width
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))
