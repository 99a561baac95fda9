"""A sweep's ``tune:`` section (β chosen on validation before every other run) and
per-recipe seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from smskd.errors import UserError
from smskd.study.sweep import load_sweep, plan, run_sweep, tuned_weights

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY = ["stages.*.epochs=1", "teacher.epochs=1", "data.val_split=200"]


def write_sweep(folder: Path, **fields) -> Path:
    content = {
        "name": "tuned",
        "base": str(QUICKSTART),
        "seeds": [0, 1],
        "set": TINY,
        "tune": {"weights": {"fitnets": [1, 10], "rkd": [0.5, 2]}},
        "recipes": ["single", "smskd"],
        **fields,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return path


def _weights(run) -> dict[str, float]:
    return {m.name: m.weight for stage in run.config.stages for m in stage.methods}


def test_tuning_runs_come_first_and_the_rest_wait_for_them(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    runs = plan(load_sweep(path), path, tmp_path / "out")
    tuning = [r for r in runs if r.group == "tune"]
    assert [r.label for r in tuning] == [
        "tune-fitnets(β=1.0)", "tune-fitnets(β=10.0)", "tune-rkd(β=0.5)", "tune-rkd(β=2.0)"
    ]  # fmt: skip
    assert runs[: len(tuning)] == tuning and {r.seed for r in tuning} == {2}  # past 0, 1
    assert [_weights(r) for r in tuning] == [
        {"fitnets": 1.0}, {"fitnets": 10.0}, {"rkd": 0.5}, {"rkd": 2.0}
    ]  # fmt: skip
    waiting = {r.label: r.waits_for_tuning for r in runs if r.group != "tune" and r.seed == 0}
    assert waiting == {
        "single-kd": False, "single-fitnets": True, "single-rkd": True, "smskd": True
    }  # fmt: skip
    assert tuned_weights(runs) is None


def _finish(run, val_acc: float, test_acc: float) -> None:
    folder = Path(run.dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": 1, "global_epoch": 1, "val_acc": val_acc, "test_acc": test_acc}
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (folder / "result.json").write_text("{}")


def test_beta_is_chosen_on_validation_and_weighs_every_other_run(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    runs = plan(load_sweep(path), path, out)
    # Test accuracy says the opposite of validation: it must not be read.
    scores = {"fitnets(β=1.0)": (70, 99), "fitnets(β=10.0)": (80, 1)}
    scores |= {"rkd(β=0.5)": (60, 1), "rkd(β=2.0)": (50, 99)}
    for run in runs:
        if run.group == "tune":
            _finish(run, *scores[run.label.removeprefix("tune-")])
    runs = plan(load_sweep(path), path, out)
    assert tuned_weights(runs) == {"quickstart": {"fitnets": 10.0, "rkd": 0.5}}
    smskd = next(r for r in runs if r.label == "smskd" and r.seed == 1)
    assert _weights(smskd) == {"kd": None, "fitnets": 10.0, "rkd": 0.5}
    assert not any(r.waits_for_tuning for r in runs)
    # Tuned on seed 2, apart from the compared seeds: single-fitnets' runs are its own.
    singles = [r for r in runs if r.label == "single-fitnets"]
    assert [r.seed for r in singles] == [0, 1] and not any(r.same_as for r in singles)


def test_a_recipe_may_run_on_a_seed_apart_and_seeds_given_restrict_it(tmp_path: Path) -> None:
    """A group chosen among on seed 7, away from the compared seeds 0 and 1: its runs come
    after theirs. `--seeds` replaces every seed: 0 alone leaves it one run, and 0,7 makes
    seed 7 the sweep's too."""
    recipes = ["smskd", {"kind": "smskd", "name": "choose", "group": "choose", "seeds": [7, 0]}]
    path = write_sweep(tmp_path, recipes=recipes)
    runs = [(r.label, r.seed) for r in plan(load_sweep(path), path, tmp_path / "out")]
    compared = [run for run in runs if not run[0].startswith("tune-")]
    assert compared == [("smskd", 0), ("choose", 0), ("smskd", 1), ("choose", 7)]
    both = [("smskd", 0), ("choose", 0), ("smskd", 7), ("choose", 7)]
    for seeds, expected in (([0], [("smskd", 0), ("choose", 0)]), ([0, 7], both)):
        runs = plan(load_sweep(path, seeds=seeds), path, tmp_path / "out")
        assert [(r.label, r.seed) for r in runs if r.group != "tune"] == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tune": {"weights": {"fitnet": [1]}}}, "unknown method 'fitnet'"),
        ({"tune": {"weights": {"rkd": []}}}, "give one or more weights"),
        ({"tune": {"weights": {"rkd": [-1]}}}, "give one or more weights"),
        ({"tune": {"weights": {}}}, "tune.weights"),
        (
            {"tune": {"seeds": [1, 5], "weights": {"rkd": [1]}}},
            r"tune\.seeds \[1\] are also the sweep's seeds.*e\.g\. \[2\]",
        ),
    ],
)
def test_bad_tuning_specs_are_one_line(tmp_path: Path, fields, message) -> None:
    with pytest.raises(UserError, match=message):
        load_sweep(write_sweep(tmp_path, **fields))


