"""Batched image augmentation with tensor ops: random crop, horizontal flip, normalization.

Why batched
-----------
torchvision's transforms see one image at a time, so a ``DataLoader`` pays a Python call
and a few tiny kernels per image per op. Our splits already live on the device as one
tensor (:mod:`smskd.data.memory`), so a batch of B images is augmented by a fixed handful
of whole-batch ops whatever B is: one zero-filled padded copy, one ``gather`` that does
the crop and the flip together, and a two-op normalization. On a GPU that is a few kernel
launches per batch instead of a few per image; on a CPU it removes the per-image
interpreter overhead (``benchmarks/augment_throughput.py`` measures the difference).

The ops, on a batch ``[B, C, H, W]`` of ``uint8`` or float pixels
-----------------------------------------------------------------
1. **Random crop with zero padding** (the CIFAR recipe: pad 4, crop back to H×W). The
   batch is copied once into a zero tensor of size (H+2p)×(W+2p); every sample draws an
   offset (dy, dx) uniform in {0, …, 2p}², and output pixel (i, j) reads padded pixel
   (dy + i, dx + j). Offset (p, p) is the identity. The zeros are *raw* pixel zeros
   (black), as torchvision's ``RandomCrop`` pads before ``ToTensor``/``Normalize``:
   after normalization they become −mean/std, not 0.
2. **Random horizontal flip**, each sample with probability 1/2: output column j reads
   column W−1−j of the crop. It is folded into the crop's gather index, so it is free.
3. **Normalization** ``(x / pixel_max − mean) / std`` per channel, computed as
   ``(x − mean·pixel_max) / (std·pixel_max)``: two elementwise ops on the float batch.

Crop and flip run on the raw ``uint8`` pixels when the split is stored that way: the
gather then moves a quarter of the bytes it would move on ``float32``.

Randomness
----------
Every draw comes from an explicit :class:`torch.Generator`: the same generator state gives
the same parameters, and the global RNG (``torch.manual_seed``, weight init, dropout) is
neither read nor advanced. Parameters are drawn (:func:`sample_params`) separately from
being applied (:func:`crop_flip`), so a loader can draw a whole epoch's parameters at once
on a CPU generator — identical on every device — and tests can force exact offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smskd.errors import UserError


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: random crop with ``crop_padding`` zeros, random h-flip.

    The defaults are the standard CIFAR recipe. ``Augment(crop_padding=0, flip=False)``
    is a no-op. Do not flip data whose meaning is not mirror-symmetric (digits, text).
    """

    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip

    def check_fits(self, image_size: tuple[int, int]) -> None:
        """Refuse padding wider than the images: each batch is copied into a zero tensor
        padded on every side, and a crop from beyond the image would see only zeros."""
        side = min(image_size)
        if self.crop_padding > side:
            raise UserError(
                f"data.augment.crop_padding {self.crop_padding} is larger than the "
                f"{image_size[0]}×{image_size[1]} images; use at most {side} "
                "(the CIFAR recipe pads 4 on 32×32)"
            )

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Crop and flip ``images`` (not normalized) with fresh draws from ``generator``."""
        params = sample_params(len(images), self, generator)
        return crop_flip(images, params, self.crop_padding)

    @property
    def views(self) -> int:
        """How many different images it can make of one image: every crop offset, each
        flipped or not. A frozen network's outputs on all of them can be computed once
        (:mod:`smskd.train.output_cache`)."""
        return (2 * self.crop_padding + 1) ** 2 * (2 if self.flip else 1)

    def view_ids(self, params: AugmentParams) -> Tensor:
        """Which of the :attr:`views` each sample of ``params`` is, in ``[0, views)``."""
        span = 2 * self.crop_padding + 1
        crop = params.offset_y * span + params.offset_x
        return crop * 2 + params.flip.long() if self.flip else crop

    def view_params(self, view: int, n: int) -> AugmentParams:
        """``n`` samples' draws that all make view ``view`` (the inverse of :meth:`view_ids`)."""
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} is not in [0, {self.views})")
        crop, flip = divmod(view, 2) if self.flip else (view, 0)
        offset_y, offset_x = divmod(crop, 2 * self.crop_padding + 1)

        def full(value: int) -> Tensor:
            return torch.full((n,), value, dtype=torch.long)

        return AugmentParams(full(offset_y), full(offset_x), full(flip).bool())


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample draws: crop offsets in ``[0, 2·padding]`` and flip flags, each shape [B]."""

    offset_y: Tensor
    offset_x: Tensor
    flip: Tensor

    def __len__(self) -> int:
        return len(self.flip)

    def __getitem__(self, key: slice | Tensor) -> AugmentParams:
        return AugmentParams(self.offset_y[key], self.offset_x[key], self.flip[key])

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(
            self.offset_y.to(device), self.offset_x.to(device), self.flip.to(device)
        )


def sample_params(n: int, augment: Augment, generator: torch.Generator) -> AugmentParams:
    """Draw crop offsets and flips for ``n`` samples on ``generator``'s device.

    Offsets are drawn before flips, so turning ``flip`` off leaves the crops unchanged.
    """
    device = generator.device
    span = 2 * augment.crop_padding + 1
    offset_y = torch.randint(span, (n,), generator=generator, device=device)
    offset_x = torch.randint(span, (n,), generator=generator, device=device)
    if augment.flip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=device)
    return AugmentParams(offset_y, offset_x, flip)


def crop_flip(images: Tensor, params: AugmentParams, padding: int) -> Tensor:
    """Zero-pad by ``padding``, crop H×W at ``params``' offsets, flip where flagged.

    One padded copy and one ``gather`` for the whole batch; the output has the input's
    dtype and device. Offsets must lie in ``[0, 2·padding]`` (unchecked: checking would
    force a device sync every batch).
    """
    if images.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if len(params) != b:
        raise ValueError(f"{len(params)} augmentation draws for a batch of {b}")
    params = params.to(images.device)
    if padding > 0:
        hp, wp = h + 2 * padding, w + 2 * padding
        padded = images.new_zeros((b, c, hp, wp))
        padded[:, :, padding : padding + h, padding : padding + w] = images
    else:
        hp, wp, padded = h, w, images
    rows = params.offset_y[:, None] + torch.arange(h, device=images.device)  # [B, H]
    columns = torch.arange(w, device=images.device)
    # A flip reverses which padded column each output column reads: no second pass.
    columns = params.offset_x[:, None] + torch.where(
        params.flip[:, None], columns.flip(0), columns
    )  # [B, W]
    # Flat index into each padded H'·W' plane; the same for every channel, so expand
    # (a stride-0 view) instead of materializing C copies.
    index = (rows[:, :, None] * wp + columns[:, None, :]).reshape(b, 1, h * w)
    flat = padded.reshape(b, c, hp * wp)
    return flat.gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


class Normalize:
    """``(x / pixel_max − mean) / std`` per channel, with the constants kept on ``device``.

    Built once per loader so that no per-batch host→device copy of mean/std happens.
    """

    def __init__(
        self,
        pixel_max: float,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (1, -1, 1, 1)
        # Folding pixel_max into shift and scale saves one elementwise pass per batch.
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(shape) * pixel_max
        self.scale = torch.tensor(std, dtype=torch.float32, device=device).view(shape) * pixel_max

    def __call__(self, images: Tensor) -> Tensor:
        # copy=True: a fresh float tensor even for float input, so the in-place ops (one
        # allocation per batch instead of three) never touch the caller's tensor.
        out = images.to(torch.float32, copy=True)
        return out.sub_(self.shift).div_(self.scale)
