"""DDP through torchrun on the CPU (Gloo): two real processes, one run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

CONFIG = {
    "seed": 0,
    "data": {"name": "digits", "batch_size": 32},
    "teacher": {"model": "convnet-s", "epochs": 1},
    "student": {"model": "convnet-xs"},
    "stages": [{"methods": ["kd"], "epochs": 2}, {"methods": ["crd"], "epochs": 2}],
    "checkpoint_every_steps": 4,
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="no Gloo backend")


def distill(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        *TORCHRUN,
        "-m",
        "smskd",
        "distill",
        str(config),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("ddp")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        distill(config, root / "clean"), capture_output=True, text=True, timeout=300, env=env
    )
    return config, root / "clean", proc


def test_torchrun_trains_and_only_rank_0_writes(clean_run) -> None:
    _, out, proc = clean_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("student test acc") == 1  # one report, not one per rank
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.pt",
        "stage1.pt",
        "stage2.pt",
    ]
    assert torch.load(out / "student.pt", weights_only=True)


def test_killed_ddp_run_resumes_bit_identically(clean_run, tmp_path: Path) -> None:
    config, clean, _ = clean_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        distill(config, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "stage1.pt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
    proc.wait(timeout=60)
    resumed = subprocess.run(
        distill(config, out, "--resume"), capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = torch.load(out / "student.pt", weights_only=True)
    theirs = torch.load(clean / "student.pt", weights_only=True)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def _rank_main(rank: int, init_file: str, results: str) -> None:
    from smskd.config import ReferenceConfig, Stage
    from smskd.data.digits import load_digits
    from smskd.data.memory import InMemoryLoader
    from smskd.distributed import sync_buffers
    from smskd.engine import StageObjective, train_epoch
    from smskd.models.convnet import ConvNet
    from smskd.pipeline import _build_stage, _data_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    data = load_digits()
    train = InMemoryLoader(data.train, data, 32, shuffle=True, rank=rank, world_size=2)
    torch.manual_seed(0)
    student, teacher = ConvNet(10, 1, (4, 8, 8)), ConvNet(10, 1, (8, 16, 16)).eval()
    stage = Stage(methods=["crd"], epochs=1)
    models, methods = _build_stage(
        stage, student, teacher, None, next(iter(train)), torch.device("cpu"), len(data.train)
    )
    models.student = _data_parallel(student, methods, torch.device("cpu"))
    crd = methods[0]
    optimizer = torch.optim.SGD([*student.parameters(), *crd.parameters()], lr=0.1)
    objective = StageObjective(1.0, [(crd, 1.0)], ReferenceConfig())
    metrics = train_epoch(models, objective, train, optimizer, torch.device("cpu"))
    sync_buffers(student)  # as the pipeline does after every epoch: BN statistics of rank 0
    state = {
        "steps": len(train),
        "student": student.state_dict(),
        "helpers": {k: v for k, v in crd.state_dict().items() if "embed" in k},
        "memory_s": crd.memory_s,
        "log_z": crd.log_z,
        "loss": metrics["loss"],
    }
    torch.save(state, f"{results}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_stay_in_lockstep_student_helpers_and_crd_memory(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["steps"] == b["steps"] == -(-(1438 // 2) // 32)  # each rank: half the data
    for part in ("student", "helpers"):  # DDP averaged every gradient, helpers' too
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["memory_s"], b["memory_s"])  # every rank applied every update
    assert torch.equal(a["log_z"], b["log_z"])
    assert a["loss"] == b["loss"]  # epoch metrics are reduced over ranks
