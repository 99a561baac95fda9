"""Shared fixtures: tiny models and data so that every test runs in seconds (built by
fakes.py's functions, which a fixture of a wider scope calls itself)."""

from __future__ import annotations

import pytest
import torch
from fakes import make_live_teacher, make_student, make_tiny_data
from torch.utils.data import DataLoader, TensorDataset

from smskd.models.convnet import ConvNet


@pytest.fixture
def tiny_data() -> tuple[DataLoader, DataLoader]:
    """A learnable 3-class task on 1×8×8 inputs (labels from a fixed linear map)."""
    return make_tiny_data()


@pytest.fixture
def indexed_data(tiny_data) -> tuple[DataLoader, DataLoader]:
    """``tiny_data`` yielding ``(x, y, index)``, as every smskd dataset does (CRD needs it)."""
    train, test = tiny_data
    x, y = train.dataset.tensors
    indexed = TensorDataset(x, y, torch.arange(len(y)))
    return DataLoader(indexed, batch_size=train.batch_size), test


@pytest.fixture
def student() -> ConvNet:
    return make_student()


@pytest.fixture
def teacher() -> ConvNet:
    return make_live_teacher().eval().requires_grad_(False)


@pytest.fixture
def live_teacher() -> ConvNet:
    """A teacher as a user hands it over: train mode, gradients on. The pipeline must freeze it."""
    return make_live_teacher()
