"""The validation split (data.val_split) and the rule that nothing is chosen on test."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from smskd import Stage, run_stages
from smskd.config import DataConfig, ReferenceConfig, load_config
from smskd.errors import UserError
from smskd.experiment import prepare_data
from smskd.train.selection import StageBest, best_epoch

CPU = torch.device("cpu")


def _digits(**data) -> DataConfig:
    return DataConfig(name="digits", batch_size=32, **data)


def _pairs(loader) -> set[tuple[bytes, int]]:
    return {
        (image.numpy().tobytes(), int(label))
        for x, y, *_ in loader
        for image, label in zip(x, y, strict=True)
    }


def test_val_split_is_stratified_disjoint_and_fixed_by_its_own_seed() -> None:
    everything = prepare_data(_digits(), seed=0, device=CPU).num_train
    data = prepare_data(_digits(val_split=200), seed=0, device=CPU)
    counts = data.val.labels.bincount()
    assert counts.sum() == 200 and counts.max() - counts.min() <= 1  # 10 classes, 20 each
    assert data.num_train == everything - 200
    val, train = _pairs(data.val), _pairs(data.train.every_sample(256))
    assert not val & train  # no validation image is trained on
    # The run's seed shuffles batches, never which images are held out...
    other_run = prepare_data(_digits(val_split=200), seed=7, device=CPU)
    assert torch.equal(other_run.val.labels, data.val.labels)
    assert _pairs(other_run.val) == val
    # ...val_seed does; a fraction counts from the training split.
    reseeded = prepare_data(_digits(val_split=200, val_seed=1), seed=0, device=CPU)
    assert _pairs(reseeded.val) != val
    assert len(prepare_data(_digits(val_split=0.1), 0, CPU).val.labels) == round(0.1 * everything)


def test_train_subset_comes_from_what_validation_leaves() -> None:
    data = prepare_data(_digits(val_split=300, train_subset=500), seed=0, device=CPU)
    assert data.num_train == 500
    assert not _pairs(data.val) & _pairs(data.train.every_sample(256))
    with pytest.raises(UserError, match=r"left after data\.val_split"):
        prepare_data(_digits(val_split=300, train_subset=1200), seed=0, device=CPU)


@pytest.mark.parametrize(
    ("val_split", "message"),
    [
        (1438, "leaving none to train on"),
        (5, "fewer than the 10 classes"),
    ],
)
def test_val_split_that_cannot_work_is_one_line(val_split, message) -> None:
    with pytest.raises(UserError, match=message):
        prepare_data(_digits(val_split=val_split), seed=0, device=CPU)


@pytest.mark.parametrize("value", [1.0, 1.5, 0, -3])
def test_val_split_is_a_count_or_a_fraction_below_one(value) -> None:
    with pytest.raises(UserError, match="val_split"):
        load_config({"data": {"name": "digits", "val_split": value}, **_MINIMAL})


_MINIMAL = {"student": {"model": "convnet-xs"}, "stages": [{"epochs": 1}]}


def test_snapshot_best_needs_a_validation_split() -> None:
    two = {
        "teacher": {"model": "convnet-s"},
        "student": {"model": "convnet-xs"},
        "stages": [{"methods": ["kd"], "epochs": 1}, {"methods": ["kd"], "epochs": 1}],
        "reference": {"snapshot": "best"},
    }
    with pytest.raises(UserError, match=r"set data\.val_split"):
        load_config(two)
    assert load_config({**two, "data": {"val_split": 0.1}}).reference.snapshot == "best"


def test_best_epoch_reads_validation_only() -> None:
    records = [
        {"epoch": 1, "val_acc": 50.0, "test_acc": 90.0},
        {"epoch": 2, "val_acc": 70.0, "test_acc": 10.0},
        {"epoch": 3, "val_acc": 70.0, "test_acc": 99.0},  # a tie: the earlier epoch stays
    ]
    assert best_epoch(records)["epoch"] == 2
    assert best_epoch([{"test_acc": 90.0}]) is None  # no validation split: nothing chosen


def test_stage_best_keeps_the_best_validation_epoch(tmp_path, student) -> None:
    best = StageBest(lambda stage: tmp_path / f"stage{stage}-best.pt", writes=True)
    chosen = {k: v.clone() for k, v in student.state_dict().items()}
    best.offer(1, 60.0, student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    best.offer(1, 60.0, student)  # not better: the first stays
    best.offer(1, 40.0, student)
    for key, value in chosen.items():
        assert torch.equal(best.of(1)[key], value)
    # Midway through the stage it lives in last.pt; a resume takes it from there.
    resumed = StageBest(lambda stage: tmp_path / f"stage{stage}-best.pt", writes=True)
    resumed.restore(best.running(1), 1, [{"stage": 1, "val_acc": 99.0}])
    assert resumed.scores == {1: 60.0}
    # At the stage's end it goes to its file (before last.pt records the checksum).
    assert not (tmp_path / "stage1-best.pt").exists()
    best.finish(1)
    reread = StageBest(lambda stage: tmp_path / f"stage{stage}-best.pt", writes=False)
    reread.hashes = dict(best.hashes)
    for key, value in chosen.items():
        assert torch.equal(reread.of(1)[key], value)  # from the file, checksum checked


def _held_out(train: DataLoader) -> tuple[DataLoader, DataLoader]:
    x, y = train.dataset.tensors
    return (
        DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32),
        DataLoader(TensorDataset(x[96:], y[96:]), batch_size=32),
    )


def test_no_choice_reads_the_test_split(tiny_data, teacher) -> None:
    """The same run against the real test split and against one with random labels
    (and other images) trains the same student, bit for bit: the best-validation
    snapshots, the selected epoch and everything else depend on validation alone."""
    from fakes import make_student

    train, test = tiny_data
    train, val = _held_out(train)
    x, _ = test.dataset.tensors
    noise = DataLoader(
        TensorDataset(torch.randn_like(x), torch.randint(0, 3, (len(x),))), batch_size=64
    )
    stages = [
        Stage(methods=["kd"], epochs=3, optimizer={"lr": 0.2}),
        Stage(methods=["kd"], epochs=2, optimizer={"lr": 0.2}),
    ]
    runs = []
    for test_split in (test, noise):
        runs.append(
            run_stages(
                make_student(),
                teacher,
                stages,
                train,
                test_split,
                val_data=val,
                probe_data=val,
                reference=ReferenceConfig(snapshot="best"),
                progress=False,
                log=lambda _line: None,
            )
        )
    real, fake = runs
    assert [r["test_acc"] for r in real.history] != [r["test_acc"] for r in fake.history]
    assert [r["val_acc"] for r in real.history] == [r["val_acc"] for r in fake.history]
    for key, value in real.student.state_dict().items():
        assert torch.equal(value, fake.student.state_dict()[key]), key
    chosen = best_epoch(real.history)["global_epoch"]
    assert chosen == best_epoch(fake.history)["global_epoch"]
    assert real.selected_accuracy == real.history[chosen - 1]["test_acc"]
    assert real.forgetting == fake.forgetting