def test_a_weight_a_recipe_sets_wins_over_the_tuned_one(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path, recipes=[{"kind": "smskd", "set": ["stages.1.methods.0.weight=3"]}]
    )
    out = tmp_path / "out"
    for run in plan(load_sweep(path), path, out):
        if run.group == "tune":
            _finish(
                run, val_acc=80.0 if "10.0" in run.label or "0.5" in run.label else 70.0, test_acc=0
            )
    smskd = [r for r in plan(load_sweep(path), path, out) if r.group != "tune"]
    assert {json.dumps(_weights(r)) for r in smskd} == {
        json.dumps({"kd": None, "fitnets": 3.0, "rkd": 0.5})
    }


def test_tuning_needs_a_validation_split(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, set=["stages.*.epochs=1", "teacher.epochs=1"])
    with pytest.raises(UserError, match=r"set data\.val_split"):
        plan(load_sweep(path), path, tmp_path / "out")


def test_a_recipe_runs_on_its_own_seeds(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, recipes=["scratch", {"kind": "joint", "seeds": [1]}])
    runs = plan(load_sweep(path), path, tmp_path / "out")
    assert {(r.label, r.seed) for r in runs if r.group != "tune"} == {
        ("scratch", 0), ("scratch", 1), ("joint", 1)
    }  # fmt: skip


@pytest.mark.slow
def test_a_tuned_sweep_runs_tuning_then_the_rest(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path, seeds=[0], tune={"weights": {"rkd": [0.5, 2]}}, recipes=["single", "smskd"]
    )
    out = tmp_path / "out"
    lines: list[str] = []
    runs = run_sweep(path, out, progress=False, log=lines.append)
    assert "2 tuning runs to train" in lines[0]
    index = json.loads((out / "index.json").read_text())
    tuning = index["tuning"]["quickstart"]["rkd"]
    chosen = max(tuning["val_acc"], key=lambda beta: tuning["val_acc"][beta])
    assert tuning["chosen"] == float(chosen)
    smskd = next(r for r in runs if r.label == "smskd")
    assert _weights(smskd)["rkd"] == float(chosen)
    assert all(r.status == "done" for r in runs)
    assert all(r.val_acc is not None and r.selected_acc is not None for r in runs)
    # A worker that finds tuning unfinished (its result.json not yet written) while runs
    # with the tuned β are done: those wait for the tuning, not a comparison with the
    # base β, and nothing is trained twice.
    (Path(next(r.dir for r in runs if r.group == "tune")) / "result.json").unlink()
    lines.clear()
    run_sweep(path, out, progress=False, log=lines.append)
    assert not [line for line in lines if re.search(r"% val, .*to go", line)], lines


