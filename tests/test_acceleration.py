"""Speed switches (precision, channels_last, torch.compile, teacher-output cache):
each one against the plain fp32 path, at the same weights and over whole runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import smskd.train.epoch as engine
from smskd.config import PerformanceConfig, ReferenceConfig, Stage, load_config
from smskd.data.augment import Augment
from smskd.data.memory import ArrayDataset, ArraySplit, InMemoryLoader
from smskd.errors import UserError
from smskd.models.convnet import ConvNet
from smskd.store.checkpoint import atomic_save, safe_load
from smskd.train.acceleration import Acceleration
from smskd.train.epoch import StageObjective, step_loss
from smskd.train.output_cache import cache_outputs
from smskd.train.reference import make_reference
from smskd.train.stage import build_stage
from smskd.train.stages import run_stages

QUIET = {"progress": False, "log": lambda _: None}
CPU = torch.device("cpu")


def array_dataset(n_train: int = 128, n_test: int = 64) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (n_train + n_test, 1, 8, 8), dtype=torch.uint8, generator=generator
    )
    labels = (images.flatten(1).float() @ torch.randn(64, 3, generator=generator)).argmax(1)
    return ArrayDataset(
        "random",
        ArraySplit(images[:n_train], labels[:n_train]),
        ArraySplit(images[n_train:], labels[n_train:]),
        num_classes=3,
        pixel_max=255.0,
        mean=(0.5,),
        std=(0.25,),
    )


@pytest.fixture
def loaders() -> tuple[InMemoryLoader, InMemoryLoader]:
    data = array_dataset()
    train = InMemoryLoader(data.train, data, 32, shuffle=True, seed=0, drop_last=True)
    test = InMemoryLoader(data.test, data, 64, shuffle=False)
    return train, test


def net(seed: int, widths: tuple[int, ...]) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(num_classes=3, in_channels=1, widths=widths)


def one_step(options: dict, train: InMemoryLoader) -> tuple[dict[str, float], torch.Tensor]:
    """The loss terms and the flat gradient of one SMSKD stage-2 step (KD + FitNets +
    the reference term), with fixed weights: only ``options`` differ between calls."""
    acceleration = Acceleration("cpu", **{k: v for k, v in options.items() if k != "cache"})
    student = acceleration.prepare(net(1, (4, 8, 8)))
    teacher = acceleration.prepare(net(2, (8, 16, 16)).eval().requires_grad_(False))
    reference = make_reference(acceleration.prepare(net(3, (4, 8, 8))))
    torch.manual_seed(4)  # the FitNets regressor's initial weights
    built = build_stage(
        Stage(methods=["kd", "fitnets"], epochs=1),
        student,
        teacher,
        reference,
        next(iter(train)),
        CPU,
        len(train.labels),
        acceleration,
    )
    models, methods = built.models, built.methods
    try:
        if options.get("cache"):
            limit = 2**30
            models.teacher_cache = cache_outputs(
                teacher, models.teacher_taps, train, acceleration, max_bytes=limit
            )
            models.reference_cache = cache_outputs(
                reference, None, train, acceleration, max_bytes=limit
            )
        models.student = acceleration.compiled(models.student)
        models.teacher = acceleration.compiled(models.teacher)
        models.reference = acceleration.compiled(models.reference)
        objective = StageObjective(
            1.0, [(m, 1.0) for m in methods], ReferenceConfig(weighting="inverse_tcp")
        )
        models.train()
        x, y, index = next(iter(train))
        total, terms = step_loss(models, objective, x, y, index)
        total.backward()
        params = [*student.parameters(), *(p for m in methods for p in m.parameters())]
        grad = torch.cat([p.grad.reshape(-1) for p in params])
    finally:
        built.close()
    scalars = {k: float(v) for k, v in terms.items() if v.dim() == 0}
    return scalars, grad


@pytest.mark.parametrize(
    ("options", "rtol", "min_cosine"),
    [
        ({"channels_last": True}, 1e-5, 1 - 1e-6),
        ({"cache": True}, 1e-5, 1 - 1e-6),
        ({"precision": "bf16"}, 2e-2, 0.998),
        ({"precision": "fp16"}, 5e-3, 0.9998),
        ({"precision": "bf16", "channels_last": True, "cache": True}, 2e-2, 0.998),
    ],
    ids=["channels_last", "cache_teacher", "bf16", "fp16", "bf16+channels_last+cache"],
)
def test_a_switch_gives_the_fp32_loss_and_gradient(loaders, options, rtol, min_cosine) -> None:
    expected_terms, expected_grad = one_step({}, loaders[0])
    terms, grad = one_step(options, loaders[0])
    assert set(terms) == set(expected_terms) >= {"ce", "kd", "fitnets", "reference"}
    for key, value in expected_terms.items():
        assert terms[key] == pytest.approx(value, rel=rtol, abs=1e-6), key
    cosine = torch.nn.functional.cosine_similarity(grad, expected_grad, dim=0)
    assert cosine >= min_cosine
    assert float(grad.norm()) == pytest.approx(float(expected_grad.norm()), rel=3 * rtol)


@pytest.mark.slow  # ~30 s: compiles three models
def test_torch_compile_gives_the_fp32_loss_gradient_and_features(loaders) -> None:
    """Compiled after the taps are registered, the hooks are traced: FitNets still sees
    the features (a hook added after compiling would silently never fire)."""
    expected_terms, expected_grad = one_step({}, loaders[0])
    terms, grad = one_step({"compile": True}, loaders[0])
    for key, value in expected_terms.items():
        assert terms[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def run(loaders, performance: dict, stages: list[Stage] | None = None, **kwargs):
    student, teacher = net(1, (4, 8, 8)), net(2, (8, 16, 16))
    stages = stages or [
        Stage(methods=["kd"], epochs=1, optimizer={"lr": 0.05}),
        Stage(methods=["fitnets"], epochs=1, optimizer={"lr": 0.05}),
    ]
    return run_stages(
        student,
        teacher,
        stages,
        *loaders,
        performance=PerformanceConfig(**performance),
        **{**QUIET, **kwargs},
    )


@pytest.mark.parametrize("performance", [{"channels_last": True}, {"cache_teacher": True}])
def test_exact_switches_reproduce_a_whole_run(loaders, performance) -> None:
    plain = run(loaders, {})
    fast = run(loaders, performance)
    for key, value in plain.student.state_dict().items():
        torch.testing.assert_close(fast.student.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain.history, fast.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1e-9)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_and_evaluate(loaders, precision) -> None:
    plain = run(loaders, {})
    mixed = run(loaders, {"precision": precision})
    for a, b in zip(plain.history, mixed.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
        assert abs(b["test_acc"] - a["test_acc"]) <= 10.0  # 64 test images: ±6 images
    weights = mixed.student.state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


def test_fp16_saves_its_loss_scale_and_resumes_bit_identically(
    loaders, tmp_path, monkeypatch
) -> None:
    stages = [Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.05})]
    expected = run(loaders, {"precision": "fp16"}, stages)
    real, calls = engine.step_loss, {"n": 0}

    def crash_on_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, step 2 (4 steps an epoch)
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "step_loss", crash_on_step_6)
    with pytest.raises(RuntimeError, match="power cut"):
        run(loaders, {"precision": "fp16"}, stages, out_dir=tmp_path)
    state = safe_load(tmp_path / "checkpoints" / "last.pt")
    assert state["scaler"]["scale"] == 2.0**16  # GradScaler's initial scale, saved
    monkeypatch.undo()
    resumed = run(loaders, {"precision": "fp16"}, stages, out_dir=tmp_path, resume=True)
    for key, value in expected.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key


def test_compile_is_applied_per_stage_after_the_taps(loaders, monkeypatch) -> None:
    """What run_stages hands to torch.compile, without paying for compiling."""
    compiled: list[tuple[str, int]] = []

    def record(model):
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        compiled.append((type(model).__name__, hooks))
        return model

    monkeypatch.setattr(torch, "compile", record)
    run(loaders, {"compile": True})
    # Stage 1: student, teacher. Stage 2: student, teacher (FitNets taps), reference.
    assert len(compiled) == 5
    assert compiled[2][1] > 0 and compiled[3][1] > 0  # stage 2's taps exist when compiled


def test_cache_skips_the_teacher_and_reference_forwards(loaders, monkeypatch) -> None:
    calls = {"teacher": 0}
    run_teacher = ConvNet.forward

    def counting(self, x):
        if self.block1[0].out_channels == 8:  # the teacher's widths
            calls["teacher"] += 1
        return run_teacher(self, x)

    monkeypatch.setattr(ConvNet, "forward", counting)
    run(loaders, {"cache_teacher": True})
    # Each stage's cache pass (128 samples, 256 a batch) and its 2-sample shape probe,
    # and FitNets' probe batch.
    assert calls["teacher"] == 5


def augmented_loaders() -> tuple[InMemoryLoader, InMemoryLoader]:
    data = array_dataset()
    augment = Augment(crop_padding=1, flip=True)  # 18 views of each image
    train = InMemoryLoader(data.train, data, 32, shuffle=True, seed=0, augment=augment)
    return train, InMemoryLoader(data.test, data, 64, shuffle=False)


def test_a_shared_cache_reproduces_an_augmented_run(tmp_path) -> None:
    """With augmentation every step reads the teacher's outputs on the view the loader
    drew; the run is the one the teacher's forwards give."""
    stages = [
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.05}),
        Stage(methods=["rkd"], epochs=2, optimizer={"lr": 0.05}),
    ]
    plain = run(augmented_loaders(), {}, stages)
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path / "outputs")}
    lines: list[str] = []
    fast = run(augmented_loaders(), cached, stages, log=lines.append)
    for key, value in plain.student.state_dict().items():
        torch.testing.assert_close(fast.student.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.history, fast.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    # One pass over the 18 views, in the kd stage: it keeps the logits and the teacher's
    # embedding, which the rkd stage reads without a second pass.
    folders = [f for f in (tmp_path / "outputs").iterdir() if f.is_dir()]
    assert len(folders) == 1 and (folders[0] / "about.json").is_file()
    assert len(list(folders[0].glob("view-*/logits.pt"))) == 18
    assert len(list(folders[0].glob("view-*/*.pt"))) == 36
    assert sum("computed" in line for line in lines) == 18


def test_a_second_run_reads_the_shared_outputs_and_another_teacher_gets_its_own(
    tmp_path, monkeypatch
) -> None:
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path)}
    stages = [Stage(methods=["kd"], epochs=1, optimizer={"lr": 0.05})]
    run(augmented_loaders(), cached, stages)
    calls = {"teacher": 0}
    run_teacher = ConvNet.forward

    def counting(self, x):
        calls["teacher"] += self.block1[0].out_channels == 8
        return run_teacher(self, x)

    monkeypatch.setattr(ConvNet, "forward", counting)
    lines: list[str] = []
    run(augmented_loaders(), cached, stages, log=lines.append)
    assert calls["teacher"] == 1  # the 2-sample shape probe only: 18 views read, none computed
    assert not any("computed" in line for line in lines)
    student, teacher = net(1, (4, 8, 8)), net(9, (8, 16, 16))  # other weights
    run_stages(
        student,
        teacher,
        stages,
        *augmented_loaders(),
        performance=PerformanceConfig(**cached),
        progress=False,
        log=lines.append,
    )
    assert len([f for f in tmp_path.iterdir() if f.is_dir()]) == 2
    assert sum("computed" in line for line in lines) == 18


