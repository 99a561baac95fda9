"""DDP through torchrun on the CPU (Gloo): two real processes, one run directory."""

from __future__ import annotations

import contextlib
import json
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
    # A validation split and the best-validation snapshot: every rank must anchor to the
    # same reference, after a kill too; rank 0 alone measures forgetting.
    "data": {"name": "digits", "batch_size": 32, "val_split": 200},
    "teacher": {"model": "convnet-s", "epochs": 1},
    "student": {"model": "convnet-xs"},
    "stages": [{"methods": ["kd"], "epochs": 2}, {"methods": ["crd"], "epochs": 2}],
    "reference": {"snapshot": "best"},
    "checkpoint_every_steps": 4,
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="no Gloo backend")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (workers run in sessions of their own),
    and wait until every one of them is gone."""
    listed = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    workers = [int(pid) for pid in listed.stdout.split()]
    for pid in [proc.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "Z"


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


@pytest.mark.slow  # torchrun: real processes, as all tests here
def test_torchrun_trains_and_only_rank_0_writes(clean_run) -> None:
    _, out, proc = clean_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("student test acc") == 1  # one report, not one per rank
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [f for f in files if not f.endswith(".sha256")] == [
        "last.prev.pt",
        "last.pt",
        "stage1-best.pt",
        "stage1.pt",
        "stage2-best.pt",
        "stage2-methods.pt",
        "stage2.pt",
    ]
    assert len(json.loads((out / "forgetting.json").read_text())["rows"]) == 2
    assert torch.load(out / "student.pt", weights_only=True)


@pytest.mark.slow
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
    kill_job(proc)
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
    from smskd.models.convnet import ConvNet
    from smskd.train.distributed import data_parallel, sync_buffers
    from smskd.train.epoch import StageObjective, train_epoch
    from smskd.train.stage import build_stage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    data = load_digits()
    train = InMemoryLoader(data.train, data, 32, shuffle=True, rank=rank, world_size=2)
    torch.manual_seed(0)
    student, teacher = ConvNet(10, 1, (4, 8, 8)), ConvNet(10, 1, (8, 16, 16)).eval()
    stage = Stage(methods=["crd"], epochs=1)
    built = build_stage(
        stage, student, teacher, None, next(iter(train)), torch.device("cpu"), len(data.train)
    )
    models, methods = built.models, built.methods
    models.student = data_parallel(student, methods, torch.device("cpu"))
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


@pytest.mark.slow
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


MLP_MODULE = """
from torch import nn

def mlp(num_classes, in_channels, width=32):
    # No BatchNorm: per-rank batch statistics are the one thing DDP cannot make equal.
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))
"""


def _gpt2(layers: int, width: int) -> dict:
    kwargs = {"n_layer": layers, "n_embd": width, "n_head": 2, "n_positions": 32}
    return {"name": "gpt2", "kwargs": kwargs}


IMAGES = {
    "teacher": {"model": {"factory": "ddp_mlp:mlp", "kwargs": {"width": 64}}, "epochs": 1},
    "student": {"model": {"factory": "ddp_mlp:mlp", "taps": {"features": ["2", "4"]}}},
    "stages": [
        {"methods": ["kd"], "epochs": 1},
        {"methods": [{"name": "fitnets", "student_layer": "4", "teacher_layer": "4"}], "epochs": 1},
    ],
    "data": {"name": "digits"},
}
# Short documents (JSON lines of 5 to 40 characters) in windows of 16: most windows are
# padded, so the ranks' batches hold different numbers of tokens in the loss.
# SGD: Adam would turn float noise into whole steps for the key biases of attention,
# whose gradient is zero in exact arithmetic (softmax ignores a shift).
TEXT = {
    "teacher": {"model": _gpt2(2, 16), "epochs": 1},
    "student": {"model": _gpt2(1, 8)},
    "stages": [{"methods": ["lm-kd"], "epochs": 1}, {"methods": ["lm-hidden"], "epochs": 1}],
    "data": {"name": "text", "options": {"seq_len": 16}},
}


def write_documents(folder: Path) -> str:
    """train/val/test JSON lines cut from a fixed text at fixed, varied lengths."""
    text = "Now is the winter of our discontent made glorious summer by this sun of York; " * 40
    folder.mkdir()
    for split, count in (("train", 400), ("val", 20), ("test", 20)):
        lines, start = [], 0
        for i in range(count):
            length = 5 + (i * 7) % 36
            lines.append(json.dumps({"text": text[start : start + length]}))
            start = (start + 13) % 1000
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["images", "text"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path: Path, case) -> None:
    """2 ranks × 32 equal 1 process × 64: rank r takes every 2nd sample of the same
    permutation, so each global batch holds the same 64 samples, and DDP averages the
    ranks' losses into the global mean — per sample, or per token for text, where the
    ranks' token counts differ (padding) and each rank's loss is weighed by its share."""
    (tmp_path / "ddp_mlp.py").write_text(MLP_MODULE)
    common = {"seed": 1, **(IMAGES if case == "images" else TEXT)}
    if case == "text":
        pytest.importorskip("transformers")
        common["data"] = {**TEXT["data"], "root": write_documents(tmp_path / "text")}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    runs, logged = {}, {}
    for name, batch, launcher in (("one", 64, [sys.executable]), ("two", 32, TORCHRUN)):
        config = tmp_path / f"{name}.yaml"
        data = {**common["data"], "batch_size": batch}
        config.write_text(yaml.safe_dump({**common, "data": data}))
        cmd = [
            *launcher,
            "-m",
            "smskd",
            "distill",
            str(config),
            "--out",
            str(tmp_path / name),
            "--no-progress",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "student.pt", weights_only=True)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logged[name] = [json.loads(line)["train_loss"] for line in lines]
    for key, value in runs["one"].items():
        assert torch.allclose(runs["two"][key], value, atol=1e-5), key
    assert logged["two"] == pytest.approx(logged["one"], rel=1e-5)  # the same mean logged


@pytest.mark.slow
def test_a_rank_failing_leaves_a_loadable_checkpoint(clean_run, tmp_path: Path) -> None:
    from smskd.store.checkpoint import safe_load

    config, clean, _ = clean_run
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        distill(config, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    victim = int(workers.stdout.split()[-1])  # one worker dies; torchrun stops the other
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert safe_load(out / "checkpoints" / "last.pt")["student"]  # whole, not torn
    resumed = subprocess.run(
        distill(config, out, "--resume"), capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = torch.load(out / "student.pt", weights_only=True)
    theirs = torch.load(clean / "student.pt", weights_only=True)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


FLAKY_MODULE = """
import os
import torch
from torch import nn

class Flaky(nn.Module):
    '''An MLP whose third training forward on rank 1 alone gives NaN logits.'''

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if os.environ.get("RANK") == "1" and self.calls == 3:
                out = out * float("nan")
        return out
"""


@pytest.mark.slow
def test_a_batch_skipped_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """nonfinite: skip under DDP: the ranks decide together, so the one whose loss is
    NaN does not leave the others waiting in their gradient all-reduce."""
    (tmp_path / "flaky.py").write_text(FLAKY_MODULE)
    config = {
        "seed": 0,
        "data": {"name": "digits", "batch_size": 32},
        "student": {"model": {"factory": "flaky:Flaky"}},
        "stages": [{"methods": [], "epochs": 1}],
        "nonfinite": "skip",
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    cmd = [*TORCHRUN, "-m", "smskd", "distill", str(tmp_path / "run.yaml"),
           "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_skipped_batches"] == 1
