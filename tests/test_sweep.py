"""``smskd sweep``: grid expansion, shared teachers, skip and resume of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fakes import make_cifar100

from smskd.cli.commands import main
from smskd.errors import UserError
from smskd.study.sweep import load_sweep, plan, run_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY = ["stages.*.epochs=1", "teacher.epochs=1"]


def write_sweep(folder: Path, **fields) -> Path:
    content = {"name": "test", "base": str(QUICKSTART), "seeds": [0], "set": TINY, **fields}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_expansion_covers_every_recipe_kind_and_dedupes_equal_configs(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        seeds=[0, 1],
        set=["stages.*.epochs=2"],
        recipes=[
            "scratch",
            "single",
            "joint",
            "smskd",
            {"kind": "multi-teacher", "teachers": ["convnet-s"]},
            {
                "kind": "smskd",
                "name": "ref-none",
                "group": "reference",
                "set": ["reference.weighting=none"],
            },
            "stages",
            "orders",
            {
                "kind": "smskd",
                "name": "lambda",
                "group": "lambda",
                "grid": {"reference.lam": [0.5, 1.0]},
            },
        ],
    )
    runs = plan(load_sweep(path), path, tmp_path / "out")
    labels = [r.label for r in runs if r.seed == 0]
    assert labels == [
        "scratch", "single-kd", "single-fitnets", "single-rkd", "joint", "smskd",
        "multi-teacher", "ref-none", "stages-1", "stages-2", "stages-3",
        "order-kd-fitnets-rkd", "order-kd-rkd-fitnets", "order-fitnets-kd-rkd",
        "order-fitnets-rkd-kd", "order-rkd-kd-fitnets", "order-rkd-fitnets-kd",
        "lambda(lam=0.5)", "lambda(lam=1.0)",
    ]  # fmt: skip
    assert [r.seed for r in runs] == [0] * len(labels) + [1] * len(labels)  # seed-major
    by = {(r.label, r.seed): r for r in runs}
    total = 3 * 2  # three stages of two epochs: every recipe trains the student 6 epochs
    for r in runs:
        assert r.config.total_epochs == total, r.label
        assert r.config.seed == r.seed
    # Identical configs are one run: 3 stages and λ = 1 are SMSKD itself, 1 stage is KD alone.
    smskd_dir = by[("smskd", 0)].dir
    assert by[("stages-3", 0)].same_as == smskd_dir
    assert by[("lambda(lam=1.0)", 0)].same_as == smskd_dir
    assert by[("order-kd-fitnets-rkd", 0)].same_as == smskd_dir
    assert by[("stages-1", 0)].same_as == by[("single-kd", 0)].dir
    assert by[("smskd", 1)].same_as is None and by[("smskd", 1)].dir != smskd_dir
    assert sum(r.same_as is None for r in runs) == 2 * 15
    # What each kind builds.
    assert by[("scratch", 0)].config.teacher is None
    assert [m.name for m in by[("joint", 0)].config.stages[0].methods] == ["kd", "fitnets", "rkd"]
    multi = by[("multi-teacher", 0)].config
    assert [t.model.name for t in multi.all_teachers] == ["convnet-m", "convnet-s"]
    assert [m.name for s in multi.stages for m in s.methods] == ["kd"]
    assert [s.epochs for s in by[("stages-2", 0)].config.stages] == [3, 3]
    assert by[("ref-none", 0)].config.reference.weighting == "none"
    assert by[("lambda(lam=0.5)", 0)].config.reference.lam == 0.5
    assert by[("order-rkd-kd-fitnets", 0)].stages == "rkd → kd → fitnets"
    assert {r.group for r in runs if r.label.startswith("order-")} == {"orders"}
    assert by[("stages-2", 0)].group == "stages" and by[("joint", 0)].group == "main"
    assert by[("smskd", 0)].dir == str(tmp_path / "out" / "smskd" / "seed-0")


def test_grid_at_sweep_level_crosses_every_recipe(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path, recipes=["joint", "smskd"], grid={"reference.temperature": [2.0, 4.0]}
    )
    runs = plan(load_sweep(path), path, tmp_path / "out")
    assert [r.label for r in runs] == [
        "joint(temperature=2.0)",
        "joint(temperature=4.0)",
        "smskd(temperature=2.0)",
        "smskd(temperature=4.0)",
    ]
    assert [r.config.reference.temperature for r in runs] == [2.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("recipes", "message"),
    [
        (["smskdd"], "recipes.0.kind"),
        ([{"kind": "multi-teacher"}], "needs 'teachers'"),
        ([{"kind": "single", "method": "dkd"}], "'dkd' is in none of the stages"),
        (["smskd", {"kind": "smskd", "set": ["reference.lam=2"]}], "give one of them a 'name:'"),
        ([{"kind": "smskd", "set": ["stages.*.epochs=0"]}], "stages.0.epochs"),
    ],
)
def test_bad_sweeps_fail_before_training_naming_the_problem(
    tmp_path: Path, recipes: list, message: str
) -> None:
    path = write_sweep(tmp_path, recipes=recipes)
    with pytest.raises(UserError, match=message):
        plan(load_sweep(path), path, tmp_path / "out")


def test_multi_teacher_refuses_feature_methods(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, recipes=[{"kind": "multi-teacher", "teachers": ["convnet-s"]}])
    config = yaml.safe_load(QUICKSTART.read_text())
    config["extra_teachers"] = [{"model": "convnet-s"}]
    from smskd.config import load_config

    with pytest.raises(UserError, match="'fitnets' taps one teacher's layers"):
        load_config(config)
    assert plan(load_sweep(path), path, tmp_path / "out")  # the recipe itself keeps KD only


@pytest.mark.slow  # three sweeps of six runs
def test_sweep_skips_finished_runs_and_resumes_an_interrupted_one(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path = write_sweep(
        tmp_path,
        seeds=[0, 1],
        recipes=[
            {"kind": "single", "method": "kd"},
            {"kind": "multi-teacher", "teachers": ["convnet-xs"]},
            "smskd",
        ],
    )
    reference = run_sweep(path, tmp_path / "straight", progress=False, log=lambda _m: None)
    assert [r.status for r in reference] == ["done"] * 6

    # The same sweep, killed during seed 0's SMSKD run (after its first stage)...
    import smskd.train.epoch as engine

    original = engine.step_loss

    def dying_step(models, *args):
        if models.reference is not None:  # the first step with a reference: SMSKD's stage 2
            raise KeyboardInterrupt  # as a kill would: nothing saved past the last checkpoint
        return original(models, *args)

    monkeypatch.setattr(engine, "step_loss", dying_step)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, out, progress=False, log=lambda _m: None)
    monkeypatch.setattr(engine, "step_loss", original)
    index = json.loads((out / "index.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done", "done", "pending"] + ["pending"] * 3
    assert len(index["teachers"]) == 2  # convnet-m and convnet-xs, each trained once
    first_metrics = (out / "single-kd" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns

    # ...then run again: finished runs are skipped, the interrupted one resumes.
    lines: list[str] = []
    capsys.readouterr()
    resumed = run_sweep(path, out, progress=False, log=lines.append)
    assert "smskd: resuming at stage 2, epoch 1" in capsys.readouterr().out
    assert (out / "single-kd" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == first_metrics
    assert not any("single-kd seed 0" in line for line in lines)  # skipped silently
    assert [r.status for r in resumed] == ["done"] * 6
    # CPU runs resume bit-identically: the same accuracies as the uninterrupted sweep.
    assert [r.final_acc for r in resumed] == [r.final_acc for r in reference]
    assert (out / "sweep.yaml").read_text() == path.read_text()
    # A third call trains nothing at all, and its index still lists the teachers, also
    # when they were trained before a config key existed: the key is absent from their
    # configs, and the name today's configs hash to is another.
    for folder in (out / "teachers").iterdir():
        stored = folder / "config.yaml"
        stored.write_text(stored.read_text().replace("  cache_dir: null\n", ""))
    import smskd.study.sweep as sweep_module

    today = sweep_module.yaml.safe_dump
    monkeypatch.setattr(
        sweep_module.yaml, "safe_dump", lambda *a, **k: today(*a, **k) + "new_key: 1\n"
    )
    teachers = json.loads((out / "index.json").read_text())["teachers"]
    (out / "index.json").write_text(
        json.dumps({**json.loads((out / "index.json").read_text()), "teachers": []})
    )
    monkeypatch.setattr(engine, "step_loss", lambda *a: pytest.fail("trained again"))
    again = run_sweep(path, out, progress=False, log=lambda _m: None)
    assert [r.final_acc for r in again] == [r.final_acc for r in reference]
    assert len(teachers) == 2
    assert json.loads((out / "index.json").read_text())["teachers"] == teachers


def test_sweep_cli_dry_run_lists_runs_and_bad_files_exit_2(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, recipes=["joint", "stages"])
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "joint" in listed and "stages-3" in listed and "stages-1" in listed
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run",
                 "--format", "json", "--seeds", "3,4"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert {row["seed"] for row in rows} == {3, 4} and len(rows) == 8
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--out", "o", "--seeds", "a,b"])


@pytest.mark.slow  # ~60 s: 20 runs of the paper's CIFAR-100 models
def test_cifar100_sweep_runs_a_few_steps_on_fabricated_pickles(tmp_path: Path) -> None:
    """The CIFAR-100 sweep file: all 162 runs plan and validate; on fabricated pickles,
    every recipe of the cheapest pair and the multi-teacher runs (new teacher
    combinations) of the two others train a few steps. Their other recipes reuse the
    pairs' stages, which test_recipes_smoke runs."""
    sweep = ROOT / "configs" / "sweeps" / "cifar100.yaml"
    runs = plan(load_sweep(sweep), sweep, tmp_path / "planned")
    assert len(runs) == 3 * 3 * 23 and sum(r.same_as is None for r in runs) == 3 * 3 * 18
    assert {r.config.total_epochs for r in runs} == {150}
    data = tmp_path / "cifar"
    data.mkdir()
    make_cifar100(data, train=16, test=8)
    tiny = [
        "teacher.epochs=1",
        "stages.*.epochs=1",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        f"data.root={data}",
        # Noise images and a one-epoch teacher make FitNets' β = 100 diverge within
        # joint's three epochs at lr 0.01; this checks that each run trains, not its numbers.
        "stages.*.optimizer.lr=0.001",
    ]
    only = ["resnet50-mobilenetv2/*", "*/multi-teacher"]
    done = run_sweep(sweep, tmp_path / "out", overrides=tiny, seeds=[0], only=only,
                     progress=False, log=lambda _m: None)  # fmt: skip
    trained = {(r.base, r.label) for r in done if r.status == "done"}
    assert {label for base, label in trained if base == "resnet50-mobilenetv2"} == {
        r.label for r in runs if r.base == "resnet50-mobilenetv2"
    }
    assert {(b, "multi-teacher") for b in ("wrn40_2-shufflenetv2", "vgg19-resnet18")} <= trained
    assert all(r.status == "pending" for r in done if (r.base, r.label) not in trained)
    multi = next(r for r in done if r.label == "multi-teacher")
    assert [t.model.name for t in multi.config.all_teachers] == ["resnet50", "resnet32x4", "vgg13"]


