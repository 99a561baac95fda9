"""Batched augmentation (crop, flip, normalize) and the loader's augmentation and sharding."""

from __future__ import annotations

import pytest
import torch

from smskd.data.augment import Augment, AugmentParams, Normalize, crop_flip, sample_params
from smskd.data.memory import ArrayDataset, ArraySplit, InMemoryLoader


def _params(dy: list[int], dx: list[int], flip: list[bool]) -> AugmentParams:
    return AugmentParams(torch.tensor(dy), torch.tensor(dx), torch.tensor(flip))


def _toy(n: int = 10, channels: int = 3, size: int = 6) -> ArrayDataset:
    """``n`` images whose every pixel of image i differs (values 1..255, never 0)."""
    g = torch.Generator().manual_seed(123)
    images = torch.randint(1, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    split = ArraySplit(images, labels)
    return ArrayDataset(
        name="toy",
        train=split,
        test=split,
        num_classes=4,
        pixel_max=255.0,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


IMAGE = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
# [[ 1,  2,  3,  4],
#  [ 5,  6,  7,  8],
#  [ 9, 10, 11, 12],
#  [13, 14, 15, 16]]


# ---------------------------------------------------------------- crop and flip by hand


def test_centre_offset_is_identity() -> None:
    out = crop_flip(IMAGE, _params([2], [2], [False]), padding=2)
    assert torch.equal(out, IMAGE) and out.dtype == torch.uint8


def test_crop_at_forced_offsets_matches_hand_computed() -> None:
    # Padding 2 puts the image at rows/cols 2..5 of an 8×8 zero canvas; offset (dy=0, dx=3)
    # reads canvas rows 0..3, cols 3..6: two zero rows, then image rows 0..1 shifted left by one.
    out = crop_flip(IMAGE, _params([0], [3], [False]), padding=2)
    expected = torch.tensor(
        [[0, 0, 0, 0], [0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0]], dtype=torch.uint8
    )
    assert torch.equal(out[0, 0], expected)
    # Bottom-left corner offset (dy=4, dx=0): image rows 2..3, cols 0..1 land bottom-right.
    out = crop_flip(IMAGE, _params([4], [0], [False]), padding=2)
    expected = torch.tensor(
        [[0, 0, 9, 10], [0, 0, 13, 14], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8
    )
    assert torch.equal(out[0, 0], expected)


def test_flip_reverses_columns_and_composes_with_crop() -> None:
    flipped = crop_flip(IMAGE, _params([1], [1], [True]), padding=1)
    assert torch.equal(flipped, IMAGE.flip(-1))
    # Flip is applied to the crop: crop at (0, 3) of a pad-2 canvas, then reverse columns.
    crop = crop_flip(IMAGE, _params([0], [3], [False]), padding=2)
    both = crop_flip(IMAGE, _params([0], [3], [True]), padding=2)
    assert torch.equal(both, crop.flip(-1))
    assert torch.equal(both[0, 0, 3], torch.tensor([0, 8, 7, 6], dtype=torch.uint8))


def test_padding_is_zero_for_every_dtype_and_channel() -> None:
    for dtype in (torch.uint8, torch.float32):
        ones = torch.ones(2, 3, 5, 5, dtype=dtype)
        out = crop_flip(ones, _params([0, 6], [6, 0], [False, True]), padding=3)
        assert out.dtype == dtype
        # Sample 0 (dy=0, dx=6): 3 zero rows on top, 3 zero columns on the right.
        assert out[0, :, :3].eq(0).all() and out[0, :, :, 2:].eq(0).all()
        assert out[0, :, 3:, :2].eq(1).all()
        # Sample 1 (dy=6, dx=0, flipped): zero rows at the bottom, zero columns on the right.
        assert out[1, :, 2:].eq(0).all() and out[1, :, :, 2:].eq(0).all()
        assert out[1, :, :2, :2].eq(1).all()


def test_batch_matches_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 7, 9), dtype=torch.uint8, generator=g)
    params = sample_params(64, Augment(crop_padding=3), g)
    out = crop_flip(images, params, padding=3)
    for i in range(64):
        canvas = torch.nn.functional.pad(images[i].float(), (3, 3, 3, 3))
        dy, dx = int(params.offset_y[i]), int(params.offset_x[i])
        ref = canvas[:, dy : dy + 7, dx : dx + 9]
        if params.flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i].float(), ref), i


def test_zero_padding_and_no_flip_is_identity_and_non_contiguous_input() -> None:
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    assert not images.is_contiguous()
    aug = Augment(crop_padding=0, flip=False)
    assert aug.is_identity
    assert torch.equal(aug(images, torch.Generator().manual_seed(0)), images)