def test_a_damaged_shared_output_is_one_line_naming_the_folder(tmp_path) -> None:
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path)}
    stages = [Stage(methods=["kd"], epochs=1, optimizer={"lr": 0.05})]
    run(augmented_loaders(), cached, stages)
    damaged = next(tmp_path.glob("*/view-003/logits.pt"))
    damaged.write_bytes(b"not what smskd wrote")
    with pytest.raises(UserError, match=r"checksum|sha256|does not match"):
        run(augmented_loaders(), cached, stages)
    wrong = next(tmp_path.glob("*/view-004/logits.pt"))
    wrong.unlink()
    wrong.with_name("logits.pt.sha256").unlink()
    atomic_save(torch.zeros(128, 5), wrong)  # 5 classes where the teacher has 3
    damaged.unlink()  # recomputed
    damaged.with_name("logits.pt.sha256").unlink()
    with pytest.raises(UserError, match=rf"does not hold.*delete {damaged.parent.parent}"):
        run(augmented_loaders(), cached, stages)


def test_a_cache_directory_is_not_taken_from_someone_else(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path)}
    with pytest.raises(UserError, match=r"performance\.cache_dir: .* not an smskd directory"):
        run(augmented_loaders(), cached, [Stage(methods=["kd"], epochs=1)])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    from smskd import distill

    raw = {
        "data": {"name": "digits", "augment": True},
        "teacher": {"model": "convnet-s", "epochs": 1},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
        "performance": cached,
    }
    out = tmp_path.parent / f"{tmp_path.name}-run"
    with pytest.raises(UserError, match=r"choose another performance\.cache_dir"):
        distill(load_config(raw), out, progress=False)
    assert not out.exists()  # refused before the teacher trained


