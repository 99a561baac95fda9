"""Class-per-subfolder image datasets (the ``ImageFolder`` layout), without torchvision.

Format::

    root/train/<class>/<any/depth>/*.png|jpg|jpeg|bmp|gif|tif|tiff|webp|ppm|pgm
    root/val/<class>/...

Classes are the ``train`` subfolder names, sorted, numbered from 0; ``val`` may
hold a subset of them (a val class unknown to train is an error). Files with
other extensions (``.DS_Store``, ``README``, …) are skipped. An empty class folder
or an image Pillow cannot decode is a :class:`~smskd.errors.UserError` naming it.

Where: ``root`` is required (``data.root``); nothing is downloaded.

Decoding uses Pillow, an optional dependency imported only when an image is
read (``pip install pillow``, or ``pip install smskd[images]``). Every image is
converted to RGB (``channels=3``) or greyscale (``channels=1``) and **resized to
the configured ``size``** (bilinear with antialiasing) whatever its original
size, so that images of mixed sizes batch together. Augmentation (random crop
after zero padding, horizontal flip: :class:`smskd.data.augment.Augment`, the
same as the in-memory loader's) and normalization are done in torch.

Two ways to use it: :class:`ImageFolderDataset`, a map-style ``Dataset`` decoding
per item for a ``DataLoader`` (large folders), and :func:`load_image_folder`,
which decodes everything once into an :class:`ArrayDataset` for the in-memory
loader (small folders).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from smskd.data.augment import Augment
from smskd.data.fashion_mnist import pixel_moments
from smskd.data.memory import ArrayDataset, ArraySplit
from smskd.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
SPLITS = ("train", "val")
# Every image is resized to ``size``, and batches are B×C×size: at this side one image
# is already 3 MiB of uint8 RGB, 4.6 times ImageNet's 224 a side, above any usual input.
MAX_SIDE = 1024
# What ``in_memory: true`` may decode into one tensor; a larger folder is streamed.
MAX_IN_MEMORY_BYTES = 16 * 2**30


def _pillow() -> ModuleType:
    # Imported here, not at module level: the core must work without Pillow.
    try:
        from PIL import Image
    except ImportError:
        raise UserError(
            "reading image folders needs Pillow: pip install pillow (smskd[images])"
        ) from None
    return Image


# ----------------------------------------------------------------------------- scanning


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"missing folder {folder}; expected <root>/train/<class>/<images>")
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"class folder {folder} holds no images ({extensions})")
    return files


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class subfolders of ``root/train``."""
    classes = [p.name for p in _class_folders(Path(root).expanduser() / "train")]
    if not classes:
        raise UserError(f"{Path(root) / 'train'} has no class subfolders")
    return classes


