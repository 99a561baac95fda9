"""The benchmark scripts run and write what run_all collects (at toy sizes: the
figures themselves come from ``python benchmarks/run_all.py``, never from tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import augmented_cache  # noqa: E402
import compute_bound  # noqa: E402
import epoch_speedup  # noqa: E402
import pipeline_speedup  # noqa: E402
import reference_overhead  # noqa: E402
import run_all  # noqa: E402
import smskd_vs_joint  # noqa: E402
import study_precision  # noqa: E402

TOY = ["--repeats", "1", "--quick"]


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        (pipeline_speedup, ["--images", "256"]),
        pytest.param(compute_bound, ["--pairs", "fashion-mnist"], marks=pytest.mark.slow),
        pytest.param(epoch_speedup, ["--images", "256"], marks=pytest.mark.slow),
        pytest.param(smskd_vs_joint, ["--images", "256"], marks=pytest.mark.slow),
        pytest.param(augmented_cache, ["--images", "128"], marks=pytest.mark.slow),
        pytest.param(study_precision, ["--images", "128"], marks=pytest.mark.slow),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_benchmark_writes_its_ratio(module, extra, tmp_path) -> None:
    out = tmp_path / "result.json"
    result = module.main([*TOY, *extra, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio"] == result["ratio"] > 0
    assert saved["definition"] and saved["target"] and saved["environment"]["torch"]


@pytest.mark.slow  # a process per measured path
def test_memory_is_measured_per_path_in_its_own_process(tmp_path) -> None:
    out = tmp_path / "overhead.json"
    result = reference_overhead.main([*TOY, "--pairs", "fashion-mnist", "--out", str(out)])
    assert json.loads(out.read_text())["ratio"] == result["ratio"] > 0
    memory = result["pairs"]["fashion-mnist"]["memory"]
    assert set(memory) == {"kd", "smskd_stage_k"}
    assert all(m["peak_mib"] > 50 for m in memory.values())  # a torch process at least


def test_targets_are_read_the_right_way_round() -> None:
    assert run_all.meets(1.05, "<= 1.10") and not run_all.meets(1.2, "<= 1.10")
    assert run_all.meets(3.5, ">= 3") and not run_all.meets(2.9, ">= 3")
