"""MobileNetV2, ShuffleNetV1/V2 and ResNet-18/34/50 (CIFAR stem): sizes, shapes, taps.

Parameter counts at 100 classes. "Exact" is the count of RepDistiller's own model code
(github.com/HobbitLong/RepDistiller @ b84f547, ``models/{mobilenetv2,ShuffleNetv1,
ShuffleNetv2,resnetv2}.py``: ``mobile_half(100)``, ``mobilenetv2_T_w(6, 1.0, 100)``,
``ShuffleV1/ShuffleV2/ResNet18/34/50(num_classes=100)``), measured once by hand outside this
suite; our networks load those state dicts key for key and give the same logits. "Published"
is the rounded figure quoted for these CIFAR-100 networks in the distillation literature's
model tables and in this project's brief (ResNet-50 23.7M, ResNet-18 11.2M, ShuffleNetV1
0.95M, ShuffleNetV2 1.36M, MobileNetV2 = RepDistiller's mobile_half 0.81M); it is not traced
to one table here, and the exact counts above are the real check. ResNet-34 (21.3M) and
MobileNetV2 at width 1.0 (2.35M) are our own rounding of the exact count. Five exact counts
are also derived by hand below, as per-stage sums.
"""

from __future__ import annotations

from functools import cache, partial

import pytest
import torch
from torch import nn

from smskd.models import mobilenetv2, resnet_imagenet_style, shufflenet
from smskd.models.taps import FeatureTaps, split_tap

ZOO = {**mobilenetv2.ZOO, **shufflenet.ZOO, **resnet_imagenet_style.ZOO}
NAMES = [
    "mobilenetv2",
    "mobilenetv2-half",
    "shufflenetv1",
    "shufflenetv2",
    "resnet18",
    "resnet34",
    "resnet50",
]

