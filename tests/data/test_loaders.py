"""On-disk dataset loaders: IDX (Fashion-MNIST), CIFAR pickles, image folders, downloads.

Every fixture is written in the exact on-disk format of the real files, tiny, in
``tmp_path``; nothing touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import cifar_pixels, dump, make_cifar10, make_cifar100
from torch.utils.data import DataLoader

from smskd.data import cifar, fashion_mnist
from smskd.data.augment import Augment
from smskd.data.cifar import CIFAR10_MEAN, CIFAR100_STD, load_cifar10, load_cifar100
from smskd.data.download import Resource, Source, download
from smskd.data.fashion_mnist import HINT, load_fashion_mnist
from smskd.data.idx import read_idx
from smskd.data.image_folder import ImageFolderDataset, load_image_folder
from smskd.errors import UserError

# ----------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def fake_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.fixture
def fmnist_root(tmp_path: Path) -> Path:
    """Train files gzipped (as distributed), test files plain (as after gunzip)."""
    root = tmp_path / "fmnist"
    root.mkdir()
    write(root / "train-images-idx3-ubyte.gz", idx_bytes(fake_images(5, 0)))
    write(root / "train-labels-idx1-ubyte.gz", idx_bytes(np.array([9, 0, 0, 3, 0], np.uint8)))
    write(root / "t10k-images-idx3-ubyte", idx_bytes(fake_images(3, 1)))
    write(root / "t10k-labels-idx1-ubyte", idx_bytes(np.array([1, 2, 9], np.uint8)))
    return root


def test_fashion_mnist_reads_gz_and_plain_idx(fmnist_root: Path) -> None:
    data = load_fashion_mnist(str(fmnist_root))
    assert data.train.images.shape == (5, 1, 28, 28) and data.test.images.shape == (3, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.labels.tolist() == [9, 0, 0, 3, 0] and data.test.labels.tolist() == [1, 2, 9]
    assert torch.equal(data.test.images[2, 0], torch.from_numpy(fake_images(3, 1)[2]))
    pixels = fake_images(5, 0).astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean()) and data.std[0] == pytest.approx(
        pixels.std(ddof=1)
    )
    assert (data.num_classes, data.pixel_max, data.in_channels) == (10, 255.0, 1)


@pytest.mark.parametrize(
    ("name", "blob", "message"),
    [
        # a labels file where images belong: magic 0x00000801 instead of 0x00000803
        ("train-images-idx3-ubyte", idx_bytes(np.zeros(5, np.uint8)), "expected 0x00000803"),
        ("train-images-idx3-ubyte", b"\x1f\x8b\x08\x00" + bytes(20), "not an IDX file"),
        ("train-images-idx3-ubyte", idx_bytes(fake_images(5, 0), 0x0D), "float32, expected uint8"),
        ("train-images-idx3-ubyte", idx_bytes(fake_images(5, 0))[:-1], "truncated"),
        ("train-images-idx3-ubyte", idx_bytes(fake_images(5, 0)) + b"\0", "trailing bytes"),
        ("train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)), "5 images but"),
        ("train-labels-idx1-ubyte", idx_bytes(np.full(5, 10, np.uint8)), "label 10 outside"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((5, 32, 32), np.uint8)), "expected 28×28"),
    ],
)
def test_idx_errors_name_file_and_fix(
    fmnist_root: Path, name: str, blob: bytes, message: str
) -> None:
    (fmnist_root / f"{name}.gz").unlink()
    write(fmnist_root / name, blob)
    with pytest.raises(UserError, match=message) as caught:
        load_fashion_mnist(str(fmnist_root))
    assert str(fmnist_root) in str(caught.value) and HINT in str(caught.value)


def test_idx_truncated_gzip_and_missing_files(fmnist_root: Path) -> None:
    path = fmnist_root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError, match="corrupt or truncated gzip"):
        load_fashion_mnist(str(fmnist_root))
    path.unlink()
    with pytest.raises(UserError, match=r"missing .*train-images-idx3-ubyte \(or .*\.gz\)"):
        load_fashion_mnist(str(fmnist_root))
    with pytest.raises(UserError, match="install the Debian package dataset-fashion-mnist"):
        load_fashion_mnist(str(fmnist_root / "nowhere"))


def test_idx_header_sizes_are_checked_before_reading(tmp_path: Path) -> None:
    header = struct.pack(">HBB", 0, 0x08, 3)
    # 2³¹·2³¹·4 = 2⁶⁴, 0 in int64: an empty payload used to pass for it.
    wraps = write(tmp_path / "wraps", header + struct.pack(">3I", 2**31, 2**31, 4))
    with pytest.raises(UserError, match=r"truncated: header promises 2147483648×2147483648×4"):
        read_idx(wraps, 3)
    huge = header + struct.pack(">3I", 60000, 65535, 65535)
    with pytest.raises(UserError, match="bytes of gzip data unpack to at most"):
        read_idx(write(tmp_path / "huge.gz", huge + bytes(1000)), 3)


def test_idx_gzip_is_read_no_further_than_the_header_promises(tmp_path: Path) -> None:
    """A small promise followed by a gzip bomb: reading stops one byte past the promise."""
    image = fake_images(1, 0)
    bomb = write(tmp_path / "bomb.gz", idx_bytes(image) + bytes(64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="has trailing bytes"):
            read_idx(bomb, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated for a 784-byte promise"
    assert np.array_equal(read_idx(write(tmp_path / "ok.gz", idx_bytes(image)), 3), image)


def test_read_idx_wrong_dimensions(tmp_path: Path) -> None:
    path = write(tmp_path / "x", idx_bytes(np.zeros((2, 3), np.uint8)))
    with pytest.raises(UserError, match="2 dimensions"):
        read_idx(path, 1)


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not REAL_FMNIST.is_dir(), reason="real Fashion-MNIST absent: apt install dataset-fashion-mnist"
)
def test_real_fashion_mnist() -> None:
    data = load_fashion_mnist()
    assert data.train.images.shape == (60000, 1, 28, 28)
    assert data.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, T-shirt, …
    assert data.mean[0] == pytest.approx(0.2860, abs=1e-4)  # the published statistics
    assert data.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert int(data.train.images.max()) == 255 and int(data.train.images.min()) == 0


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_folder_or_parent(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    for root in (tmp_path, folder):
        data = load_cifar10(str(root))
        assert data.train.images.shape == (10, 3, 32, 32) and data.test.images.shape == (
            2,
            3,
            32,
            32,
        )
        assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert data.test.labels.tolist() == [5, 6]
    # Row-major RGB planes: byte c·1024 + 32·h + w of a row is channel c, pixel (h, w).
    raw = cifar_pixels(2, 1)[1]  # data_batch_2, second image
    image = data.train.images[3]
    for c, h, w in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 31)]:
        assert int(image[c, h, w]) == raw[c * 1024 + 32 * h + w]
    assert (data.num_classes, data.pixel_max, data.mean) == (10, 255.0, CIFAR10_MEAN)


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    fine = load_cifar100(str(tmp_path))
    coarse = load_cifar100(str(tmp_path / "cifar-100-python"), labels="coarse")
    assert fine.train.images.shape == (4, 3, 32, 32) and fine.test.images.shape == (2, 3, 32, 32)
    assert fine.num_classes == 100 and fine.train.labels.tolist() == [99, 98, 97, 96]
    assert coarse.num_classes == 20 and coarse.test.labels.tolist() == [19, 18]
    assert torch.equal(fine.train.images, coarse.train.images) and fine.std == CIFAR100_STD
    with pytest.raises(UserError, match="valid: 'coarse', 'fine'"):
        load_cifar100(str(tmp_path), labels="medium")


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with (folder / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": Exploit(marker), b"labels": []}, file, protocol=2)
    with pytest.raises(UserError, match=r"data_batch_3: refusing to unpickle .*forbidden global"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()
    # Python 3's own protocol 5 route for arrays is not what the official files contain.
    with (folder / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": cifar_pixels(2, 0), b"labels": [0, 1]}, file, protocol=5)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_cifar10(str(tmp_path))
    # Object arrays could smuggle arbitrary elements: refused even via the allowed globals.
    dump(folder / "data_batch_3", {b"data": np.array([1, None], dtype=object), b"labels": []})
    with pytest.raises(UserError, match="object dtype"):
        load_cifar10(str(tmp_path))


def test_cifar_damage_is_reported(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = folder / "data_batch_2"
    dump(batch, {b"data": cifar_pixels(2, 0), b"filenames": []})
    with pytest.raises(UserError, match=r"data_batch_2: missing key b'labels'"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": cifar_pixels(2, 0)[:, :3000], b"labels": [0, 1]})
    with pytest.raises(UserError, match=r"data_batch_2: b'data' has shape \(2, 3000\)"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": cifar_pixels(2, 0), b"labels": [0, 1, 2]})
    with pytest.raises(UserError, match="b'labels' holds 3 labels for 2 images"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": cifar_pixels(2, 0), b"labels": [0, 10]})
    with pytest.raises(UserError, match=r"outside 0\.\.9"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": cifar_pixels(2, 0), b"labels": [0, 1]})
    whole = batch.read_bytes()
    for cut in (1, 40, len(whole) // 2, len(whole) - 1):  # header, array header, pixels, STOP
        batch.write_bytes(whole[:cut])
        with pytest.raises(UserError, match="data_batch_2: corrupt or truncated pickle"):
            load_cifar10(str(tmp_path))
    batch.unlink()
    with pytest.raises(UserError, match=r"missing .*data_batch_2; download cifar-10-python"):
        load_cifar10(str(tmp_path))
    with pytest.raises(UserError, match=r"cifar10 not found: no .*cifar-10-batches-py"):
        load_cifar10(str(tmp_path / "elsewhere"))


class DeclaredArray:
    """Pickles like numpy's own reduce of an array, but declaring ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return np.zeros(0).__reduce__()[0], (np.ndarray, self.shape, b"b")