def scan(root: str | Path, split: str, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` for every image of ``root/split``, labels indexing ``classes``."""
    if split not in SPLITS:
        raise UserError(f"unknown image-folder split {split!r}; valid: 'train', 'val'")
    folder = Path(root).expanduser() / split
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    for class_folder in _class_folders(folder):
        if class_folder.name not in index:
            raise UserError(
                f"{class_folder}: class {class_folder.name!r} is not in {folder.parent / 'train'}; "
                "the val classes must be a subset of the train classes"
            )
        label = index[class_folder.name]
        samples.extend((path, label) for path in _images_in(class_folder))
    if not samples:
        raise UserError(f"{folder} has no class subfolders")
    return samples


# ----------------------------------------------------------------------------- pixels


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or min(pair) < 1:
        raise UserError(f"image size must be a positive int or (height, width), got {size!r}")
    if max(pair) > MAX_SIDE:
        raise UserError(
            f"image size {size!r} (data.options.size) is over the limit of {MAX_SIDE} pixels "
            f"a side; use at most {MAX_SIDE}"
        )
    return int(pair[0]), int(pair[1])


def decode(path: Path, channels: int) -> Tensor:
    """The image at ``path`` as uint8 C×H×W (C = ``channels``: 1 grey, 3 RGB)."""
    image_module = _pillow()
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with warnings.catch_warnings():
            # Pillow only warns of a header promising more than its MAX_IMAGE_PIXELS
            # (up to twice that, then it refuses), and would decode it: refuse it now.
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with image_module.open(path) as image:
                array = np.asarray(image.convert(mode), dtype=np.uint8)
    # Pillow signals undecodable data with UnidentifiedImageError (an OSError),
    # truncated data with OSError, odd headers with ValueError / SyntaxError.
    except (
        OSError,
        ValueError,
        SyntaxError,
        image_module.DecompressionBombError,
        image_module.DecompressionBombWarning,
    ) as error:
        raise UserError(f"cannot decode image {path}: {error}") from None
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 C×H×W → uint8 C×size, bilinear with antialiasing (as PIL's resize)."""
    if tuple(image.shape[1:]) == size:
        return image
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 pixels → float32 ``(x / 255 − mean) / std`` per channel."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    return (image.float() / 255.0 - mean_t) / std_t


# ----------------------------------------------------------------------------- datasets


class ImageFolderDataset(Dataset[tuple[Tensor, int, int]]):
    """Items ``(image, label, index)``, decoded and transformed on access.

    ``image`` is uint8 C×H×W, or float32 when ``mean``/``std`` are given. With
    ``augment`` set, the random crop/flip of item ``i`` depends only on
    ``(seed, epoch, i)``: call :meth:`set_epoch` before each epoch (with DataLoader
    workers, before creating the iterator, and without ``persistent_workers``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        size: int | Sequence[int] = 32,
        channels: int = 3,
        augment: Augment | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        _pillow()  # fail now, not inside a DataLoader worker, when Pillow is missing
        if channels not in (1, 3):
            raise UserError(f"image channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise UserError("give both mean and std for normalization, or neither")
        for name, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != channels:
                raise UserError(f"{name} has {len(stats)} values for {channels} channels")
        if std is not None and min(std) <= 0:
            raise UserError(f"std must be positive, got {tuple(std)}")
        self.classes = list(classes) if classes is not None else find_classes(root)
        self.samples = scan(root, split, self.classes)
        self.size = _size_pair(size)
        if augment is not None:
            augment.check_fits(self.size)
        self.channels = channels
        self.augment = augment
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        image = resize(decode(path, self.channels), self.size)
        if self.augment is not None and not self.augment.is_identity:
            # Per-item generator: results independent of worker count and access order.
            seed = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + index
            image = self.augment(image[None], torch.Generator().manual_seed(seed))[0]
        if self.mean is not None and self.std is not None:
            image = normalize(image, self.mean, self.std)
        return image, label, index


def _decode_all(
    samples: list[tuple[Path, int]], size: tuple[int, int], channels: int
) -> ArraySplit:
    images = torch.empty((len(samples), channels, *size), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = resize(decode(path, channels), size)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ArraySplit(images, labels)


def load_image_folder(
    root: str | Path, size: int | Sequence[int] = 32, channels: int = 3
) -> ArrayDataset:
    """Decode ``root/train`` and ``root/val`` into memory; mean/std from the train split.

    ``val`` becomes the ``test`` split of the :class:`ArrayDataset`.
    """
    if channels not in (1, 3):
        raise UserError(f"image channels must be 1 or 3, got {channels}")
    pair = _size_pair(size)
    classes = find_classes(root)
    train_samples, test_samples = scan(root, "train", classes), scan(root, "val", classes)
    count = len(train_samples) + len(test_samples)
    need = count * channels * pair[0] * pair[1]
    if need > MAX_IN_MEMORY_BYTES:
        raise UserError(
            f"{root}: {count} images of {channels}×{pair[0]}×{pair[1]} take "
            f"{need / 2**30:.1f} GiB decoded, over the in_memory limit of "
            f"{MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB; set data.options.in_memory: false "
            "to stream them, or a smaller size"
        )
    train = _decode_all(train_samples, pair, channels)
    test = _decode_all(test_samples, pair, channels)
    moments = [pixel_moments(train.images[:, c].numpy(), 255.0) for c in range(channels)]
    return ArrayDataset(
        name=Path(root).name or "image-folder",
        train=train,
        test=test,
        num_classes=len(classes),
        pixel_max=255.0,
        mean=tuple(m for m, _ in moments),
        std=tuple(s for _, s in moments),
    )


@dataclass(frozen=True)
class ImageFolderSource:
    """An image folder read image by image through a ``DataLoader`` (large folders)."""

    root: Path
    size: tuple[int, int]
    channels: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.channels

    def dataset(self, split: str, augment: Augment | None, seed: int) -> ImageFolderDataset:
        return ImageFolderDataset(
            self.root,
            split,
            self.size,
            self.channels,
            augment,
            self.mean,
            self.std,
            self.classes,
            seed,
        )


MOMENT_SAMPLE = 256  # images decoded to estimate mean/std of a streamed folder


def open_image_folder(
    root: str | Path | None, size: int = 32, channels: int = 3, in_memory: bool = False
) -> ArrayDataset | ImageFolderSource:
    """The folder at ``root``: decoded into memory (``in_memory``) or streamed per image.

    A streamed folder's mean/std come from an evenly spaced sample of
    ``MOMENT_SAMPLE`` training images, so opening it decodes no more than that.
    """
    if root is None:
        raise UserError("image-folder needs data.root: a folder holding train/ and val/")
    if in_memory:
        return load_image_folder(root, size, channels)
    if channels not in (1, 3):
        raise UserError(f"image channels must be 1 or 3, got {channels}")
    pair = _size_pair(size)
    classes = find_classes(root)
    samples = scan(root, "train", classes)
    scan(root, "val", classes)  # fail now on a bad val split, not after training
    step = max(1, len(samples) // MOMENT_SAMPLE)
    sample = _decode_all(samples[::step][:MOMENT_SAMPLE], pair, channels)
    moments = [pixel_moments(sample.images[:, c].numpy(), 255.0) for c in range(channels)]
    return ImageFolderSource(
        Path(root),
        pair,
        channels,
        tuple(classes),
        tuple(m for m, _ in moments),
        tuple(s for _, s in moments),
        len(samples),
    )
