"""Limits that protect memory and time, checked when the data is loaded: subset and batch
sizes against the split, crop padding against the images, image sizes and decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smskd.config import DataConfig
from smskd.data import image_folder
from smskd.data.augment import Augment
from smskd.data.digits import load_digits
from smskd.data.image_folder import ImageFolderDataset, load_image_folder, open_image_folder
from smskd.data.memory import InMemoryLoader, check_batch_size, stratified_subset
from smskd.errors import UserError
from smskd.experiment import prepare_data


@pytest.mark.parametrize("size", [1, 5, 11, 64, 200, 1437])
def test_a_train_subset_has_exactly_the_size_asked_for(size: int) -> None:
    train = load_digits().train
    subset = stratified_subset(train, size)
    assert len(subset) == size
    # Class proportions kept: each class within one sample of its exact share.
    share = torch.bincount(train.labels, minlength=10) * size / len(train)
    assert (torch.bincount(subset.labels, minlength=10) - share).abs().max() < 1
    assert stratified_subset(train, len(train) + 1) is train


def test_train_subset_and_batch_size_larger_than_the_split_are_refused() -> None:
    with pytest.raises(UserError, match=r"data.train_subset 1439 is larger than the 1438 "):
        prepare_data(DataConfig(train_subset=1439), 0, torch.device("cpu"))
    with pytest.raises(UserError, match=r"data.batch_size 65 is larger than the 64 training"):
        prepare_data(DataConfig(train_subset=64, batch_size=65), 0, torch.device("cpu"))
    data = prepare_data(DataConfig(train_subset=64, batch_size=64), 0, torch.device("cpu"))
    assert [len(x) for x, _, _ in data.train] == [64]
    check_batch_size(10, 10)


def test_crop_padding_larger_than_the_images_is_refused_at_load() -> None:
    digits = load_digits()
    with pytest.raises(UserError, match=r"crop_padding 9 is larger than the 8×8 images; .* 8 "):
        InMemoryLoader(digits.train, digits, 64, shuffle=True, augment=Augment(9))
    loader = InMemoryLoader(digits.train, digits, 64, shuffle=True, augment=Augment(8))
    assert next(iter(loader))[0].shape == (64, 1, 8, 8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count // 2):
                image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    return tmp_path


def test_image_folder_sizes_are_bounded(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"image size 100000 \(data.options.size\) .* 1024"):
        open_image_folder(folder, size=100000)
    with pytest.raises(UserError, match=r"crop_padding 9 is larger than the 8×8 images"):
        ImageFolderDataset(folder, size=8, augment=Augment(9))
    monkeypatch.setattr(image_folder, "MAX_IN_MEMORY_BYTES", 6 * 3 * 8 * 8 - 1)
    with pytest.raises(UserError, match=r"6 images of 3×8×8 take .*in_memory: false"):
        load_image_folder(folder, size=8)
    monkeypatch.setattr(image_folder, "MAX_IN_MEMORY_BYTES", 6 * 3 * 8 * 8)
    assert len(load_image_folder(folder, size=8).train) == 4


def test_an_image_header_over_pillows_limit_is_refused_not_warned(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    # Between MAX_IMAGE_PIXELS and twice that, Pillow would only warn, and decode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(UserError, match=r"cannot decode image .*0\.png: Image size \(64 pixels"):
        ImageFolderDataset(folder, size=8)[0]


def test_a_folder_shard_smaller_than_a_batch_still_gives_a_batch(folder: Path) -> None:
    cfg = DataConfig(name="image-folder", root=str(folder), batch_size=4, num_workers=0)
    data = prepare_data(cfg, 0, torch.device("cpu"), rank=1, world_size=2)
    assert [len(x) for x, _, _ in data.train] == [2]  # drop_last would leave no batch at all