def _opcodes(*parts: bytes, protocol: int = 2) -> bytes:
    return bytes([0x80, protocol]) + b"".join(parts)


# What CPython's unpickler would allocate before reading: a counted bytes object, a memo
# list as long as the index, numpy.ndarray called with a shape.
DECLARED = {
    "bytes8": (_opcodes(b"\x8e", struct.pack("<Q", 2**62), b"ab", protocol=4), f"{2**62} bytes"),
    "bytes4": (_opcodes(b"B", struct.pack("<I", 2**32 - 1), b"ab", protocol=3), f"{2**32 - 1} b"),
    "memo": (_opcodes(b"Nr", struct.pack("<I", 2**31), b"."), "memo index 2147483648"),
    "memo-text": (_opcodes(b"Np99999999999\n."), "memo index 99999999999"),
    "ndarray-call": (
        _opcodes(b"cnumpy\nndarray\n", b"J\0\0\0\1J\0\0\0\1\x86\x85R."),
        "corrupt or truncated",
    ),
}


@pytest.mark.parametrize("case", DECLARED)
def test_cifar_sizes_a_pickle_declares_are_checked_first(tmp_path: Path, case: str) -> None:
    folder = make_cifar10(tmp_path)
    blob, message = DECLARED[case]
    (folder / "data_batch_5").write_bytes(blob)
    with pytest.raises(UserError, match=rf"data_batch_5: .*{message}"):
        load_cifar10(str(tmp_path))


