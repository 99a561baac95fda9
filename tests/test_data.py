"""The embedded digits data and the in-memory loader."""

from __future__ import annotations

import pytest
import torch

from smskd.data.digits import load_digits, stratified_split
from smskd.data.memory import InMemoryLoader
from smskd.data.registry import load_dataset
from smskd.errors import UserError


def test_embedded_digits_equal_scikit_learns() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    reference = sklearn_datasets.load_digits()
    ours = load_digits()
    images = torch.cat([ours.train.images, ours.test.images]).flatten(1).float()
    labels = torch.cat([ours.train.labels, ours.test.labels])
    theirs = torch.from_numpy(reference.data).float()
    assert len(images) == len(theirs) == 1797
    # Same rows with the same labels, whatever the split order.
    ours_sorted = sorted(zip(images.tolist(), labels.tolist(), strict=True))
    theirs_sorted = sorted(zip(theirs.tolist(), reference.target.tolist(), strict=True))
    assert ours_sorted == theirs_sorted


def test_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = load_digits(), load_digits()
    assert torch.equal(a.test.images, b.test.images)
    assert (len(a.train), len(a.test)) == (1438, 359)
    counts = torch.bincount(a.test.labels, minlength=10)
    totals = counts + torch.bincount(a.train.labels, minlength=10)
    assert all(
        abs(c - 0.2 * t) <= 0.5 for c, t in zip(counts.tolist(), totals.tolist(), strict=True)
    )
    assert a.train.images.dtype == torch.uint8 and a.in_channels == 1 and a.image_size == (8, 8)


def test_stratified_split_by_hand() -> None:
    import numpy as np

    labels = np.array([0] * 10 + [1] * 5)
    mask = stratified_split(labels, 0.2, seed=3)
    assert mask[:10].sum() == 2 and mask[10:].sum() == 1


def test_loader_normalizes_and_reshuffles_per_epoch() -> None:
    data = load_digits()
    loader = InMemoryLoader(data.train, data, batch_size=100, shuffle=True, seed=0, drop_last=True)
    assert len(loader) == 14
    x, y, index = next(iter(loader))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    expected = (data.train.images[index].float() / 16 - data.mean[0]) / data.std[0]
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, data.train.labels[index])
    first = next(iter(loader))[2]
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[2], first)
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[2], first)


def test_unknown_dataset() -> None:
    with pytest.raises(UserError, match="valid: 'cifar10', 'cifar100', 'digits'"):
        load_dataset("imagenet")