def test_rejects_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        crop_flip(IMAGE[0], _params([0], [0], [False]), padding=0)
    with pytest.raises(ValueError, match="2 augmentation draws"):
        crop_flip(IMAGE, _params([0, 0], [0, 0], [False, False]), padding=0)


def test_normalize_matches_formula() -> None:
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = Normalize(255.0, mean, std)(x)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (x.float() / 255 - m) / s, atol=1e-5)
    floats = x.float()
    kept = floats.clone()
    Normalize(255.0, mean, std)(floats)
    assert torch.equal(floats, kept)  # float input is not normalized in place


# ---------------------------------------------------------------- randomness


def test_draws_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = sample_params(100, Augment(), torch.Generator().manual_seed(7))
    torch.manual_seed(999)  # a different global seed changes nothing
    b = sample_params(100, Augment(), torch.Generator().manual_seed(7))
    torch.set_rng_state(state)
    for x, y in ((a.offset_y, b.offset_y), (a.offset_x, b.offset_x), (a.flip, b.flip)):
        assert torch.equal(x, y)
    torch.manual_seed(1)
    sample_params(100, Augment(), torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)


def test_augmentation_statistics() -> None:
    n = 20_000
    params = sample_params(n, Augment(crop_padding=4), torch.Generator().manual_seed(0))
    assert abs(params.flip.float().mean().item() - 0.5) < 0.02  # σ ≈ 0.0035
    for offsets in (params.offset_y, params.offset_x):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and offsets.min() == 0 and offsets.max() == 8
        assert (counts - n / 9).abs().max() < 0.1 * n / 9  # uniform over {0..8}
    # Offsets are drawn before flips: disabling flip keeps the crops.
    no_flip = sample_params(
        n, Augment(crop_padding=4, flip=False), torch.Generator().manual_seed(0)
    )
    assert torch.equal(no_flip.offset_x, params.offset_x) and not no_flip.flip.any()


# ---------------------------------------------------------------- loader: augmentation


def _batches(loader: InMemoryLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_augmentation_is_deterministic_per_epoch() -> None:
    data = _toy(n=40, size=8)

    def make() -> InMemoryLoader:
        return InMemoryLoader(data.train, data, 8, shuffle=True, seed=3, augment=Augment())

    first, resumed = make(), make()
    _batches(first, 0)  # a resumed run starts at epoch 2 without having seen epochs 0–1
    epoch2 = _batches(first, 2)
    again = _batches(resumed, 2)
    for (xa, ya, ia, _), (xb, yb, ib, _) in zip(epoch2, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    other = _batches(make(), 3)
    assert not torch.equal(torch.cat([b[0] for b in other]), torch.cat([b[0] for b in epoch2]))


@pytest.mark.parametrize("augment", [Augment(2, True), Augment(1, False), Augment(0, True)])
def test_each_batch_names_the_view_every_sample_is(augment) -> None:
    """A cache of outputs is read by (sample, view): the view a batch names must be the
    image the loader made, as every_sample(view=...) makes it."""
    data = _toy(n=40, size=8)
    loader = InMemoryLoader(data.train, data, 8, shuffle=True, seed=5, augment=augment)
    assert loader.views == (2 * augment.crop_padding + 1) ** 2 * (2 if augment.flip else 1)
    by_view = [torch.cat([x for x, _ in loader.every_sample(16, v)]) for v in range(loader.views)]
    seen = set()
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, _, index, view in loader:
            for i in range(len(index)):
                assert torch.equal(x[i], by_view[int(view[i])][int(index[i])])
            seen |= set(view.tolist())
    assert len(seen) > loader.views // 2  # the draws cover the views, not one of them
    with pytest.raises(ValueError, match="view"):
        augment.view_params(loader.views, 1)


def test_loader_augmentation_changes_pixels_not_order() -> None:
    data = _toy(n=40, size=8)
    plain = InMemoryLoader(data.train, data, 8, shuffle=True, seed=3)
    augmented = InMemoryLoader(data.train, data, 8, shuffle=True, seed=3, augment=Augment())
    xs_plain, xs_aug = [], []
    for (xp, yp, ip), (xa, ya, ia, _) in zip(plain, augmented, strict=True):
        assert torch.equal(ip, ia) and torch.equal(yp, ya)
        xs_plain.append(xp)
        xs_aug.append(xa)
    x_plain, x_aug = torch.cat(xs_plain), torch.cat(xs_aug)
    assert not torch.equal(x_plain, x_aug)
    # Padding pixels are raw zeros, normalized: (0 − 0.5) / 0.25 = −2 (the toy has no 0 pixel).
    assert (x_aug == -2.0).any() and not (x_plain == -2.0).any()


def test_loader_refuses_augmenting_evaluation() -> None:
    data = _toy()
    with pytest.raises(ValueError, match="training"):
        InMemoryLoader(data.test, data, 4, shuffle=False, augment=Augment())


def test_loader_without_augment_keeps_historical_order() -> None:
    # Resumed runs from before augmentation/sharding existed must see the same batches.
    data = _toy(n=30)
    loader = InMemoryLoader(data.train, data, 7, shuffle=True, seed=5)
    loader.set_epoch(4)
    expected = torch.randperm(30, generator=torch.Generator().manual_seed(5 * 1_000_003 + 4))
    assert torch.equal(torch.cat([index for _, _, index in loader]), expected)


# ---------------------------------------------------------------- loader: sharding


def _ranks(data: ArrayDataset, world: int, **kwargs: object) -> list[InMemoryLoader]:
    return [
        InMemoryLoader(data.train, data, rank=r, world_size=world, **kwargs)  # type: ignore[arg-type]
        for r in range(world)
    ]


@pytest.mark.parametrize("n", [10, 12])
def test_training_shards_cover_all_equal_size_pad_by_wrapping(n: int) -> None:
    data, world = _toy(n=n), 4
    loaders = _ranks(data, world, batch_size=2, shuffle=True, seed=1)
    shards = [torch.cat([i for _, _, i in loader]) for loader in loaders]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    assert len({len(loader) for loader in loaders}) == 1
    union = torch.cat(shards)
    assert set(union.tolist()) == set(range(n))
    # Interleaving the shards rebuilds the permutation padded with its own head.
    interleaved = torch.stack(shards, 1).flatten()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1 * 1_000_003 + 0))
    pad = len(interleaved) - n
    assert torch.equal(interleaved, torch.cat([perm, perm[:pad]]))
    # Duplicates are exactly the documented padding.
    assert len(union) - len(set(union.tolist())) == pad