def test_cache_refuses_augmented_without_a_directory_and_streamed_data(loaders) -> None:
    with pytest.raises(UserError, match="cache_dir"):
        run(augmented_loaders(), {"cache_teacher": True})
    data = array_dataset()
    x, y = data.train.images.float(), data.train.labels
    streamed = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=32)
    with pytest.raises(UserError, match="in-memory training set"):
        run((streamed, loaders[1]), {"cache_teacher": True})


def test_outputs_beyond_the_limit_run_the_teacher_instead(loaders) -> None:
    lines: list[str] = []
    plain = run(loaders, {})
    small = run(loaders, {"cache_teacher": True, "cache_max_gib": 1e-6}, log=lines.append)
    assert any("cache_max_gib: the teacher runs every step" in line for line in lines)
    assert plain.history[-1]["train_loss"] == small.history[-1]["train_loss"]


def test_the_cache_settings_are_not_part_of_the_experiment() -> None:
    raw = {
        "data": {"name": "digits"},
        "teacher": {"model": "convnet-s"},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
    }
    plain = load_config(raw)
    cached = load_config({**raw, "performance": {"cache_teacher": True, "cache_dir": "c"}})
    assert cached.to_yaml() != plain.to_yaml()
    assert cached.experiment_yaml() == plain.experiment_yaml()
    bf16 = load_config({**raw, "performance": {"precision": "bf16"}})
    assert bf16.experiment_yaml() != plain.experiment_yaml()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "cifar10"}, "cache_dir"),  # crop+flip by default
        ({"name": "digits", "augment": True}, "cache_dir"),
        ({"name": "image-folder", "augment": False}, "in_memory: true"),
    ],
)
def test_config_refuses_a_cache_that_cannot_hold(data, message) -> None:
    raw = {
        "data": data,
        "teacher": {"model": "convnet-s"},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
        "performance": {"cache_teacher": True},
    }
    with pytest.raises(UserError, match=message):
        load_config(raw)
    if message == "cache_dir":  # augmented: the views are shared through a directory
        load_config({**raw, "performance": {"cache_teacher": True, "cache_dir": "outputs"}})
    raw["performance"] = {"cache_teacher": False}
    load_config(raw)