# name: (exact count from RepDistiller's code, published rounded figure)
COUNTS = {
    "mobilenetv2": (2_353_060, 2.35e6),
    "mobilenetv2-half": (812_836, 0.81e6),
    "shufflenetv1": (949_258, 0.95e6),
    "shufflenetv2": (1_355_528, 1.36e6),
    "resnet18": (11_220_132, 11.2e6),
    "resnet34": (21_328_292, 21.3e6),
    "resnet50": (23_705_252, 23.7e6),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Batches of two: intra-op threads cost more than they save, most of all on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    _model.cache_clear()  # the cached networks hold ~0.5 GB; free it for later modules
    _forward.cache_clear()


@cache
def _model(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0](num_classes=num_classes, in_channels=in_channels).eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_names_and_descriptions():
    assert sorted(ZOO) == sorted(NAMES)
    for builder, description in ZOO.values():
        assert callable(builder) and isinstance(description, str) and description


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_repdistiller(name):
    exact, published = COUNTS[name]
    n = _count(_model(name))
    assert n == exact
    assert abs(n - published) <= 0.01 * published


def test_resnet18_count_by_hand():
    # Basic block (c_in → p): 9·c_in·p + 9·p·p + 4p (two BNs), + c_in·p + 2p if projected.
    stem = 3 * 64 * 9 + 2 * 64  # 1,856
    layer1 = 2 * (2 * 9 * 64 * 64 + 4 * 64)  # 2 × 73,984 = 147,968
    layer2 = (9 * 64 * 128 + 9 * 128 * 128 + 64 * 128 + 6 * 128) + (
        2 * 9 * 128 * 128 + 4 * 128
    )  # 230,144 + 295,424 = 525,568
    layer3 = (9 * 128 * 256 + 9 * 256 * 256 + 128 * 256 + 6 * 256) + (
        2 * 9 * 256 * 256 + 4 * 256
    )  # 919,040 + 1,180,672 = 2,099,712
    layer4 = (9 * 256 * 512 + 9 * 512 * 512 + 256 * 512 + 6 * 512) + (
        2 * 9 * 512 * 512 + 4 * 512
    )  # 3,673,088 + 4,720,640 = 8,393,728
    fc = 512 * 100 + 100  # 51,300
    assert stem + layer1 + layer2 + layer3 + layer4 + fc == 11_220_132
    assert _count(_model("resnet18")) == 11_220_132


def test_resnet50_count_by_hand():
    # Bottleneck (c_in → p → 4p): c_in·p + 9p² + 4p² + BNs 2p + 2p + 8p,
    # + 4p·c_in + 8p for the projection of each stage's first block.
    stem = 1_856  # as ResNet-18
    layer1 = 75_008 + 2 * 70_400  # first (64 → 256, projected) + 2 × (256 → 256)
    layer2 = 379_392 + 3 * 280_064  # 256 → 512 stride 2, then 3 × (512 → 512)
    layer3 = 1_512_448 + 5 * 1_117_184  # 512 → 1024, then 5 × (1024 → 1024)
    layer4 = 6_039_552 + 2 * 4_462_592  # 1024 → 2048, then 2 × (2048 → 2048)
    fc = 2048 * 100 + 100  # 204,900
    # e.g. layer1 first block: 64·64 + 9·64² + 4·64² + 12·64 + (256·64 + 512) = 75,008
    assert 64 * 64 + 9 * 64 * 64 + 4 * 64 * 64 + 12 * 64 + 256 * 64 + 512 == 75_008
    assert stem + layer1 + layer2 + layer3 + layer4 + fc == 23_705_252
    assert _count(_model("resnet50")) == 23_705_252


def test_mobilenetv2_half_count_by_hand():
    # Inverted residual (c_in → h = t·c_in → c_out): c_in·h + 9h + h·c_out + BNs 4h + 2c_out.
    # Width 0.5: stem 16, stages 8/12/16/32/48/80/160, head 1280.
    stem = 3 * 16 * 9 + 32  # 464
    stages = [
        608,  # t=1: 16 → 16 → 8
        1_608 + 2_688,  # 8 → 48 → 12; 12 → 72 → 12
        2_984 + 2 * 4_352,  # 12 → 72 → 16; 2 × (16 → 96 → 16)
        5_920 + 3 * 14_848,  # 16 → 96 → 32; 3 × (32 → 192 → 32)
        17_952 + 2 * 31_488,  # 32 → 192 → 48; 2 × (48 → 288 → 48)
        40_768 + 2 * 83_200,  # 48 → 288 → 80; 2 × (80 → 480 → 80)
        121_760,  # 80 → 480 → 160
    ]
    assert 12 * 72 + 9 * 72 + 72 * 16 + 4 * 72 + 2 * 16 == 2_984
    head = 160 * 1280 + 2 * 1280  # 207,360
    fc = 1280 * 100 + 100  # 128,100
    assert stem + sum(stages) + head + fc == 812_836
    assert _count(_model("mobilenetv2-half")) == 812_836


def test_shufflenetv1_count_by_hand():
    # Unit (c_in → mid = branch/4 → branch), groups 3: c_in·mid/g1 + 9·mid + mid·branch/3
    # + BNs 4·mid + 2·branch; g1 = 1 only for the network's first unit (24-channel input).
    stem = 3 * 24 + 48  # 120
    first = 24 * 54 + 9 * 54 + 54 * 216 // 3 + 4 * 54 + 2 * 216  # 24 → 216 (+24 pooled): 6,318
    assert first == 6_318
    layer1 = 6_318 + 3 * 10_860  # 3 × (240 → 60 → 240)
    layer2 = 10_860 + 7 * 40_920  # 240 → 240 (+240 pooled); 7 × (480 → 120 → 480)
    layer3 = 40_920 + 3 * 158_640  # 480 → 480 (+480 pooled); 3 × (960 → 240 → 960)
    fc = 960 * 100 + 100  # 96,100
    assert stem + layer1 + layer2 + layer3 + fc == 949_258
    assert _count(_model("shufflenetv1")) == 949_258


def test_shufflenetv2_count_by_hand():
    # Down unit (c_in → c_out, m = c_out/2): 9c_in + c_in·m + c_in·m + 9m + m² + BNs 2c_in + 8m.
    # Basic unit (c, h = c/2): 2h² + 9h + BNs 6h.
    stem = 3 * 24 + 48  # 120
    layer1 = 7_398 + 3 * 7_598  # 24 → 116; 3 × 116
    layer2 = 43_616 + 7 * 28_652  # 116 → 232; 7 × 232
    layer3 = 167_968 + 3 * 111_128  # 232 → 464; 3 × 464
    assert 2 * 58 * 58 + 9 * 58 + 6 * 58 == 7_598
    head = 464 * 1024 + 2 * 1024  # 477,184
    fc = 1024 * 100 + 100  # 102,500
    assert stem + layer1 + layer2 + layer3 + head + fc == 1_355_528
    assert _count(_model("shufflenetv2")) == 1_355_528


# RepDistiller parameter names and shapes, so that its (and mdistiller's) checkpoints load.
REPDISTILLER_KEYS = {
    "mobilenetv2-half": {
        "conv1.0.weight": (16, 3, 3, 3),
        "blocks.6.0.conv.6.weight": (160, 480, 1, 1),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "shufflenetv1": {
        "layer1.0.conv1.weight": (54, 24, 1, 1),  # first 1×1 not grouped
        "layer1.1.conv1.weight": (60, 80, 1, 1),  # groups 3
        "layer3.3.conv3.weight": (960, 80, 1, 1),
        "linear.weight": (100, 960),
    },
    "shufflenetv2": {
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer3.3.conv3.weight": (232, 232, 1, 1),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
}


@pytest.mark.parametrize("name", sorted(REPDISTILLER_KEYS))
def test_state_dict_names_follow_repdistiller(name):
    state = _model(name).state_dict()
    for key, shape in REPDISTILLER_KEYS[name].items():
        assert tuple(state[key].shape) == shape, key


PREACT = {"resnet18": "layer4.1.relu2:input", "shufflenetv1": "layer3.3.relu3:input"}


@cache
def _forward(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One hooked forward of the 100-class model on a [2, 3, 32, 32] batch, shared by tests."""
    model = _model(name)
    layout = model.tap_layout
    taps = [*layout.features, layout.embedding, *([PREACT[name]] if name in PREACT else [])]
    torch.manual_seed(1)
    with FeatureTaps(model, taps) as hooked, torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
        features = dict(hooked.features)
    return logits, features


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name):
    assert _forward(name)[0].shape == (2, 100)
    with torch.no_grad():
        assert _model(name, 10, 1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "build",
    [
        ZOO["mobilenetv2-half"][0],
        ZOO["shufflenetv1"][0],
        ZOO["shufflenetv2"][0],
        ZOO["resnet18"][0],
        # the bottleneck path of resnet50, one block a stage to keep the test fast
        partial(
            resnet_imagenet_style.ImageNetStyleResNet, resnet_imagenet_style.Bottleneck, (1,) * 4
        ),
    ],
)
def test_other_input_sizes(build):
    # Adaptive pooling: sizes that are not 32, odd and non-square ones included, work.
    model = build(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 21, 27)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_taps(name):
    model = _model(name)
    layout = model.tap_layout
    modules = dict(model.named_modules())
    assert all(split_tap(t)[0] in modules for t in [*layout.features, layout.embedding])
    assert not any(getattr(m, "inplace", False) for m in modules.values())
    features = _forward(name)[1]
    maps = [features[t] for t in layout.features]
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in maps)
    sizes = [f.shape[-1] * f.shape[-2] for f in maps]
    assert sizes == sorted(sizes, reverse=True)
    classifier = modules[split_tap(layout.embedding)[0]]
    assert isinstance(classifier, nn.Linear)
    assert features[layout.embedding].shape == (2, classifier.in_features)


@pytest.mark.parametrize(
    ("name", "sides"),
    [
        ("mobilenetv2-half", [16, 8, 4, 2]),
        ("shufflenetv1", [16, 8, 4]),
        ("shufflenetv2", [16, 8, 4]),
        ("resnet50", [32, 16, 8, 4]),
    ],
)
def test_stage_resolutions_match_repdistiller(name, sides):
    features = _forward(name)[1]
    assert [features[t].shape[-1] for t in _model(name).tap_layout.features] == sides


@pytest.mark.parametrize("name", sorted(PREACT))
def test_preactivation_taps(name):
    # The input of a block's last ReLU is RepDistiller's ``preact`` feature: it has negatives.
    assert _forward(name)[1][PREACT[name]].min() < 0


def test_width_mult_and_variants():
    half = ZOO["mobilenetv2"][0](num_classes=100, width_mult=0.5)
    assert _count(half) == 812_836  # the width kwarg reaches the model: mobile_half again
    wide = mobilenetv2.MobileNetV2(num_classes=10, width_mult=1.5)
    assert wide.classifier[0].in_features == 1920  # int(1280 · 1.5) above width 1
    with pytest.raises(ValueError, match="width_mult"):
        mobilenetv2.MobileNetV2(num_classes=10, width_mult=0.01)
    small = shufflenet.ShuffleNetV2(num_classes=10, net_size=0.5)
    assert small.linear.in_features == 1024 and small.layer3[0].conv5.out_channels == 96
    with pytest.raises(ValueError, match="net_size"):
        shufflenet.ShuffleNetV2(num_classes=10, net_size=0.7)
    # ShuffleNetV1's other group settings (here kuangliu's g=2 config), checked for fit
    v1_g2 = shufflenet.ShuffleNetV1(num_classes=10, out_planes=(200, 400, 800), groups=2)
    assert v1_g2.layer2[1].conv1.groups == 2
    with pytest.raises(ValueError, match="groups=4"):
        shufflenet.ShuffleNetV1(num_classes=10, groups=4)


def test_resnet_zero_init_residual():
    model = ZOO["resnet18"][0](num_classes=10, zero_init_residual=True)
    with torch.no_grad():
        assert all(b.bn2.weight.abs().sum() == 0 for b in (*model.layer1, *model.layer4))
        assert model.layer1[0].bn1.weight.sum() == 64