def test_training_shards_reshuffle_per_epoch() -> None:
    data = _toy(n=13)
    loaders = _ranks(data, 3, batch_size=3, shuffle=True, seed=0)
    epoch0 = [loader.epoch_indices() for loader in loaders]
    for loader in loaders:
        loader.set_epoch(1)
    epoch1 = [loader.epoch_indices() for loader in loaders]
    assert not torch.equal(torch.stack(epoch0), torch.stack(epoch1))
    assert set(torch.cat(epoch1).tolist()) == set(range(13))


def test_evaluation_shards_cover_every_sample_exactly_once() -> None:
    data = _toy(n=10)
    loaders = _ranks(data, 3, batch_size=3, shuffle=False)
    shards = [torch.cat([i for _, _, i in loader]) for loader in loaders]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert torch.equal(torch.cat(shards), torch.arange(10))  # contiguous, in order, no pad
    assert [len(loader) for loader in loaders] == [2, 1, 1]


def test_more_ranks_than_samples() -> None:
    data = _toy(n=3)
    evaluation = _ranks(data, 5, batch_size=2, shuffle=False)
    assert [len(loader) for loader in evaluation] == [1, 1, 1, 0, 0]
    assert torch.equal(
        torch.cat([loader.epoch_indices() for loader in evaluation]), torch.arange(3)
    )
    training = _ranks(data, 5, batch_size=2, shuffle=True)
    assert [len(list(loader)) for loader in training] == [1] * 5


def test_augmentation_independent_of_world_size() -> None:
    # The sample at position p of the epoch is augmented alike whatever the rank count.
    data, aug = _toy(n=16, size=8), Augment()
    single = InMemoryLoader(data.train, data, 16, shuffle=True, seed=2, augment=aug)
    single.set_epoch(5)
    x_all = next(iter(single))[0]
    for r, loader in enumerate(_ranks(data, 2, batch_size=8, shuffle=True, seed=2, augment=aug)):
        loader.set_epoch(5)
        assert torch.equal(next(iter(loader))[0], x_all[r::2])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_len_matches_what_is_yielded(shuffle: bool, drop_last: bool) -> None:
    for n in (1, 7, 10):
        data = _toy(n=n, size=4)
        for world in (1, 2, 3, 4):
            for batch in (1, 3, 5):
                for loader in _ranks(
                    data, world, batch_size=batch, shuffle=shuffle, drop_last=drop_last
                ):
                    sizes = [len(i) for _, _, i in loader]
                    assert len(sizes) == len(loader), (n, world, batch)
                    if loader.drop_last:
                        assert set(sizes) <= {batch}
                    assert sum(sizes) <= loader.num_samples


def test_loader_rejects_bad_rank() -> None:
    data = _toy()
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            InMemoryLoader(data.train, data, 4, shuffle=True, rank=rank, world_size=world)
