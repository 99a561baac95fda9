"""CIFAR ResNets, wide ResNets and VGGs: parameter counts, forward passes and taps.

Parameter counts are checked three ways:

* EXACT counts at 100 classes for every model. Three are summed layer by layer below
  (``test_exact_counts_summed_by_hand``); all are reproduced by the closed-form formulas
  ``_resnet_params``/``_wrn_params``/``_vgg_params``, derived from the architectures, and
  were cross-checked (outside this suite) against RepDistiller's own ``models/`` code at
  commit b84f547, which gives the same 18 numbers and the same state-dict keys.
* Published rounded figures: resnet8x4 1.23M, resnet32x4 7.43M, wrn-40-2 2.26M,
  wrn-16-2 0.70M and resnet56 0.86M, the figures quoted for RepDistiller's CIFAR-100
  models in the distillation literature; asserted within 1%.
* He et al. (2016), "Deep Residual Learning for Image Recognition", Table 6: CIFAR-10
  ResNet-20/32/44/56/110 have 0.27M/0.46M/0.66M/0.85M/1.7M parameters with
  parameter-free (option A) shortcuts; our 10-class count minus the two projection
  shortcuts must round to those figures.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smskd.models import resnet_cifar, vgg, wrn
from smskd.models.taps import FeatureTaps, layout_of

ZOO = {**resnet_cifar.ZOO, **wrn.ZOO, **vgg.ZOO}
NAMES = sorted(ZOO)

RESNETS = {  # name: (depth, (stem, stage1, stage2, stage3) widths)
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
WRNS = {"wrn-16-1": (16, 1), "wrn-16-2": (16, 2), "wrn-40-1": (40, 1), "wrn-40-2": (40, 2)}

# Exact counts at 100 classes, 3 input channels (= RepDistiller's models/ at b84f547).
EXACT_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn-16-1": 180_916,
    "wrn-16-2": 703_284,
    "wrn-40-1": 569_780,
    "wrn-40-2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

# Published rounded figures (millions, 100 classes).
PUBLISHED_100 = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn-40-2": 2.26,
    "wrn-16-2": 0.70,
    "resnet56": 0.86,
}

# He et al. 2016, Table 6 (CIFAR-10, option-A shortcuts), millions.
HE_2016_CIFAR10 = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85}
HE_2016_CIFAR10_ONE_DIGIT = {"resnet110": 1.7}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Batches of two: intra-op threads cost more than they save, most of all on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _resnet_params(depth: int, widths: tuple[int, ...], classes: int, c_in: int = 3) -> int:
    """Stem conv3×3 + BN; per block two conv3×3 + two BN (2 params per channel), plus a
    1×1 conv + BN projection where the width or stride changes; linear classifier."""
    n = (depth - 2) // 6
    stem, *stages = widths
    total = 9 * c_in * stem + 2 * stem
    c_in = stem
    for i, c in enumerate(stages):
        total += 9 * c_in * c + 9 * c * c + 4 * c
        if i > 0 or c_in != c:
            total += c_in * c + 2 * c
        total += (n - 1) * (18 * c * c + 4 * c)
        c_in = c
    return total + c_in * classes + classes


def _wrn_params(depth: int, k: int, classes: int, c_in: int = 3) -> int:
    """Stem conv3×3 (16 ch.); per pre-activation block BN(in) + conv3×3 + BN(out) +
    conv3×3, plus a 1×1 conv projection where the width changes; final BN; classifier."""
    n = (depth - 4) // 6
    total = 9 * c_in * 16
    c_in = 16
    for c in (16 * k, 32 * k, 64 * k):
        total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c
        if c_in != c:
            total += c_in * c
        total += (n - 1) * (4 * c + 18 * c * c)
        c_in = c
    return total + 2 * c_in + c_in * classes + classes


def _vgg_params(name: str, classes: int, c_in: int = 3) -> int:
    """Per layer conv3×3 with bias + BN; linear classifier on the last width."""
    total = 0
    for block in vgg.CONFIGS[name]:
        for c in block:
            total += 9 * c_in * c + c + 2 * c
            c_in = c
    return total + c_in * classes + classes


def _formula(name: str, classes: int, c_in: int = 3) -> int:
    if name in RESNETS:
        return _resnet_params(*RESNETS[name], classes, c_in)
    if name in WRNS:
        return _wrn_params(*WRNS[name], classes, c_in)
    return _vgg_params(name, classes, c_in)


def _count(name: str, num_classes: int = 100, in_channels: int = 3) -> int:
    with torch.device("meta"):  # shapes only: no memory, no real initialisation
        model = ZOO[name][0](num_classes=num_classes, in_channels=in_channels)
    return sum(p.numel() for p in model.parameters())


def test_zoo_names_and_descriptions() -> None:
    assert set(ZOO) == set(EXACT_100)
    assert set(resnet_cifar.ZOO) == set(RESNETS)
    assert set(wrn.ZOO) == set(WRNS)
    assert set(vgg.ZOO) == set(vgg.CONFIGS)
    for build, description in ZOO.values():
        assert callable(build)
        assert isinstance(description, str) and description


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_exact_figures_and_formula(name: str) -> None:
    assert _count(name) == EXACT_100[name] == _formula(name, 100)
    assert _count(name, num_classes=10, in_channels=1) == _formula(name, 10, c_in=1)


def test_exact_counts_summed_by_hand() -> None:
    # resnet8 (widths 16/16/32/64, one block per stage), 100 classes:
    #   stem   conv 3·16·9 = 432, BN 32                                            =    464
    #   layer1 16→16: conv 16·16·9 = 2304 (×2), 2 BN × 32                          =  4 672
    #   layer2 16→32: conv 16·32·9 = 4608, conv 32·32·9 = 9216, 2 BN × 64,
    #          projection conv 16·32 = 512 + BN 64                                 = 14 528
    #   layer3 32→64: conv 32·64·9 = 18432, conv 64·64·9 = 36864, 2 BN × 128,
    #          projection conv 32·64 = 2048 + BN 128                               = 57 728
    #   fc     64·100 + 100                                                        =  6 500
    assert 464 + 4_672 + 14_528 + 57_728 + 6_500 == 83_892 == _count("resnet8")
    # wrn-16-1 (two pre-activation blocks per stage, widths 16/32/64), 100 classes:
    #   conv1  3·16·9                                                              =    432
    #   block1 2 × (BN 32 + conv 16·16·9 = 2304 + BN 32 + conv 2304)               =  9 344
    #   block2 BN 32 + conv 16·32·9 = 4608 + BN 64 + conv 32·32·9 = 9216
    #          + shortcut 16·32 = 512  (14 432);  BN 64 + 9216 + BN 64 + 9216  (18 560) = 32 992
    #   block3 BN 64 + conv 32·64·9 = 18432 + BN 128 + conv 64·64·9 = 36864
    #          + shortcut 32·64 = 2048 (57 536);  BN 128 + 36864 + BN 128 + 36864 (73 984) = 131 520
    #   bn1    2·64 = 128;  fc 64·100 + 100 = 6 500
    assert 432 + 9_344 + 32_992 + 131_520 + 128 + 6_500 == 180_916 == _count("wrn-16-1")
    # vgg8 (one conv with bias + BN per block), 100 classes:
    #   block0 3·64·9 + 64 + BN 128 = 1 920        block1 64·128·9 + 128 + BN 256 = 74 112
    #   block2 128·256·9 + 256 + BN 512 = 295 680  block3 256·512·9 + 512 + BN 1024 = 1 181 184
    #   block4 512·512·9 + 512 + BN 1024 = 2 360 832,  classifier 512·100 + 100 = 51 300
    assert 1_920 + 74_112 + 295_680 + 1_181_184 + 2_360_832 + 51_300 == 3_965_028
    assert _count("vgg8") == 3_965_028


@pytest.mark.parametrize("name", sorted(PUBLISHED_100))
def test_counts_within_one_percent_of_published(name: str) -> None:
    published = PUBLISHED_100[name] * 1e6
    assert abs(_count(name) - published) <= 0.01 * published


def test_counts_round_to_he_et_al_table_6() -> None:
    # Option A shortcuts have no parameters: drop our two projections (layer2: 16·32 + 2·32,
    # layer3: 32·64 + 2·64), then round to the table's precision.
    projections = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    for table, digits in ((HE_2016_CIFAR10, 2), (HE_2016_CIFAR10_ONE_DIGIT, 1)):
        for name, millions in table.items():
            count = _count(name, num_classes=10) - projections
            assert round(count / 1e6, digits) == millions, name


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_taps(name: str) -> None:
    build = ZOO[name][0]
    torch.manual_seed(0)
    model = build(num_classes=100, in_channels=3)
    layout = layout_of(model)
    assert layout.features and layout.embedding
    taps = [*layout.features, layout.embedding]
    with torch.no_grad(), FeatureTaps(model, taps) as hooked:
        logits = model(torch.randn(2, 3, 32, 32))
        captured = dict(hooked.features)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    sizes = []
    for tap in layout.features:
        feature = captured[tap]
        assert feature.ndim == 4 and feature.shape[0] == 2, tap
        sizes.append(feature.shape[-2] * feature.shape[-1])
    assert sizes == sorted(sizes, reverse=True)  # shallow → deep: never growing
    embedding = captured[layout.embedding]
    classifier = dict(model.named_modules())[layout.embedding.split(":")[0]]
    assert embedding.shape == (2, classifier.in_features)
    assert classifier.in_features == captured[layout.features[-1]].shape[1]

    small = build(num_classes=10, in_channels=1)
    with torch.no_grad():
        assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "size", "kwargs"),
    [
        ("resnet8", 40, {}),
        ("wrn-16-1", 24, {}),
        ("vgg8", 48, {}),
        ("vgg8", 64, {"pool3": True}),
    ],
)
def test_other_input_sizes(name: str, size: int, kwargs: dict) -> None:
    model = ZOO[name][0](num_classes=7, in_channels=2, **kwargs)
    with torch.no_grad():
        assert model(torch.randn(2, 2, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet32x4", "wrn-40-2", "vgg13"])
def test_no_in_place_operations_that_hooks_could_see(name: str) -> None:
    with torch.device("meta"):
        model = ZOO[name][0](num_classes=100)
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]


def test_state_dict_names_follow_repdistiller() -> None:
    # RepDistiller's pretrained teachers load without renaming.
    with torch.device("meta"):
        keys = {
            name: set(ZOO[name][0](num_classes=100).state_dict())
            for name in ("resnet8x4", "wrn-40-2", "vgg13")
        }
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var"} <= keys[
        "resnet8x4"
    ]
    assert {"block2.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.bias"} <= (
        keys["wrn-40-2"]
    )
    assert {"block0.0.bias", "block0.4.running_mean", "block4.3.weight", "classifier.weight"} <= (
        keys["vgg13"]
    )


def test_initialisation_follows_repdistiller() -> None:
    torch.manual_seed(0)
    net = ZOO["vgg8"][0](num_classes=100)
    assert torch.all(net.classifier.bias == 0) and abs(net.classifier.weight.std() - 0.01) < 1e-3
    conv = net.block4[0]
    assert torch.all(conv.bias == 0)
    assert abs(conv.weight.std() - (2 / (9 * 512)) ** 0.5) < 1e-3  # Kaiming, fan-out
    wide = ZOO["wrn-16-2"][0](num_classes=100)
    assert torch.all(wide.fc.bias == 0)
    assert torch.all(wide.block1.layer[0].bn1.weight == 1)
    res = ZOO["resnet20"][0](num_classes=100)
    assert torch.all(res.layer2[0].bn2.bias == 0)


def test_options_and_invalid_configurations() -> None:
    wide = ZOO["wrn-16-2"][0](num_classes=10, drop_rate=0.3)
    assert wide.block2.layer[1].dropout.p == 0.3
    assert ZOO["wrn-16-2"][0](num_classes=10).block1.layer[0].dropout.p == 0.0
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_cifar.CifarResNet(depth=10)
    with pytest.raises(ValueError, match="6n\\+4"):
        wrn.WideResNet(depth=15)
    with pytest.raises(ValueError, match="five"):
        vgg.VGG(((64,), (128,)))
    plain = ZOO["vgg11"][0](num_classes=10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
