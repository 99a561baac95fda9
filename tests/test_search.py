"""``smskd search``: prefixes trained once and shared, the budget, the chosen plan
reproduced from scratch, resume after SIGKILL, two workers, bad specs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from smskd.config import load_config
from smskd.errors import UserError
from smskd.experiment import distill
from smskd.study.search import BEST, Search, load_search, naive_counts, run_search
from smskd.study.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QUIET = {"log": lambda _line: None}


def write_spec(folder: Path, **fields) -> Path:
    spec = {
        "name": "tiny",
        "base": str(QUICKSTART),
        "set": ["teacher.epochs=1", "data.val_split=200"],
        "methods": {"kd": [1], "rkd": [0.5, 2]},
        "epochs": [1],
        "max_stages": 2,
        "budget": {"stage_trainings": 20},
        **fields,
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "nodes").glob("*/result.json")}


def test_the_grid_counts() -> None:
    spec = load_search(write_spec(Path("/tmp"), lam=[0.5, 1], epochs=[1, 2], max_stages=3))
    # 3 (method, β) × 2 epochs = 6 choices a stage; λ from stage 2 on.
    plans = 6 + 36 * 2 + 216 * 2
    assert naive_counts(spec) == (plans, 6 + 2 * 72 + 3 * 432)


def test_each_prefix_is_trained_once_and_extended_from_its_student(tmp_path: Path) -> None:
    out = tmp_path / "out"
    best = run_search(write_spec(tmp_path), out, final=False, **QUIET)
    trained = results(out)
    assert len(trained) == len({json.dumps([r["stages"], r["lam"]]) for r in trained.values()})
    assert len(trained) <= 3 + 9  # the distinct prefixes of the space
    for name, result in trained.items():
        if len(result["stages"]) == 2:  # starts from its parent's student, anchored to it
            cfg = load_config(out / "nodes" / name / "config.yaml")
            parent = Path(cfg.student.checkpoint).parent.name
            assert trained[parent]["stages"] == result["stages"][:1]
            assert (cfg.continues.stages, cfg.continues.epochs) == (1, 1)
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'search.db'}")
    visits = sum(1 for t in study.trials for key in t.user_attrs if key.startswith("node_"))
    assert visits > len(trained)  # plans shared prefixes instead of training them again
    assert best.val_acc == max(r["val_acc"] for r in trained.values())
    assert (out / "report.md").is_file() and (out / BEST).is_file()
    # The final retrain: a sweep of the chosen plan beside the baselines, on seeds apart
    # from the search's (0).
    final = load_sweep(out / "final.yaml")
    assert final.seeds == [1, 2, 3]
    searched = final.recipes[-1]
    assert searched.name == "searched" and [r.kind for r in final.recipes] == [
        "single", "joint", "smskd", "smskd"
    ]  # fmt: skip
    chosen = load_config(out / BEST).stages
    assert [s.methods[0].name for s in chosen] == [s.method for s in best.stages]


def test_the_budget_is_respected(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_search(write_spec(tmp_path, budget={"stage_trainings": 3}), out, final=False, **QUIET)
    assert len(results(out)) == 3
    out = tmp_path / "epochs"
    spec = write_spec(tmp_path, epochs=[1, 2], budget={"student_epochs": 4})
    run_search(spec, out, final=False, **QUIET)
    assert sum(r["epochs"] for r in results(out).values()) <= 4


def test_the_chosen_plan_from_scratch_scores_what_the_search_saw(tmp_path: Path) -> None:
    """best.yaml, run whole by smskd distill, trains the stages the search trained one
    prefix at a time: the same validation accuracy, to the last digit."""
    out = tmp_path / "out"
    best = run_search(
        write_spec(tmp_path, budget={"stage_trainings": 5}), out, final=False, **QUIET
    )
    cfg = load_config(out / BEST)
    result = distill(cfg, tmp_path / "again", progress=False)
    assert result.history[-1]["val_acc"] == best.val_acc


def test_a_plan_that_diverges_is_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = write_spec(tmp_path, methods={"kd": [1], "fitnets": [1e38]}, max_stages=1)
    best = run_search(spec, out, final=False, **QUIET)
    trained = results(out)
    failed = [r for r in trained.values() if r["val_acc"] is None]
    assert len(trained) == 2 and len(failed) == 1
    assert "NaN/Inf" in failed[0]["error"] and failed[0]["stages"][0][0] == "fitnets"
    assert best.stages[0].method == "kd"
    assert "| fitnets(β=1e+38,1ep) | failed |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"methods": {"kdd": [1]}}, "unknown method 'kdd'"),
        ({"methods": {"kd": []}}, "give one or more weights"),
        ({"budget": {}}, "give stage_trainings, student_epochs or seconds"),
        ({"epochs": [0]}, "every epoch choice must be > 0"),
        ({"lam": [-1]}, "every λ must be ≥ 0"),
        ({"seed": 2, "final": {"seeds": [1, 2]}}, r"include the search's seed 2.*\[3, 4, 5\]"),
    ],
)
def test_bad_specs_are_one_line(tmp_path: Path, fields, message) -> None:
    with pytest.raises(UserError, match=message):
        load_search(write_spec(tmp_path, **fields))


def test_a_base_without_validation_split_is_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path, set=["teacher.epochs=1"])
    with pytest.raises(UserError, match=r"set data\.val_split"):
        Search(load_search(path), path, tmp_path / "out")


@pytest.mark.parametrize("choice", ["reference.snapshot=best", "schedule_across_stages=continue"])
def test_a_base_a_plan_cannot_be_split_from_is_refused(tmp_path: Path, choice: str) -> None:
    path = write_spec(tmp_path, set=["teacher.epochs=1", "data.val_split=200", choice])
    with pytest.raises(UserError, match="one stage at a time"):
        Search(load_search(path), path, tmp_path / "out")


def _command(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "smskd.cli.commands", "search", str(spec), "--out", str(out),
            "--no-final", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_a_killed_search_resumes_without_retraining_finished_prefixes(tmp_path: Path) -> None:
    spec, out = write_spec(tmp_path, budget={"stage_trainings": 6}), tmp_path / "out"
    worker = subprocess.Popen(
        _command(spec, out), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while len(results(out)) < 2 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    finished = {name: (out / "nodes" / name / "metrics.jsonl").read_text() for name in results(out)}
    assert len(finished) >= 2
    lines: list[str] = []
    run_search(spec, out, final=False, log=lines.append)
    retrained = [line for line in lines if line.startswith("trained ")]
    assert len(results(out)) == 6 and len(retrained) == 6 - len(finished)
    for name, metrics in finished.items():  # untouched
        assert (out / "nodes" / name / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_two_workers_share_one_search_without_training_a_prefix_twice(tmp_path: Path) -> None:
    spec, out = write_spec(tmp_path, budget={"stage_trainings": 6}), tmp_path / "out"
    workers = [
        subprocess.Popen(
            _command(spec, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    trained = [m for log in logs for m in re.findall(r"^trained (.+): [\d.]+% val", log, re.M)]
    assert len(trained) == len(set(trained)), logs  # no prefix twice
    assert sorted(trained) == sorted(
        " → ".join(f"{m}(β={b:g},{e}ep)" for m, b, e in r["stages"])
        + (f", λ={r['lam']:g}" if r["lam"] is not None else "")
        for r in results(out).values()
    )
    assert 6 <= len(trained) <= 7  # each worker checks the budget before it trains: +1 at most
    # Each waits for the prefix the other is training, then both choose the same plan.
    chosen = [re.findall(r"^best plan: (.+): [\d.]+% val", log, re.M) for log in logs]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 1, logs


@pytest.mark.slow
def test_the_final_retrain_runs_the_chosen_plan_beside_the_baselines(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, budget={"stage_trainings": 2}, final={"seeds": [1]})
    out = tmp_path / "out"
    run_search(spec, out, **QUIET)
    report = (out / "report.md").read_text()
    assert "Retrained from scratch over seeds [1] beside single KD" in report
    final = json.loads((out / "final" / "index.json").read_text())
    assert {(r["label"], r["seed"], r["status"]) for r in final["runs"]} == {
        (label, 1, "done") for label in ("single-kd", "joint", "smskd", "searched")
    }
    final_section = report.split("## The chosen plan on the test split")[1]
    assert "| searched |" in final_section
    # In words, against each baseline (one seed: no interval), and each recipe's β.
    assert re.search(r"^- The searched plan \(searched: .+\) vs single-kd: Δ last-epoch "
                     r"accuracy [+-][\d.]+ \(1 seed\) over 1 paired seeds — too few", final_section,
                     re.M)  # fmt: skip
    assert "- single-kd: kd β 1\n" in final_section
    assert "- smskd: kd β 1 → fitnets β 10 → rkd β 1, λ 1\n" in final_section
    assert re.search(r"Cost: 2 stage trainings .+ \d+ min of the workers' time", report)