def test_config_names_the_valid_precisions() -> None:
    raw = {
        "student": {"model": "convnet-xs"},
        "stages": [{"epochs": 1}],
        "performance": {"precision": "fp8"},
    }
    with pytest.raises(UserError, match=r"performance\.precision.*'bf16'"):
        load_config(raw)


def test_deepcopy_of_a_prepared_model_keeps_channels_last() -> None:
    model = Acceleration("cpu", channels_last=True).prepare(net(1, (4, 8, 8)))
    copied = copy.deepcopy(model)
    weight = copied.block1[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)


TWO_WORKERS = """
import sys, time, torch
import smskd.train.output_cache as output_cache
from smskd.data.augment import Augment
from smskd.data.memory import InMemoryLoader
from smskd.train.acceleration import Acceleration
from tests.test_acceleration import array_dataset, net

slow = output_cache._view_outputs
def slowed(*args, **kwargs):
    time.sleep(0.15)  # long enough for the two processes to overlap
    return slow(*args, **kwargs)
output_cache._view_outputs = slowed
output_cache.WAIT_SECONDS = 0.05
data = array_dataset()
train = InMemoryLoader(data.train, data, 32, shuffle=True, augment=Augment(1, True))
cache = output_cache.cache_outputs(
    net(2, (8, 16, 16)), None, train, Acceleration("cpu"), max_bytes=2**30,
    directory=output_cache.Path(sys.argv[1]), log=print,
)
torch.save(cache.logits, sys.argv[2])
"""


@pytest.mark.slow  # ~8 s: two Python processes
def test_two_processes_share_the_views_without_computing_one_twice(tmp_path) -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_WORKERS, str(tmp_path / "shared"), str(tmp_path / f"{w}")],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    logs = [w.communicate(timeout=120)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    computed = [int(v) for log in logs for v in re.findall(r"on view (\d+) of 18", log)]
    assert sorted(computed) == list(range(1, 19))  # each view once, by one of the two
    assert torch.equal(torch.load(tmp_path / "0"), torch.load(tmp_path / "1"))


def test_a_stop_while_the_views_are_computed_stops_there(tmp_path, monkeypatch) -> None:
    """SIGINT/SIGTERM are read between views: filling a large cache takes long."""
    from smskd.train.interrupt import RunStopped, StopRequest

    monkeypatch.setattr(StopRequest, "requested", property(lambda self: True))
    monkeypatch.setattr(StopRequest, "name", property(lambda self: "SIGTERM"))
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path / "outputs")}
    with pytest.raises(RunStopped, match="while computing the teacher's outputs"):
        run(augmented_loaders(), cached, [Stage(methods=["kd"], epochs=1)])
    assert not list((tmp_path / "outputs").glob("*/view-*/*.pt"))