@pytest.mark.slow
def test_two_workers_share_one_sweep_without_training_anything_twice(tmp_path: Path) -> None:
    """The same sweep command started twice at once: tuning, the teacher and every run
    are trained by exactly one of the two processes."""
    import subprocess
    import sys

    path = write_sweep(
        tmp_path, seeds=[0, 1], tune={"weights": {"rkd": [0.5, 2]}}, recipes=["single", "smskd"]
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "smskd.cli.commands", "sweep", str(path), "--out", str(out)]
    command += ["--no-progress", "--no-report"]
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    trained = [
        match for log in logs for match in re.findall(r"\] (\S+) seed (\d+): [\d.]+% val", log)
    ]
    assert len(trained) == len(set(trained)), logs  # nothing twice
    runs = plan(load_sweep(path), path, out)
    distinct = {(r.label, str(r.seed)) for r in runs if r.same_as is None}
    assert set(trained) == distinct
    # A worker that finds the teacher's directory taken waits (and says so) each time.
    started = sum(log.count("training teacher") for log in logs)
    waited = sum(log.count("waiting for a teacher that another worker trains") for log in logs)
    assert started - waited == 1, logs
    assert all((Path(r.dir) / "result.json").is_file() for r in runs if r.same_as is None)


def test_a_teacher_given_by_its_checkpoint_is_listed_with_its_accuracy(tmp_path: Path) -> None:
    from smskd.cli.commands import main

    teacher = tmp_path / "teacher"
    argv = ["train-teacher", str(QUICKSTART), "--out", str(teacher), "--no-progress"]
    assert main([*argv, "--set", "teacher.epochs=1"]) == 0
    path = write_sweep(
        tmp_path,
        seeds=[0],
        set=["stages.*.epochs=1", f"teacher.checkpoint={teacher / 'teacher.pt'}"],
        tune=None,
        recipes=[{"kind": "single", "method": "kd"}],
    )
    run_sweep(path, tmp_path / "out", progress=False, log=lambda _line: None)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    accuracy = json.loads((teacher / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert index["teachers"] == [
        {"model": "convnet-m", "dir": str(teacher), "epochs": 1, "final_acc": accuracy}
    ]


def test_seeds_given_on_the_command_line_keep_tuning_apart(tmp_path: Path) -> None:
    path = write_sweep(tmp_path)  # seeds [0, 1]: tuned on seed 2
    # Fewer seeds this time: the tuning seed is still the file's, not one past 0.
    assert load_sweep(path, seeds=[0]).tune_seeds == [2]
    with pytest.raises(UserError, match=r"with --seeds: tune\.seeds \[2\] are also"):
        load_sweep(path, seeds=[0, 2])


@pytest.mark.slow
def test_a_worker_trains_other_runs_while_another_trains_their_teacher(tmp_path: Path) -> None:
    """The teacher's directory is held (as by another worker) from the moment this worker
    reaches it until a later run has finished: meanwhile the runs without a teacher
    train, and the ones that need it come after, none twice."""
    from contextlib import ExitStack

    from smskd.store.runlock import run_lock

    path = write_sweep(tmp_path, tune=None, recipes=["scratch", "smskd"])
    other_worker = ExitStack()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        held = re.match(r"training teacher \S+ into (\S+)$", line)
        if held and len([x for x in lines if x.startswith("training teacher")]) == 1:
            other_worker.enter_context(run_lock(held.group(1)))
        # That worker is done (or this one blocks on it: release, so that the test fails
        # on the order below rather than hangs).
        if "scratch seed 1: " in line or "another worker trains (" in line:
            other_worker.close()

    runs = run_sweep(path, tmp_path / "out", progress=False, log=log)
    done = [line.split(":")[0] for line in lines if re.search(r"% val, .*to go", line)]
    assert [d.split("] ")[1] for d in done] == [
        "scratch seed 0", "scratch seed 1", "smskd seed 1", "smskd seed 0"
    ]  # fmt: skip
    assert any("smskd seed 0: waiting for a teacher that another worker trains" in x for x in lines)
    assert all(r.status == "done" for r in runs)