def test_cifar_arrays_and_labels_are_bounded_by_the_file(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path)
    batch = folder / "data_batch_1"
    dump(batch, {b"data": DeclaredArray((2**40,)), b"labels": [0]})
    with pytest.raises(UserError, match=r"declares an array of 1099511627776 bytes but the file"):
        load_cifar10(str(tmp_path))
    pixels = cifar_pixels(2, 0)
    dump(batch, {b"data": pixels, b"labels": [2**70, 1]})
    with pytest.raises(UserError, match=r"b'labels' outside 0\.\.9 \(min 1, max 1180591620717"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": pixels, b"labels": np.array([2**64 - 1, 0], np.uint64)})
    with pytest.raises(UserError, match=r"outside 0\.\.9"):
        load_cifar10(str(tmp_path))
    # One shared list referenced per image: numpy would expand it to images × its length.
    shared = list(range(1000))
    dump(batch, {b"data": pixels, b"labels": [shared, shared]})
    with pytest.raises(UserError, match="b'labels' is not a list of integers"):
        load_cifar10(str(tmp_path))
    dump(batch, {b"data": pixels, b"labels": np.array([3, 1], np.int32)})
    assert load_cifar10(str(tmp_path)).train.labels[:2].tolist() == [3, 1]


def test_cifar_default_root_follows_smskd_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMSKD_DATA", str(tmp_path))
    make_cifar100(tmp_path / "cifar")
    assert cifar.default_root() == tmp_path / "cifar"
    assert len(load_cifar100().train) == 4
    assert fashion_mnist.default_roots()[-1] == tmp_path / "fashion-mnist"


# ----------------------------------------------------------------------------- image folders


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (*size, 3)).copy()


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    pytest.importorskip("PIL")
    root = tmp_path / "images"
    gradient = np.arange(64, dtype=np.uint8).reshape(8, 8)
    save_png(
        root / "train" / "cat" / "a.png", np.stack([gradient, gradient + 64, gradient * 2], -1)
    )
    save_png(root / "train" / "cat" / "nested" / "b.png", solid((10, 20, 30), (16, 12)))
    save_png(root / "train" / "ant" / "c.png", solid((200, 100, 0)))
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"\0\1")
    save_png(root / "val" / "cat" / "d.png", solid((1, 2, 3)))
    return root


