"""Shared fixtures: tiny models and data so that every test runs in seconds."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from smskd.models.convnet import ConvNet


@pytest.fixture
def tiny_data() -> tuple[DataLoader, DataLoader]:
    """A learnable 3-class task on 1×8×8 inputs (labels from a fixed linear map)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 8, 8, generator=generator)
    y = (x.flatten(1) @ torch.randn(64, 3, generator=generator)).argmax(1)
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32, shuffle=False)
    test = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=64)
    return train, test


@pytest.fixture
def indexed_data(tiny_data) -> tuple[DataLoader, DataLoader]:
    """``tiny_data`` yielding ``(x, y, index)``, as every smskd dataset does (CRD needs it)."""
    train, test = tiny_data
    x, y = train.dataset.tensors
    indexed = TensorDataset(x, y, torch.arange(len(y)))
    return DataLoader(indexed, batch_size=train.batch_size), test


@pytest.fixture
def student() -> ConvNet:
    torch.manual_seed(1)
    return ConvNet(num_classes=3, in_channels=1, widths=(4, 8, 8))


@pytest.fixture
def teacher() -> ConvNet:
    torch.manual_seed(2)
    model = ConvNet(num_classes=3, in_channels=1, widths=(8, 16, 16))
    return model.eval().requires_grad_(False)


@pytest.fixture
def live_teacher() -> ConvNet:
    """A teacher as a user hands it over: train mode, gradients on. The pipeline must freeze it."""
    torch.manual_seed(2)
    return ConvNet(num_classes=3, in_channels=1, widths=(8, 16, 16))
