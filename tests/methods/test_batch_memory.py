"""Methods whose memory grows faster than the batch say so, and a stage whose batch needs
more than BATCH_MEMORY_LIMIT is refused before training, naming the batch that fits."""

from __future__ import annotations

import pytest
import torch

from smskd.config import Stage
from smskd.errors import UserError
from smskd.methods import base
from smskd.methods.base import Outputs, StageContext
from smskd.methods.registry import METHODS
from smskd.train.stages import check_stages

RELATIONS = ("rkd", "sp", "pkt", "cc")


def probe(batch: int = 4) -> Outputs:
    features = {"fc:input": torch.randn(batch, 16), "block3": torch.randn(batch, 8, 2, 2)}
    logits = torch.randn(batch, 3)
    return Outputs(logits, logits, torch.zeros(batch, dtype=torch.long), features, features)


def method(name: str) -> base.DistillMethod:
    layer = "block3" if name == "sp" else "fc:input"
    return METHODS[name](student_layer=layer, teacher_layer=layer)


@pytest.mark.parametrize("name", RELATIONS)
def test_relation_methods_estimate_more_than_linear_growth(name: str) -> None:
    m, context = method(name), StageContext(1, 1000, 3)
    small, large = m.batch_memory(100, probe(), context), m.batch_memory(400, probe(), context)
    assert small > 0 and large >= 16 * small  # at least B²


def test_crd_counts_its_memory_banks_and_negatives() -> None:
    crd = METHODS["crd"]("fc:input", "fc:input")
    banks = 4 * 2 * 50000 * 128
    assert crd.batch_memory(0, probe(), StageContext(1, 50000, 3)) == banks
    per_sample = crd.batch_memory(1, probe(), StageContext(1, 50000, 3)) - banks
    assert per_sample >= 4 * 2 * 16385 * 128  # the gathered bank rows of both terms
    assert crd.batch_memory(64, probe(), StageContext(1, None, 3)) == 0  # setup() refuses it


def test_a_batch_over_the_limit_is_refused_naming_the_largest_that_fits(
    student, live_teacher, indexed_data, monkeypatch
) -> None:
    stage = Stage(methods=["rkd", "sp"], epochs=1)
    batch = next(iter(indexed_data[0]))  # 32 samples
    rkd, sp = METHODS["rkd"]("fc:input", "fc:input"), METHODS["sp"]("block3", "block3")
    # The embedding widths of the conftest models: 8 (student) and 16 (teacher).
    widths = ({"fc:input": torch.randn(1, 8)}, {"fc:input": torch.randn(1, 16)})
    shapes = Outputs(torch.randn(1, 3), torch.randn(1, 3), torch.zeros(1), *widths)

    def need(b: int) -> int:
        return sum(m.batch_memory(b, shapes, StageContext(1)) for m in (rkd, sp))

    monkeypatch.setattr(base, "BATCH_MEMORY_LIMIT", need(20))
    with pytest.raises(
        UserError,
        match=r"methods 'rkd', 'sp' need about .* GiB for a batch of 32 \(data.batch_size\), "
        r"over the limit .*BATCH_MEMORY_LIMIT\); the largest batch that fits is 20: lower",
    ):
        check_stages(student, live_teacher, [stage], batch, 128)
    monkeypatch.setattr(base, "BATCH_MEMORY_LIMIT", need(32))
    check_stages(student, live_teacher, [stage], batch, 128)


def test_methods_that_grow_with_the_batch_are_not_checked(
    student, live_teacher, indexed_data, monkeypatch
) -> None:
    monkeypatch.setattr(base, "BATCH_MEMORY_LIMIT", 0)
    stage = Stage(methods=["kd", "dkd", "at", "fitnets"], epochs=1)
    check_stages(student, live_teacher, [stage], next(iter(indexed_data[0])), 128)


def test_crd_banks_over_the_limit_fit_no_batch(student, live_teacher, indexed_data) -> None:
    # Two banks of 10⁸ samples × 128 floats: about 95 GiB before any batch.
    with pytest.raises(UserError, match=r"method 'crd' needs about 9\d\.\d GiB .*no batch fits"):
        check_stages(
            student, live_teacher, [Stage(methods=["crd"], epochs=1)], next(iter(indexed_data[0])),
            10**8,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("crd", {"feat_dim": 8193}, "feat_dim 8193 is over the limit of 8192"),
        ("cc", {"embed_dim": 10**6}, "embed_dim 1000000 is over the limit of 8192"),
        ("vid", {"hidden_channels": 10**5}, "hidden_channels 100000 is over the limit"),
        ("cc", {"order": 171}, r"order \(P\) must be <= 170"),
        ("cc", {"order": 170, "gamma": 1000.0}, r"\(2·gamma\)\^order overflows"),
    ],
)
def test_helper_sizes_are_bounded(name: str, options: dict, message: str) -> None:
    layers = (
        {"student_layers": ["a"], "teacher_layers": ["b"]}
        if name == "vid"
        else {"student_layer": "a", "teacher_layer": "b"}
    )
    with pytest.raises(ValueError, match=message):
        METHODS[name](**layers, **options)