def test_image_folder_dataset(image_root: Path) -> None:
    data = ImageFolderDataset(image_root, "train", size=8)
    assert data.classes == ["ant", "cat"] and len(data) == 3  # sorted; .txt/.DS_Store skipped
    image, label, index = data[0]
    assert (label, index) == (0, 0) and image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert image[:, 0, 0].tolist() == [200, 100, 0]
    image, label, _ = data[1]  # cat/a.png, channel planes exactly as written
    gradient = torch.arange(64, dtype=torch.uint8).view(8, 8)
    assert label == 1 and torch.equal(image, torch.stack([gradient, gradient + 64, gradient * 2]))
    resized, _, _ = data[2]  # 16×12 solid image resized to 8×8: still solid
    assert resized.shape == (3, 8, 8) and bool(
        (resized == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()
    )

    val = ImageFolderDataset(image_root, "val", size=(4, 6), channels=1, mean=[0.5], std=[0.25])
    image, label, _ = val[0]
    assert label == 1 and image.dtype == torch.float32 and image.shape == (1, 4, 6)
    grey = round(0.299 * 1 + 0.587 * 2 + 0.114 * 3)  # Pillow's ITU-R 601-2 luma
    assert torch.allclose(image, torch.full((1, 4, 6), (grey / 255 - 0.5) / 0.25))

    x, y, i = next(iter(DataLoader(data, batch_size=3)))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 1] and i.tolist() == [0, 1, 2]


def test_image_folder_augmentation_is_a_padded_crop_and_reproducible(image_root: Path) -> None:
    plain = ImageFolderDataset(image_root, size=8)[1][0]
    data = ImageFolderDataset(
        image_root, size=8, augment=Augment(crop_padding=2, flip=False), seed=3
    )
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2))
    windows = [padded[:, t : t + 8, s : s + 8] for t in range(5) for s in range(5)]
    first = data[1][0]
    assert any(torch.equal(first, w) for w in windows) and torch.equal(first, data[1][0])
    epochs = []
    for epoch in range(6):
        data.set_epoch(epoch)
        epochs.append(data[1][0])
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    flips = ImageFolderDataset(image_root, size=8, augment=Augment(crop_padding=0, flip=True))
    seen = set()
    for epoch in range(8):
        flips.set_epoch(epoch)
        out = flips[1][0]
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        seen.add(torch.equal(out, plain))
    assert seen == {True, False}