def test_a_run_resumes_with_its_cache_settings_changed(tmp_path) -> None:
    from smskd import distill
    from smskd.train.resume import _difference, _identity

    raw = {
        "data": {"name": "digits", "augment": True, "batch_size": 64},
        "teacher": {"model": "convnet-s", "epochs": 1},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}],
    }
    plain = load_config(raw)
    distill(plain, tmp_path / "run", progress=False)
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path / "outputs")}
    again = load_config({**raw, "performance": cached})
    assert distill(again, tmp_path / "run", resume=True, progress=False).epochs_trained == 0
    # A checkpoint recorded with the cache on (as runs recorded it before) resumes too.
    theirs = _identity(0, again.stages, again.model_dump(mode="json"))
    ours = _identity(0, plain.stages, plain.model_dump(mode="json"))
    assert _difference(theirs, ours) is None
    bf16 = load_config({**raw, "performance": {"precision": "bf16"}})
    other = _identity(0, bf16.stages, bf16.model_dump(mode="json"))
    assert "performance.precision" in _difference(other, ours)


def test_a_sweeps_force_clears_the_cache_kept_in_its_folder(tmp_path) -> None:
    from smskd.store import rundir

    rundir.claim(tmp_path, rundir.SWEEP)
    (tmp_path / "NOTES.md").write_text("mine")
    cached = {"cache_teacher": True, "cache_dir": str(tmp_path / "teacher-outputs")}
    run(augmented_loaders(), cached, [Stage(methods=["kd"], epochs=1)])
    assert list((tmp_path / "teacher-outputs").glob("*/view-*/logits.pt"))
    rundir.clear(tmp_path, rundir.SWEEP, log=lambda _: None)
    assert not (tmp_path / "teacher-outputs").exists()
    assert (tmp_path / "NOTES.md").read_text() == "mine"


def test_outputs_too_large_for_memory_are_read_from_disk(tmp_path, monkeypatch) -> None:
    """Beyond cache_max_gib, within cache_disk_gib: the steps read the files, memory-mapped,
    and the run is the one the teacher's forwards give; beyond both, the teacher runs."""
    from smskd.train.output_cache import MappedOutputs

    stages = [
        Stage(methods=["fitnets"], epochs=2, optimizer={"lr": 0.05}),
        Stage(methods=["kd"], epochs=1, optimizer={"lr": 0.05}),
    ]
    plain = run(augmented_loaders(), {}, stages)
    on_disk = {
        "cache_teacher": True,
        "cache_dir": str(tmp_path),
        "cache_max_gib": 1e-5,  # ~10 kB of memory: nothing fits
        "cache_disk_gib": 1.0,
    }
    lines: list[str] = []
    mapped = run(augmented_loaders(), on_disk, stages, log=lines.append)
    assert sum("GiB read from disk" in line for line in lines) == 2
    for key, value in plain.student.state_dict().items():
        torch.testing.assert_close(mapped.student.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.history, mapped.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    loader = augmented_loaders()[0]
    teacher = net(2, (8, 16, 16))

    def fill(network: torch.nn.Module = teacher, disk_bytes: float = 2**30):
        return cache_outputs(
            network,
            None,
            loader,
            Acceleration("cpu"),
            max_bytes=1e4,
            directory=tmp_path,
            disk_bytes=disk_bytes,
            log=lambda _: None,
        )

    loads, real_load = [], torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("mmap", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cache = fill()
    assert isinstance(cache, MappedOutputs) and cache.views == 18
    assert loads == [True] * 18  # every view's file memory-mapped, none read in
    index, view = torch.tensor([5, 7, 5]), torch.tensor([0, 17, 3])
    x = torch.stack(
        [
            next(iter(loader.every_sample(128, int(v))))[0][int(i)]
            for i, v in zip(index, view, strict=True)
        ]
    )
    expected = teacher.eval()(x)
    torch.testing.assert_close(cache.take(index, view)[0], expected, rtol=1e-5, atol=1e-6)
    first_view = next(iter(loader.every_sample(128, 0)))[0][index]
    torch.testing.assert_close(
        cache.take(index, None)[0], teacher(first_view), rtol=1e-5, atol=1e-6
    )
    # A mapped file is checked by its recorded size (hashing would read it all).
    (folder,) = [f for f in tmp_path.iterdir() if f.is_dir()]  # the run's and this teacher's
    damaged = folder / "view-005" / "logits.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated or damaged"):
        fill()
    # No room on the disk for what a fill would write: one line before computing anything.
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(UserError, match="GiB free"):
        fill(net(5, (8, 16, 16)))
    assert fill(disk_bytes=1e4) is None
