"""VGG networks with batch normalisation for CIFAR: the configurations of Simonyan &
Zisserman (2015), "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR (Table 1: A = VGG-11, B = VGG-13, D = VGG-16, E = VGG-19), with BN after every conv
(Ioffe & Szegedy 2015) and the three fully connected layers replaced by one linear
classifier, in the CIFAR variant the distillation literature trains (RepDistiller,
Tian et al. 2020, ``models/vgg.py``, whose ``vgg8`` is its own shallow configuration
"S": one conv per block; mdistiller's ``mdistiller/models/cifar/vgg.py`` is the same).

Five blocks of 3×3 conv-BN-ReLU layers (64, 128, 256, 512, 512 channels), 2×2 max
pooling after the first three, none before the fourth block (RepDistiller pools there
only for 64×64 inputs; pass ``pool3=True`` for that), global average pooling, and a
``Linear(512, num_classes)`` classifier. On 32×32 inputs the blocks see 32, 16, 8, 4 and
4 pixels.

Facts kept from RepDistiller, so that its pretrained checkpoints load unchanged: convs
with bias; conv init normal(0, √(2 / (k²·C_out))) with zero bias, BN weight 1 / bias 0,
classifier weight normal(0, 0.01) with zero bias; parameter names ``blockK.j`` (conv at
``j = 3i``, BN at ``3i + 1``) and ``classifier``.

Differences from RepDistiller: no ``is_feat``/``preact`` forward flags (features come
from taps); each block ends with its ReLU as a (non-in-place) module, where RepDistiller
drops it from the block and applies it in ``forward`` — same computation and state dict,
but the ``blockK`` tap is the post-ReLU feature RepDistiller returns, and
``blockK.<last>:input`` its pre-activation; the input-size test for ``pool3`` is a
constructor flag; ``in_channels`` is configurable; ``batch_norm=False`` drops the BN
layers (RepDistiller's ``vggN`` without ``_bn``; the zoo names are its ``vggN_bn``).

Taps: ``block1``..``block4`` (post-ReLU block outputs, as RepDistiller's features
``f1``..``f4``; ``block0`` plays the stem's role there and is not listed),
``classifier:input`` (the pooled embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from smskd.models.taps import ModelLayout

# Output channels of each conv, per block (RepDistiller's cfg "S", "A", "B", "D", "E").
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return VGG(CONFIGS[name], num_classes=num_classes, in_channels=in_channels, **kwargs)

    return build


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "vgg8": (_builder("vgg8"), "CIFAR VGG-8 with BN, 1 conv per block (RepDistiller cfg S)"),
    "vgg11": (_builder("vgg11"), "CIFAR VGG-11 with BN (config A), linear classifier"),
    "vgg13": (_builder("vgg13"), "CIFAR VGG-13 with BN (config B), linear classifier"),
    "vgg16": (_builder("vgg16"), "CIFAR VGG-16 with BN (config D), linear classifier"),
    "vgg19": (_builder("vgg19"), "CIFAR VGG-19 with BN (config E), linear classifier"),
}


def _block(c_in: int, widths: tuple[int, ...], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(c_in, width, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())  # not in-place: a tap on the BN keeps pre-ReLU values
        c_in = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """CIFAR VGG: ``config`` lists the conv widths of each of the five blocks."""

    tap_layout = ModelLayout(
        features=("block1", "block2", "block3", "block4"), embedding="classifier:input"
    )

    def __init__(
        self,
        config: tuple[tuple[int, ...], ...],
        num_classes: int = 100,
        in_channels: int = 3,
        batch_norm: bool = True,
        pool3: bool = False,
    ) -> None:
        super().__init__()
        if len(config) != 5 or not all(config):
            raise ValueError(f"VGG config needs five non-empty blocks, got {config}")
        self.use_pool3 = pool3
        ins = (in_channels, *(block[-1] for block in config[:-1]))
        self.block0 = _block(ins[0], config[0], batch_norm)
        self.block1 = _block(ins[1], config[1], batch_norm)
        self.block2 = _block(ins[2], config[2], batch_norm)
        self.block3 = _block(ins[3], config[3], batch_norm)
        self.block4 = _block(ins[4], config[4], batch_norm)
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if self.use_pool3:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.pool4(x).flatten(1))
