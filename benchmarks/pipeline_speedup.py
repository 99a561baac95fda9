"""Input pipeline: images/s of our batched augmentation / a DataLoader of per-image transforms.

Both paths do the CIFAR training recipe on random CIFAR-sized ``uint8`` data: zero-pad 4,
random 32×32 crop, random horizontal flip, normalize. The DataLoader path is what the
usual KD loops run (a ``Dataset`` whose ``__getitem__`` transforms one image, default
collation). Both use the *same* draws (from :func:`smskd.data.augment.sample_params`);
an untimed pass first checks that their outputs are identical, so the ratio compares
like with like. Batches are produced and dropped, as a training loop consumes them.

    python benchmarks/pipeline_speedup.py            # 10k images, batch 128, 5 repeats
    python benchmarks/pipeline_speedup.py --quick    # 2k images (< 30 s)
    python benchmarks/pipeline_speedup.py --workers 2

Writes ``benchmarks/results/pipeline_speedup.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import environment
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from smskd.data.augment import Augment, AugmentParams, Normalize, crop_flip, sample_params

MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10 statistics, as a realistic constant
STD = (0.2470, 0.2435, 0.2616)
DEFAULT_OUT = Path(__file__).parent / "results" / "pipeline_speedup.json"
TARGET = 3.0
FIELDS = ("offset_y", "offset_x", "flip")


def batched_batches(
    images: Tensor, batch: int, augment: Augment, normalize: Normalize
) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        params = sample_params(len(x), augment, generator)
        yield normalize(crop_flip(x, params, augment.crop_padding))


def _one_image(x: Tensor, params: AugmentParams, i: int, pad: int, normalize: Normalize) -> Tensor:
    h, w = x.shape[-2:]
    dy, dx = int(params.offset_y[i]), int(params.offset_x[i])
    crop = F.pad(x, (pad, pad, pad, pad))[:, dy : dy + h, dx : dx + w]
    if params.flip[i]:
        crop = crop.flip(-1)
    return normalize(crop[None])[0]


class PerImageDataset(Dataset):
    """One image per ``__getitem__``, transformed on its own, as per-image pipelines do."""

    def __init__(self, images: Tensor, params: AugmentParams, pad: int, normalize: Normalize):
        self.images, self.params, self.pad, self.normalize = images, params, pad, normalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return _one_image(self.images[i], self.params, i, self.pad, self.normalize)


def loader_batches(
    images: Tensor, batch: int, augment: Augment, normalize: Normalize, workers: int
) -> Iterator[Tensor]:
    """A DataLoader over per-image transforms with the draws of :func:`batched_batches`."""
    generator = torch.Generator().manual_seed(0)
    draws = [
        sample_params(len(images[s : s + batch]), augment, generator)
        for s in range(0, len(images), batch)
    ]
    params = AugmentParams(*(torch.cat([getattr(d, f) for d in draws]) for f in FIELDS))
    dataset = PerImageDataset(images, params, augment.crop_padding, normalize)
    yield from DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)


def _time(batches: Callable[[], Iterator[Tensor]], device: torch.device) -> float:
    """Seconds for one pass; batches are consumed and dropped, as a training step would."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in batches():
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--images", type=int, default=None, help="default 10000 (2048 quick)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="default 5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (2048 if args.quick else 10_000)
    repeats = args.repeats or 5
    device = torch.device(args.device)

    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    ).to(device)
    augment = Augment(crop_padding=4, flip=True)
    normalize = Normalize(255.0, MEAN, STD, device)
    paths: dict[str, Callable[[], Iterator[Tensor]]] = {
        "batched": lambda: batched_batches(images, args.batch, augment, normalize),
        "per_image_dataloader": lambda: loader_batches(
            images, args.batch, augment, normalize, args.workers
        ),
    }
    # Same draws, so the outputs must match exactly; checked outside the timed passes.
    for fast, slow in zip(paths["batched"](), paths["per_image_dataloader"](), strict=True):
        if not torch.equal(fast, slow):
            raise SystemExit("batched and per-image outputs differ: the comparison is invalid")

    # Interleaved repeats, so that load from other processes hits both paths alike.
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, batches in paths.items():
            seconds[name].append(_time(batches, device))

    rows = {
        name: {
            "seconds": times,
            "median_seconds": statistics.median(times),
            "images_per_s_median": n / statistics.median(times),
            "images_per_s_best": n / min(times),
        }
        for name, times in seconds.items()
    }
    fast, slow = rows["batched"], rows["per_image_dataloader"]
    ratio = fast["images_per_s_median"] / slow["images_per_s_median"]
    ratio_best = fast["images_per_s_best"] / slow["images_per_s_best"]
    result = {
        "benchmark": "pipeline_speedup",
        "definition": "images/s of batched in-memory augmentation / images/s of a DataLoader "
        "over per-image transforms (same draws, identical tensors)",
        "target": f">= {TARGET}",
        "ratio": ratio,
        "dataloader_workers": args.workers,
        "recipe": "pad 4 + random crop 32x32 + random hflip + normalize, uint8 input",
        "images": n,
        "batch": args.batch,
        "repeats": repeats,
        "quick": args.quick,
        "device": str(device),
        "environment": environment(device),
        "outputs_identical": True,
        "results": rows,
        "ratio_best": ratio_best,
    }

    print(f"{n} images 3x32x32 uint8, batch {args.batch}, {repeats} repeats, device {device}")
    print(f"{'path':<22}{'median s':>10}{'img/s (median)':>17}{'img/s (best)':>15}")
    for name, row in rows.items():
        print(
            f"{name:<22}{row['median_seconds']:>10.3f}"
            f"{row['images_per_s_median']:>17,.0f}{row['images_per_s_best']:>15,.0f}"
        )
    print(
        f"pipeline_speedup, batched / DataLoader: {ratio:.1f}x (median), {ratio_best:.1f}x (best)"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
