"""Small plain CNNs for small inputs (8×8 digits, 28×28 Fashion-MNIST)."""

from __future__ import annotations

from torch import Tensor, nn

from smskd.models.taps import ModelLayout


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),  # not in-place: a tap on the BN output must keep pre-ReLU values
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Three conv-BN-ReLU stages (the last two halve the resolution), global average
    pooling and a linear classifier. Taps: ``block1..3`` (feature maps), ``fc:input``
    (the pooled embedding).
    """

    tap_layout = ModelLayout(features=("block1", "block2", "block3"), embedding="fc:input")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.block1 = _block(in_channels, widths[0], pool=False)
        self.block2 = _block(widths[0], widths[1], pool=True)
        self.block3 = _block(widths[1], widths[2], pool=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.pool(x).flatten(1))