def test_load_image_folder_in_memory(image_root: Path) -> None:
    data = load_image_folder(image_root, size=8)
    assert data.train.images.shape == (3, 3, 8, 8) and data.test.images.shape == (1, 3, 8, 8)
    assert data.num_classes == 2 and data.test.labels.tolist() == [1]
    pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx(pixels.mean((0, 2, 3)).tolist())


def test_image_folder_errors(image_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = image_root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = ImageFolderDataset(image_root, size=8)
    broken = [i for i, (path, _) in enumerate(data.samples) if path == bad]
    with pytest.raises(UserError, match=r"cannot decode image .*broken\.png"):
        data[broken[0]]
    with pytest.raises(UserError, match=r"cannot decode image .*broken\.png"):
        load_image_folder(image_root, size=8)
    bad.unlink()
    (image_root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty holds no images"):
        ImageFolderDataset(image_root)
    (image_root / "train" / "empty").rmdir()
    save_png(image_root / "val" / "dog" / "e.png", solid((0, 0, 0)))
    with pytest.raises(
        UserError, match=r"class 'dog' is not in .*the val classes must be a subset"
    ):
        ImageFolderDataset(image_root, "val")
    with pytest.raises(UserError, match=r"missing folder .*images/nothing/train"):
        ImageFolderDataset(image_root / "nothing")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(UserError, match=r"pip install pillow \(smskd\[images\]\)"):
        ImageFolderDataset(image_root)


# ----------------------------------------------------------------------------- download


def local_source(path: Path, md5: str, **options: object) -> dict[str, Source]:
    return {"demo": Source((Resource(path.as_uri(), md5, path.name),), **options)}  # type: ignore[arg-type]


def md5(blob: bytes) -> str:
    return hashlib.md5(blob, usedforsecurity=False).hexdigest()


def test_download_verifies_then_renames(tmp_path: Path) -> None:
    origin = tmp_path / "origin" / "blob.gz"
    origin.parent.mkdir()
    origin.write_bytes(b"payload" * 1000)
    root = tmp_path / "data"
    assert download("demo", root, local_source(origin, md5(origin.read_bytes()))) == root
    assert (root / "blob.gz").read_bytes() == origin.read_bytes()
    origin.unlink()  # an intact copy is not fetched again
    assert download("demo", root, local_source(origin, md5(b"payload" * 1000))) == root

    origin.write_bytes(b"tampered")
    with pytest.raises(UserError, match=r"checksum mismatch .*the file was deleted"):
        download("demo", tmp_path / "other", local_source(origin, md5(b"payload")))
    assert list((tmp_path / "other").iterdir()) == []  # no partial or unverified file left
    with pytest.raises(UserError, match="cannot download"):
        download("demo", tmp_path / "other", local_source(tmp_path / "absent", md5(b"")))
    with pytest.raises(UserError, match="downloadable: 'cifar10', 'cifar100', 'fashion-mnist'"):
        download("imagenet", root)


def test_download_unpacks_archives_safely(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "build")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sources = local_source(
        archive, md5(archive.read_bytes()), unpack=True, ready="cifar-10-batches-py"
    )
    root = download("demo", tmp_path / "cache", sources)
    assert len(load_cifar10(str(root)).train) == 10

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UserError, match=r"refusing to unpack suspicious member '\.\./escaped'"):
        download(
            "demo", tmp_path / "cache2", local_source(evil, md5(evil.read_bytes()), unpack=True)
        )
    assert not (tmp_path / "escaped").exists()
