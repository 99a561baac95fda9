"""The shipped recipes run end to end on tiny fabricated (or real) data.

CIFAR-100 runs need a GPU; here each paper-pair config runs one step an epoch (teacher
and three stages) on a fabricated CIFAR-100 folder in the exact pickle format, with its
real models, so a config that cannot run (a bad tap, an unbridgeable FitNets pair)
fails in CI.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fakes import make_cifar100

from smskd.config import load_config
from smskd.data.fashion_mnist import DEBIAN_ROOT
from smskd.experiment import distill

ROOT = Path(__file__).resolve().parents[1]
TINY = ["teacher.epochs=1", "stages.*.epochs=1", "data.batch_size=8", "data.eval_batch_size=16"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100(root, train=8, test=8)  # one batch of 8: a step an epoch
    return root


@pytest.mark.slow  # the paper's CIFAR-100 models
@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "cifar100").glob("*.yaml")))
def test_cifar100_paper_pairs_run_a_few_steps(config: Path, cifar_root: Path, tmp_path) -> None:
    cfg = load_config(config, [*TINY, f"data.root={cifar_root}"])
    result = distill(cfg, tmp_path / "run", progress=False)
    assert [r["stage_name"] for r in result.history] == ["kd", "fitnets", "rkd"]
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert "train_reference" in result.history[-1]


def test_image_folder_streams_through_a_dataloader(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    for split, count in (("train", 6), ("val", 2)):
        for label, colour in enumerate(((250, 10, 10), (10, 10, 250))):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((12, 10, 3), colour, dtype=np.uint8)
                pixels[i % 12] = 128  # differ a little
                image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = load_config(
        {
            "data": {
                "name": "image-folder",
                "root": str(tmp_path / "images"),
                "batch_size": 4,
                "num_workers": 0,
                "options": {"size": 16},
            },
            "teacher": {"model": "convnet-s", "epochs": 1},
            "student": {"model": "convnet-xs"},
            "stages": [{"methods": ["kd"], "epochs": 2}, {"methods": ["crd"], "epochs": 1}],
        }
    )
    result = distill(cfg, tmp_path / "run", progress=False)
    assert [r["stage"] for r in result.history] == [1, 1, 2]
    assert math.isfinite(result.history[-1]["train_crd"])  # indices reach CRD's memory


@pytest.mark.slow  # reads the 70,000 real images and evaluates on all 10,000 test images
@pytest.mark.skipif(not DEBIAN_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_recipe_on_the_real_files(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "configs" / "fashion-mnist.yaml",
        [*TINY, "data.train_subset=256", "teacher.model=convnet-s"],
    )
    result = distill(cfg, tmp_path / "run", progress=False)
    assert len(result.history) == 3
    assert result.final_accuracy > 20  # 10 classes (chance 10%), one epoch on 256 images