def test_a_finished_run_of_a_changed_config_is_not_reused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, recipes=["joint"])
    out = tmp_path / "out"
    assert [r.status for r in run_sweep(path, out, progress=False, log=lambda _m: None)] == ["done"]
    changed = write_sweep(tmp_path, recipes=["joint"], set=[*TINY, "data.batch_size=32"])
    with pytest.raises(UserError, match="holds a finished run of another config than 'joint'"):
        run_sweep(changed, out, progress=False, log=lambda _m: None)


def test_labels_map_to_distinct_readable_directories_or_are_refused(tmp_path: Path) -> None:
    greek = write_sweep(
        tmp_path,
        recipes=[
            {"kind": "smskd", "name": "β", "grid": {"stages.1.methods.0.weight": [1.0]}},
            {"kind": "smskd", "name": "λ", "grid": {"reference.lam": [1.0]}},
        ],
    )
    runs = plan(load_sweep(greek), greek, tmp_path / "out")
    assert [Path(r.dir).parent.name for r in runs] == ["β-weight=1.0", "λ-lam=1.0"]
    clash = write_sweep(
        tmp_path, recipes=[{"kind": "scratch", "name": "a b"}, {"kind": "joint", "name": "a/b"}]
    )
    with pytest.raises(UserError, match="the labels 'a b' and 'a/b' map to one directory"):
        plan(load_sweep(clash), clash, tmp_path / "out")


@pytest.mark.parametrize("name", ["..", ".", "../..", "///", ".hidden"])
def test_no_label_escapes_the_sweep_directory(tmp_path: Path, capsys, name: str) -> None:
    path = write_sweep(tmp_path, recipes=[{"kind": "scratch", "name": name}])
    out = tmp_path / "deep" / "out"
    if name == ".hidden":  # a readable name is kept, only not hidden
        (run,) = plan(load_sweep(path), path, out)
        assert Path(run.dir) == out / "hidden" / "seed-0"
        return
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
    assert "leaves no usable directory name" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "seed-0").exists()


def test_sweep_only_trains_the_selected_runs(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, recipes=["scratch", "joint"])
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--out", str(out), "--only", "scratch", "--no-progress"]
    assert main([*argv, "--no-report"]) == 0
    assert (out / "scratch" / "seed-0" / "result.json").is_file()
    assert not (out / "joint").exists() and not (out / "teachers").exists()
    index = json.loads((out / "index.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done", "pending"]


def test_a_sweep_is_not_written_into_a_users_directory(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, recipes=["scratch"])
    assert main(["sweep", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is not an smskd directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]
