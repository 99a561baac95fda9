"""Wide residual networks WRN-d-k of Zagoruyko & Komodakis (2016), "Wide Residual
Networks", BMVC, in the CIFAR variant the distillation literature trains (RepDistiller,
Tian et al. 2020, ``models/wrn.py``; mdistiller's ``mdistiller/models/cifar/wrn.py`` is
the same network).

A 3×3 conv stem (16 channels), three stages of ``n = (d - 4) / 6`` pre-activation basic
blocks (BN-ReLU-conv ×2, §2 of the paper) of widths 16k/32k/64k at full, ½ and ¼
resolution, a final BN-ReLU, global average pooling and a linear classifier.

Facts kept from RepDistiller, so that its pretrained checkpoints load unchanged: a 1×1
projection shortcut, fed with the block's *activated* input, wherever the width changes;
bias-free convs; conv init normal(0, √(2 / (k²·C_out))) (Kaiming fan-out), BN weight 1 /
bias 0, classifier bias 0 and default weight init; dropout between the two convs, off by
default; parameter names ``conv1``, ``blockK.layer.i.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1``, ``fc``.

Differences from RepDistiller: no ``is_feat``/``preact`` forward flags (features come
from taps); ReLUs are not in place (hooks see unmodified values) and dropout is a module;
a block also gets a projection when only its stride changes (never the case in WRN-d-k,
whose stages double the width); adaptive average pooling replaces ``avg_pool2d(·, 8)`` so
other input sizes work (same result on 32×32 inputs); ``in_channels`` is configurable.

Taps: ``block1``..``block3`` (stage outputs, pre-activation as in RepDistiller's
features; 32×32 → 8×8 on CIFAR), ``fc:input`` (the pooled embedding). RepDistiller's
``preact`` features are ``block2.layer.0.bn1``, ``block3.layer.0.bn1`` and ``bn1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from smskd.models.taps import ModelLayout


def _builder(depth: int, widen_factor: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return WideResNet(
            depth, widen_factor, num_classes=num_classes, in_channels=in_channels, **kwargs
        )

    return build


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "wrn-16-1": (_builder(16, 1), "Wide ResNet 16-1, 3×2 pre-act blocks, widths 16/32/64"),
    "wrn-16-2": (_builder(16, 2), "Wide ResNet 16-2, 3×2 pre-act blocks, widths 32/64/128"),
    "wrn-40-1": (_builder(40, 1), "Wide ResNet 40-1, 3×6 pre-act blocks, widths 16/32/64"),
    "wrn-40-2": (_builder(40, 2), "Wide ResNet 40-2, 3×6 pre-act blocks, widths 32/64/128"),
}


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3, BN-ReLU-(dropout)-conv3×3, plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        # RepDistiller's name, kept so its checkpoints load.
        self.convShortcut: nn.Conv2d | None = None
        if c_in != c_out or stride != 1:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # Identity shortcut takes the raw input; a projection takes the activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """``blocks`` wide blocks; only the first changes width and stride. Tap it by its name."""

    def __init__(
        self, c_in: int, c_out: int, blocks: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        layers = [WideBlock(c_in, c_out, stride, drop_rate)]
        layers += [WideBlock(c_out, c_out, 1, drop_rate) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)  # ``.layer`` as in RepDistiller's NetworkBlock

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth = 6n + 4``."""

    tap_layout = ModelLayout(features=("block1", "block2", "block3"), embedding="fc:input")

    def __init__(
        self,
        depth: int,
        widen_factor: int = 1,
        num_classes: int = 100,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n ≥ 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be ≥ 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(widths[0], widths[1], blocks, 1, drop_rate)
        self.block2 = WideStage(widths[1], widths[2], blocks, 2, drop_rate)
        self.block3 = WideStage(widths[2], widths[3], blocks, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))
