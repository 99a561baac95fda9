"""``smskd report`` on a fabricated sweep directory: numbers checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from smskd.cli.commands import main
from smskd.study.forgetting import stage_one_forgetting
from smskd.study.report import (
    best_single,
    comparison_table,
    findings,
    forgetting_section,
    order_principles,
    versus_sentence,
    write_sweep_report,
)
from smskd.study.results import RecipeResult, SweepResults, load_sweep_results
from smskd.study.stats import t_quantile

# Last-epoch accuracies per seed; each run has 4 epochs whose best is the value + 1
# in epoch 3 (so best-epoch ≠ last-epoch, and the table must tell them apart).
FINAL = {
    "scratch": {0: 70.0, 1: 71.0, 2: 72.0},
    "single-kd": {0: 80.0, 1: 81.0, 2: 79.0},
    "single-fitnets": {0: 75.0, 1: 75.0, 2: 75.0},
    "joint": {0: 80.0, 1: 82.0, 2: 84.0},
    "smskd": {0: 81.0, 1: 84.0, 2: 84.0},
    "ref-none": {0: 79.0, 1: 80.0},  # seed 2 never finished (below)
}
KINDS = {"scratch": "scratch", "joint": "joint", "smskd": "smskd", "ref-none": "smskd"}
HIST = [0.5, 0.25, 0.25, 0.0]


def fabricate(root: Path) -> None:
    runs = []
    for label, finals in FINAL.items():
        three_stages = KINDS.get(label) == "smskd"
        for seed in (0, 1, 2):
            run_dir = root / label / f"seed-{seed}"
            runs.append(
                {
                    "label": label,
                    "kind": KINDS.get(label, "single"),
                    "group": "reference" if label == "ref-none" else "main",
                    "seed": seed,
                    "base": "fake",
                    "stages": "kd → fitnets" if three_stages else label,
                    "dir": str(run_dir),
                    "same_as": None,
                    "status": "done" if seed in finals else "pending",
                }
            )
            run_dir.mkdir(parents=True)
            if seed not in finals:  # a half-done run: metrics, but no result.json
                (run_dir / "metrics.jsonl").write_text(json.dumps({"test_acc": 99.0}) + "\n")
                continue
            final = finals[seed]
            records = []
            for epoch, acc in enumerate([final - 5, final - 1, final + 1, final], 1):
                stage = 1 if not three_stages or epoch <= 2 else 2
                record = {"stage": stage, "global_epoch": epoch, "test_acc": acc,
                          "epoch_time": 2.5}  # fmt: skip
                if stage == 2:
                    record["train_ref_weight_hist"] = HIST
                records.append(record)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run_dir / "result.json").write_text("{}")
    # stages-2 is the same config as smskd: it points at smskd's runs.
    for seed in (0, 1, 2):
        runs.append({**runs[12 + seed], "label": "stages-2", "group": "stages",
                     "same_as": runs[12 + seed]["dir"]})  # fmt: skip
    index = {
        "sweep": "fabricated",
        "sweep_file": "configs/sweeps/fake.yaml",
        "bases": ["../fake.yaml"],
        "commits": ["abc1234"],
        "teachers": [{"model": "resnet20", "dir": "t", "epochs": 15, "final_acc": 90.0}],
        "sizes": {"fake": "fashion-mnist, 8000 training images"},
        "runs": runs,
    }
    (root / "index.json").write_text(json.dumps(index))


def table_rows(report: str, heading: str) -> dict[str, list[str]]:
    section = report.split(f"### {heading}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    fabricate(tmp_path / "sweep")
    return tmp_path / "sweep"


def test_aggregation_by_hand(sweep_dir: Path) -> None:
    results = load_sweep_results(sweep_dir)
    by = {r.label: r for r in results.recipes}
    assert by["smskd"].final == FINAL["smskd"]
    assert by["smskd"].best == {s: v + 1 for s, v in FINAL["smskd"].items()}
    assert by["ref-none"].seeds == 2  # the unfinished seed is not counted
    assert by["stages-2"].final == FINAL["smskd"] and by["stages-2"].same_as == "smskd"

    report = write_sweep_report(sweep_dir, plots=False).read_text()
    main = table_rows(report, "main")
    # smskd: 81, 84, 84 → mean 83, sample std √3 = 1.73; best epoch +1: 84 ± 1.73.
    assert main["smskd"][:4] == ["kd → fitnets", "3", "**83.00 ± 1.73**", "**84.00 ± 1.73**"]
    # vs joint 80, 82, 84: differences 1, 2, 0 → +1 ± t(0.975, 2)·1/√3 = ±2.48.
    assert main["smskd"][4] == "**+1.00 [-1.48, +3.48]**"  # the best Δ of the column
    # The best single is single-kd (mean 80): differences 1, 3, 5 → +3 ± 4.303·2/√3 = ±4.97.
    half = 4.302653 * 2 / math.sqrt(3)
    assert main["smskd"][5] == f"**+3.00 [{3 - half:+.2f}, {3 + half:+.2f}]**"
    assert "Δ test last vs single-kd" in report
    assert main["joint"][4] == "–" and main["single-kd"][5] == "–"  # no Δ to itself
    assert main["single-fitnets"][2] == "75.00 ± 0.00"
    assert main["teacher resnet20"][:3] == ["labels only", "1", "90.00"]
    assert main["scratch"][2] == "71.00 ± 1.00"
    assert main["smskd"][6] == "10s"  # 4 epochs × 2.5 s
    reference = table_rows(report, "reference")
    # Context rows: scratch, and the default SMSKD run the variants change.
    assert set(reference) == {"teacher resnet20", "scratch", "smskd", "ref-none"}
    assert reference["smskd"][2] == "**83.00 ± 1.73**" and reference["smskd"][6] == "–"
    assert "smskd" not in table_rows(report, "stages")  # stages-2 (= smskd) stands for it
    assert reference["ref-none"][1:3] == ["2", "79.50 ± 0.71"]  # under the default's 83
    # ref-none vs joint over seeds 0, 1: differences -1, -2 → -1.5 ± 12.706·0.7071/√2.
    assert reference["ref-none"][4] == "-1.50 [-7.85, +4.85]"
    # Ablation tables also compare with the default SMSKD run: -2, -4 → -3 ± 12.706·√2/√2.
    assert "Δ test last vs smskd [95% CI]" in report.split("### reference")[1].split("\n\n")[1]
    assert reference["ref-none"][6] == "**-3.00 [-15.71, +9.71]**"
    assert reference["teacher resnet20"][-4:] == ["–", "–", "–", "–"]
    assert "stages-2 (= smskd)" in table_rows(report, "stages")
    # Headline sentences say what was measured, including a non-win.
    headline = "vs joint: Δ last-epoch accuracy +1.00 [-1.48, +3.48] over 3 paired seeds — no "
    assert headline in report
    # Each ablation against the default run, in words: ref-none -3 [-15.71, +9.71].
    ablation = "reference against the default SMSKD run (smskd), Δ last-epoch test accuracy "
    ablation += "with 95% CI: no difference detectable — ref-none -3.00 [-15.71, +9.71]."
    assert ablation in report
    assert "stages against the default" not in report  # stages-2 is the default's own runs
    assert "commit(s) `abc1234`" in report and "configs/sweeps/fake.yaml" in report
    # stages-2's results are smskd's runs: counted once.
    assert f"from {sum(len(f) for f in FINAL.values())} distinct runs" in report
    assert "*best epoch* is the best of all epochs on the test split" in report


def test_plots_are_written_and_not_blank(sweep_dir: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    report = write_sweep_report(sweep_dir).read_text()
    for name in ("curves", "final", "ablations", "weights"):
        path = sweep_dir / "plots" / f"{name}.png"
        assert f"](plots/{name}.png)" in report
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        pixels = plt.imread(path)
        assert pixels.std() > 0.05  # drawn on, not a blank canvas


def test_weight_distribution_is_the_mean_histogram_per_stage(sweep_dir: Path) -> None:
    from smskd.study.plots import stage_boundaries, weight_distributions

    results = load_sweep_results(sweep_dir)
    smskd = next(r for r in results.recipes if r.label == "smskd")
    assert weight_distributions(smskd) == {2: HIST}
    assert stage_boundaries(smskd.curves[0]) == [2.5]


def test_report_cli_on_a_directory_without_index(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no index.json" in capsys.readouterr().err


# A sweep with a validation split: per recipe, per seed, (val, test) of 3 epochs.
VALIDATED = {
    "single-kd": {0: [(60, 70), (62, 80), (61, 81)], 1: [(60, 70), (63, 79), (62, 82)]},
    "single-fitnets": {0: [(70, 60), (72, 61), (71, 62)], 1: [(70, 60), (71, 64), (72, 63)]},
    "smskd": {0: [(50, 50), (65, 75), (64, 77)], 1: [(55, 55), (66, 74), (64, 78)]},
    "ref-none": {0: [(50, 50), (60, 70), (61, 72)], 1: [(55, 55), (60, 71), (62, 73)]},
}
# The forgetting rows of the two 2-stage recipes: stage 1's KD loss at the ends of
# stages 1 and 2.
FORGOT = {"smskd": {0: (1.0, 1.5), 1: (2.0, 2.25)}, "ref-none": {0: (1.0, 2.0), 1: (2.0, 3.0)}}


def fabricate_validated(root: Path) -> None:
    runs = []
    for label, seeds in VALIDATED.items():
        kind = "smskd" if label in FORGOT else "single"
        for seed, epochs in seeds.items():
            run_dir = root / label / f"seed-{seed}"
            run_dir.mkdir(parents=True)
            runs.append({"label": label, "kind": kind, "seed": seed, "base": "fake",
                         "group": "reference" if label == "ref-none" else "main",
                         "stages": "kd → fitnets" if kind == "smskd" else label,
                         "dir": str(run_dir), "same_as": None})  # fmt: skip
            records = [
                {"stage": 1, "global_epoch": e, "val_acc": v, "test_acc": t, "epoch_time": 1}
                for e, (v, t) in enumerate(epochs, 1)
            ]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run_dir / "result.json").write_text("{}")
            if label in FORGOT:
                first, last = FORGOT[label][seed]
                rows = [
                    {"stage": 1, "label": "kd", "measures": {"loss:kd": first}},
                    {"stage": 2, "label": "fitnets", "measures": {"loss:kd": last}},
                ]
                (run_dir / "forgetting.json").write_text(json.dumps({"rows": rows}))
    tuning = {"fitnets": {"val_acc": {"1.0": 70.5, "10.0": 71.5}, "seeds": {"1.0": [0]},
                          "chosen": 10.0, "complete": True}}  # fmt: skip
    index = {"sweep": "validated", "runs": runs, "tuning": {"fake": tuning}}
    (root / "index.json").write_text(json.dumps(index))


def test_with_a_validation_split_choices_read_validation_only(tmp_path: Path) -> None:
    fabricate_validated(tmp_path)
    report = write_sweep_report(tmp_path, plots=False).read_text()
    main = table_rows(report, "main")
    header = report.split("### main\n\n", 1)[1].splitlines()[0]
    assert "| val acc, last epoch | test acc, last epoch | test acc, best-val epoch |" in header
    # single-fitnets has the best validation accuracy (71.5 vs 61.5): it is the best
    # single method, though single-kd's test accuracy is higher.
    assert "Δ test last vs single-fitnets" in header and "single-kd [95%" not in header
    # smskd's best validation epoch is epoch 2 in both seeds: test 75 and 74.
    assert main["smskd"][2:5] == ["64.00 ± 0.00", "77.50 ± 0.71", "74.50 ± 0.71"]
    # single-fitnets: the best validation is epoch 2 (72) in seed 0, 3 (72) in seed 1.
    assert main["single-fitnets"][4] == "62.00 ± 1.41"  # tests 61 and 63
    tuning = report.split("### tuning", 1)[1].split("\n\n")[2].splitlines()
    assert tuning[2:] == ["| fitnets | 1.0 | 70.50 | 0 |  |", "| fitnets | 10.0 | 71.50 |  | ✓ |"]
    # What the second stage took from the first: Δ loss:kd, smskd 0.5 and 0.25, ref-none
    # 1.0 and 1.0: paired -0.5, -0.75 → -0.625 ± 12.706·0.17678/√2.
    forgetting = report.split("### forgetting", 1)[1]
    half = 12.706205 * 0.1767767 / math.sqrt(2)
    row = f"| Δ loss:kd | 0.375 ± 0.177 | 1.000 ± 0.000 | -0.625 [{-0.625 - half:+.3f}, "
    assert row + f"{-0.625 + half:+.3f}] |" in forgetting
    assert "optimistic" in report  # the note on reports without one stays


def _recipe(label: str, kind: str, group: str, test: dict, val: dict, runs: dict | None = None):
    runs = runs or {seed: f"{label}/seed-{seed}" for seed in test}
    return RecipeResult(label, kind, group, "b", label, final=test, val_final=val, runs=runs)


def test_ablation_findings_choose_on_validation_and_adjust_for_several_variants() -> None:
    smskd = _recipe("smskd", "smskd", "main", {0: 80, 1: 81, 2: 82}, {0: 80, 1: 80, 2: 80})
    # "a" is better on test, "b" on validation: validation prefers b.
    a = _recipe("a", "smskd", "choices", {0: 83, 1: 83, 2: 86}, {0: 70, 1: 70, 2: 70})
    b = _recipe("b", "smskd", "choices", {0: 79, 1: 81, 2: 81}, {0: 90, 1: 90, 2: 90})
    said = findings(SweepResults({}, [smskd, a, b]), "b")
    assert said[0].startswith("choices: preferred on validation: b (90.00 val, 80.33 test")
    assert said[0].endswith("mean over seeds 0, 1, 2).")
    # Two variants against the default: 97.5% intervals. a − smskd = 3, 2, 4: mean 3, sd 1.
    half = t_quantile(1 - 0.0125, 2) / math.sqrt(3)
    assert "with 97.5% CIs (Bonferroni, 2 comparisons)" in said[1]
    assert f"a +3.00 [{3 - half:+.2f}, {3 + half:+.2f}]" in said[1]
    # Unadjusted, a would be called different (3 ± 2.48); adjusted (3 ± 3.57) it is not.
    assert 3 - 4.302653 / math.sqrt(3) > 0 > 3 - half
    assert "different —" not in said[1]


def test_a_choice_made_on_a_seed_apart_is_made_among_that_seed_s_runs() -> None:
    """The main table's SMSKD runs on seeds 0–2; the choice is made on seed 5, among
    runs of its own, one of them the default config: the main default is no candidate
    (it shares no seed), and no variant is compared with it (no common seed)."""
    smskd = _recipe("smskd", "smskd", "main", {0: 80, 1: 81, 2: 82}, {0: 99, 1: 99, 2: 99})
    default = _recipe("choose-default", "smskd", "choose", {5: 80}, {5: 85})
    batch = _recipe("choose-batch-mean", "smskd", "choose", {5: 79}, {5: 86})
    said = findings(SweepResults({}, [smskd, default, batch]), "b")
    assert said == [
        "choose: preferred on validation: choose-batch-mean (86.00 val, 79.00 test, "
        "mean over seed 5)."
    ]


def test_a_recipe_made_partly_of_another_s_runs_is_compared_on_its_own_seeds_only() -> None:
    kd = _recipe("single-kd", "single", "main", {0: 80, 1: 81, 2: 83}, {0: 1, 1: 1, 2: 1})
    # stages-1's seed-0 run is single-kd's (the same config); seeds 1 and 2 are its own.
    runs = {0: "single-kd/seed-0", 1: "stages-1/seed-1", 2: "stages-1/seed-2"}
    stages = _recipe("stages-1", "single", "stages", {0: 80, 1: 82, 2: 85}, {}, runs)
    smskd = _recipe("smskd", "smskd", "main", {0: 70, 1: 70, 2: 70}, {0: 1, 1: 1, 2: 1})
    table = comparison_table(SweepResults({}, [kd, smskd, stages]), "b", "stages")
    header, _, *lines = table.splitlines()
    rows = {}
    for line in [header, *lines]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header.strip("|").split("|"), cells, strict=True))
    versus_kd = next(h for h in header.strip("|").split("|") if "vs single-kd" in h)
    # Against single-kd only seeds 1 and 2 count: differences 1, 2 → +1.50, and the row
    # is its own, not "(= single-kd)".
    assert rows["stages-1"][versus_kd].strip("*").startswith("+1.50 [")


def test_what_stage_1_lost_is_compared_on_the_seeds_both_recipes_have() -> None:
    def rows(first: float, last: float) -> list[dict]:
        return [
            {"stage": 1, "label": "kd", "methods": ["kd"], "measures": {"loss:kd": first}},
            {"stage": 2, "label": "rkd", "methods": ["rkd"], "measures": {"loss:kd": last}},
        ]

    smskd = _recipe("smskd", "smskd", "main", {0: 80, 1: 80, 2: 80}, {})
    smskd.forgetting = {0: rows(1, 1.5), 1: rows(1, 1.5), 2: rows(1, 9.5)}
    off = _recipe("ref-none", "smskd", "reference", {0: 80, 1: 80}, {})
    off.forgetting = {0: rows(1, 2), 1: rows(1, 2)}
    text = "\n".join(forgetting_section(SweepResults({}, [smskd, off]), "b"))
    # Seed 2 (ref-none never finished it) is in neither column: 0.5 vs 1.0, Δ -0.5.
    assert "| Δ loss:kd | 0.500 ± 0.000 | 1.000 ± 0.000 | -0.500 [" in text
    assert "KL(p_j ‖ p_k)" in text and "Δ teacher_agreement: positive, it kept more" in text


def test_the_best_single_method_is_chosen_on_the_seeds_all_of_them_have() -> None:
    # A partial sweep: single-fitnets's seed 1 is in, single-kd's is not yet.
    kd = _recipe("single-kd", "single", "main", {0: 80}, {0: 85})
    fitnets = _recipe("single-fitnets", "single", "main", {0: 80, 1: 80}, {0: 90, 1: 70})
    # On seed 0, the only one both have, FitNets is better (90 vs 85), though its
    # mean over its own seeds (80) is lower.
    assert best_single(SweepResults({}, [kd, fitnets]), "b") is fitnets


def test_a_recipe_without_validation_in_a_validated_sweep_is_shown_not_fatal() -> None:
    smskd = _recipe("smskd", "smskd", "main", {0: 80, 1: 81}, {0: 82, 1: 83})
    smskd.selected = {0: 80, 1: 81}
    old = _recipe("scratch", "scratch", "main", {0: 70, 1: 71}, {})  # logged no val_acc
    old.best = {0: 72, 1: 73}
    table = comparison_table(SweepResults({}, [smskd, old]), "b", "main")
    assert "| scratch | scratch | 2 | – | 70.50 ± 0.71 | – |" in table


def test_validation_may_prefer_the_default_and_reads_the_seeds_all_have() -> None:
    smskd = _recipe("smskd", "smskd", "main", {0: 80, 1: 80}, {0: 85, 1: 85})
    # a's seed 1 is not in yet: on seed 0, the one all have, the default is best (85 vs
    # 80), though a's mean over its own two seeds (90) is higher.
    a = _recipe("a", "smskd", "choices", {0: 80, 1: 80, 2: 80}, {0: 80, 2: 100})
    said = findings(SweepResults({}, [smskd, a]), "b")
    assert said[0] == (
        "choices: preferred on validation: the default smskd (85.00 val, 80.00 test, "
        "mean over seed 0)."
    )


def test_an_old_forgetting_file_with_a_method_in_two_stages_is_not_summarized() -> None:

    def row(stage: int, method: str, kd: float) -> dict:
        return {"stage": stage, "label": method, "methods": [method], "measures": {"loss:kd": kd}}

    # Written before per-stage columns: loss:kd's options changed in stage 3.
    old = _recipe("smskd", "smskd", "main", {0: 80}, {})
    old.forgetting = {0: [row(1, "kd", 1.0), row(2, "fitnets", 1.5), row(3, "kd", 0.2)]}
    assert "Δ loss:kd" not in stage_one_forgetting(old)
    new = _recipe("smskd", "smskd", "main", {0: 80}, {})
    rows = [row(1, "kd", 1.0), row(2, "fitnets", 1.5), row(3, "kd", 0.2)]
    for r, (first, second) in zip(rows, [(1.0, 0.5), (1.5, 0.6), (1.25, 0.2)], strict=True):
        r["measures"] = {"loss:kd@1": first, "loss:kd@3": second}
    new.forgetting = {0: rows}
    assert stage_one_forgetting(new)["Δ loss:kd@1"] == {0: 0.25}


def test_a_recipe_is_a_copy_only_if_all_its_runs_are(tmp_path: Path) -> None:
    runs = []
    for label, seed, same in [
        ("single-kd", 0, None), ("single-kd", 1, None),
        ("stages-1", 0, "single-kd/seed-0"), ("stages-1", 1, None),
    ]:  # fmt: skip
        run_dir = tmp_path / label / f"seed-{seed}"
        run_dir.mkdir(parents=True)
        record = {"stage": 1, "global_epoch": 1, "test_acc": 80.0 + seed, "epoch_time": 1}
        (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        (run_dir / "result.json").write_text("{}")
        runs.append({"label": label, "kind": "single", "group": "main", "seed": seed,
                     "base": "b", "stages": "kd", "dir": str(run_dir),
                     "same_as": str(tmp_path / same) if same else None})  # fmt: skip
    (tmp_path / "index.json").write_text(json.dumps({"runs": runs}))
    by = {r.label: r for r in load_sweep_results(tmp_path).recipes}
    assert by["stages-1"].same_as is None
    assert by["stages-1"].runs[0] == by["single-kd"].runs[0] != by["stages-1"].runs[1]


def test_every_smskd_recipe_of_the_main_table_is_said_against_joint_and_single() -> None:
    kd = _recipe("single-kd", "single", "main", {0: 80, 1: 82}, {0: 80, 1: 80})
    joint = _recipe("joint", "joint", "main", {0: 80, 1: 80}, {0: 80, 1: 80})
    smskd = _recipe("smskd", "smskd", "main", {0: 79, 1: 79}, {0: 80, 1: 80})
    chosen = _recipe("smskd-batch-mean", "smskd", "main", {0: 81, 1: 83}, {0: 80, 1: 80})
    said = findings(SweepResults({}, [kd, joint, smskd, chosen]), "b")
    assert [s.split(":")[0] + " vs " + s.split(" vs ")[1].split(":")[0] for s in said] == [
        "SMSKD (smskd vs joint", "SMSKD (smskd vs single-kd",
        "SMSKD (smskd-batch-mean vs joint", "SMSKD (smskd-batch-mean vs single-kd",
    ]  # fmt: skip
    # smskd-batch-mean − single-kd: 1, 1 → +1.00 with no spread.
    assert said[3].endswith("+1.00 [+1.00, +1.00] over 2 paired seeds — the same difference "
                            "on every seed: no spread to judge by.")  # fmt: skip


def _order(plan: str, test: dict[int, float]) -> RecipeResult:
    label = "order-" + plan.replace(" → ", "-")
    return RecipeResult(label, "orders", "orders", "b", plan, final=test)


def test_the_first_and_the_last_stage_s_method_are_each_judged_against_the_other_orders():
    orders = [
        _order("kd → fitnets → rkd", {0: 90, 1: 91, 2: 91}),
        _order("kd → rkd → fitnets", {0: 89, 1: 89, 2: 89}),
        _order("fitnets → kd → rkd", {0: 91, 1: 91, 2: 91}),
        _order("fitnets → rkd → kd", {0: 93, 1: 94, 2: 95}),
        _order("rkd → kd → fitnets", {0: 88, 1: 88, 2: 88}),
        _order("rkd → fitnets → kd", {0: 92, 1: 92, 2: 93}),
    ]
    first, last, family_order = order_principles(orders)
    # 2 positions × 3 methods = 6 comparisons: 99.17% intervals.
    t = t_quantile(1 - 0.05 / 12, 2)
    # fitnets first: (91 + 93) / 2 = 92, 92.5, 93 against the other four's 89.75, 90,
    # 90.25: Δ 2.25, 2.5, 2.75, mean 2.5, sd 0.25.
    half = t * 0.25 / math.sqrt(3)
    assert f"fitnets (feature) 92.50, +2.50 [{2.5 - half:+.2f}, {2.5 + half:+.2f}]" in first
    assert "99.17% CIs, Bonferroni over 6" in first
    assert first.endswith("— fitnets first is better.")
    # fitnets last: 88.5 on every seed against 91.5, 92, 92.5: Δ −3, −3.5, −4.
    half = t * 0.5 / math.sqrt(3)
    assert f"fitnets (feature) 88.50, -3.50 [{-3.5 - half:+.2f}, {-3.5 + half:+.2f}]" in last
    assert last.endswith("— fitnets last is worse.")
    # kd → fitnets → rkd is response → feature → relation: 90.67, 4th of 6 on test.
    assert family_order == (
        "orders: kd → fitnets → rkd (response → feature → relation) ranks 4 of 6 on test "
        "(90.67; the best, fitnets → rkd → kd, 94.00)."
    )
    # Only the seeds every order has count (seed 2 of one order has not finished):
    # fitnets first on seeds 0 and 1, (92 + 92.5) / 2, Δ 2.25 and 2.5.
    del orders[4].final[2]
    assert f"fitnets (feature) 92.25, {(2.25 + 2.5) / 2:+.2f} [" in order_principles(orders)[0]
    # An order missing, or only two stages: no principle to test.
    assert order_principles(orders[1:]) == []
    two = [_order("kd → rkd", {0: 90, 1: 91}), _order("rkd → kd", {0: 89, 1: 88})]
    assert order_principles(two) == []


def test_a_verdict_names_its_subject_as_given_mid_sentence_and_capitalized_first() -> None:
    searched = _recipe("searched", "smskd", "search", {1: 82, 2: 83, 3: 85}, {})
    smskd = _recipe("smskd", "smskd", "main", {1: 80, 2: 80, 3: 81}, {})
    (said,) = versus_sentence(searched, smskd, "the searched plan")
    assert said.startswith("The searched plan (searched: searched) vs smskd: Δ last-epoch")
    assert said.endswith("over 3 paired seeds — the searched plan is better.")
