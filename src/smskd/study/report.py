"""A sweep's report as markdown: one table per comparison with mean ± std over seeds
and paired differences to joint and to the best single method, plain-sentence findings,
the plots, and what made the numbers (:func:`write_sweep_report`)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from smskd.errors import UserError
from smskd.methods.registry import FAMILIES, METHODS
from smskd.store.provenance import git_commit, software
from smskd.study.forgetting import mean_matrix, stage_one_forgetting
from smskd.study.lm_report import (
    curves_plot,
    is_language_model_sweep,
    language_model_section,
    samples_section,
)
from smskd.study.plots import require_matplotlib, sweep_plots
from smskd.study.results import RecipeResult, SweepResults, load_sweep_results, located
from smskd.study.stats import PairedDifference, mean_std, paired_difference
from smskd.study.sweep import TUNE_GROUP


def _mean_std_text(values: dict[int, float], digits: int = 2) -> str:
    if not values:
        return "–"
    mean, std = mean_std(list(values.values()))
    # No spread of one value.
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _diff_text(diff: PairedDifference | None, digits: int = 2) -> str:
    if diff is None:
        return "–"
    if diff.low is None:
        return f"{diff.mean:+.{digits}f} (1 seed)"
    return f"{diff.mean:+.{digits}f} [{diff.low:+.{digits}f}, {diff.high:+.{digits}f}]"


def best_single(results: SweepResults, base: str) -> RecipeResult | None:
    """The single-method baseline with the highest mean last-epoch accuracy: validation
    accuracy when the runs have a validation split (the test split never chooses),
    else test accuracy (an older sweep; the report says so)."""
    singles = [r for r in results.of(base, kind="single") if r.final and r.group != TUNE_GROUP]
    scores = (
        [r.val_final for r in singles] if results.has_validation else [r.final for r in singles]
    )
    scored = [(r, s) for r, s in zip(singles, scores, strict=True) if s]
    # On the seeds all of them have (a partial sweep: the choice must not flip with
    # which seeds happen to have finished), if there are any.
    common = _common_seeds([s for _, s in scored])
    top = max(scored, key=lambda rs: _mean_on(rs[1], common or list(rs[1])), default=None)
    return top[0] if top is not None else None


def _common_seeds(scores: list[dict[int, float]]) -> list[int]:
    return sorted(set.intersection(*(set(s) for s in scores))) if scores else []


def _mean_on(values: dict[int, float], seeds: list[int]) -> float:
    return _mean({s: values[s] for s in seeds})


def _anchor(results: SweepResults, base: str, kind: str) -> RecipeResult | None:
    """The recipe of ``kind`` the others are compared with: the main table's first."""
    candidates = [r for r in results.of(base, kind=kind) if r.final and r.same_as is None]
    return min(candidates, key=lambda r: r.group != "main", default=None)


def paired(a: RecipeResult, b: RecipeResult, confidence: float = 0.95) -> PairedDifference | None:
    """``a − b`` paired by seed, over the seeds where the two are different runs (a
    recipe made partly of another's runs is not compared with itself on those)."""
    seeds = [
        s
        for s in set(a.final) & set(b.final)
        if a.runs.get(s) is None or a.runs.get(s) != b.runs.get(s)
    ]
    return paired_difference(
        {s: a.final[s] for s in seeds}, {s: b.final[s] for s in seeds}, confidence
    )


def _mean(values: dict[int, float]) -> float:
    return mean_std(list(values.values()))[0]


def comparison_table(results: SweepResults, base: str, group: str) -> str:
    """A markdown table of one comparison: mean ± std over seeds, and each recipe's
    paired Δ to joint, to the best single method and, in an ablation group, to the
    default SMSKD run; the best of each column in bold."""
    single = best_single(results, base)
    anchors = [("joint", _anchor(results, base, "joint")), ("single", single)]
    if group != "main":
        anchors.append(("smskd", _anchor(results, base, "smskd")))
    anchors = [(key, anchor) for key, anchor in anchors if anchor is not None]
    rows = results.of(base, group)
    # Scratch, and in an ablation group the default SMSKD run its variants change,
    # unless a row of the group already is it (stages-3 = smskd).
    context = [_anchor(results, base, "scratch")]
    if group != "main":
        context.append(_anchor(results, base, "smskd"))
    context = [
        r
        for r in context
        if r is not None and r not in rows and all(row.same_as != r.label for row in rows)
    ]
    shown = [r for r in context + rows if r.final]

    def versus(anchor: RecipeResult, r: RecipeResult) -> PairedDifference | None:
        # The anchor's own row (or a row made of its runs) has no difference to show.
        return paired(r, anchor)

    diffs = {key: {r.label: versus(anchor, r) for r in shown} for key, anchor in anchors}
    validated = results.has_validation
    columns = {
        "val": {r.label: _mean(r.val_final) for r in shown if r.val_final},
        "last": {r.label: _mean(r.final) for r in shown},
        "best": {
            r.label: _mean(r.selected if validated else r.best)
            for r in shown
            if (r.selected if validated else r.best)
        },
        **{
            key: {label: d.mean for label, d in by_label.items() if d is not None}
            for key, by_label in diffs.items()
        },
    }
    winners = {name: max(values.values(), default=None) for name, values in columns.items()}

    def cell(name: str, label: str, text: str) -> str:
        value = columns[name].get(label)
        return f"**{text}**" if value is not None and value == winners[name] else text

    headers = [f"Δ test last vs {anchor.label} [95% CI]" for _, anchor in anchors]
    accuracy = ["test acc, last epoch"]
    accuracy = (
        ["val acc, last epoch", *accuracy, "test acc, best-val epoch"]
        if validated
        else [*accuracy, "test acc, best epoch (chosen on test)"]
    )
    lines = [
        "| recipe | stages | seeds | " + " | ".join([*accuracy, *headers]) + " | time per run |",
        "|---|---|---:|" + "---:|" * (len(accuracy) + len(anchors)) + "---:|",
    ]
    # After the test accuracy: the chosen-epoch column and the Δ columns.
    after_test = len(accuracy) - accuracy.index("test acc, last epoch") - 1
    dashes = " | ".join("–" for _ in range(after_test + len(anchors)))
    for teacher in results.teachers():
        lines.append(
            f"| teacher {teacher['model']} | labels only | 1 | "
            + ("– | " if validated else "")
            + f"{teacher['final_acc']:.2f} | {dashes} | – |"
        )
    for r in shown:
        seconds = _mean(r.wall_time) if r.wall_time else 0.0
        name = r.label + (f" (= {r.same_as})" if r.same_as else "")
        scores = [
            *([cell("val", r.label, _mean_std_text(r.val_final))] if validated else []),
            cell("last", r.label, _mean_std_text(r.final)),
            cell("best", r.label, _mean_std_text(r.selected if validated else r.best)),
        ]
        cells = [
            name,
            r.stages,
            str(r.seeds),
            *scores,
            *(cell(key, r.label, _diff_text(diffs[key][r.label])) for key, _ in anchors),
            f"{seconds:.0f}s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _against_default(smskd: RecipeResult, recipes: list[RecipeResult], group: str) -> list[str]:
    """One sentence per ablation group: each variant against the default SMSKD run on
    the seeds both have — which of them changes the result, and which does not. With m
    variants, each interval is Bonferroni-adjusted (confidence 1 − 0.05/m), so that the
    chance of calling any of them different by luck stays under 5%."""
    variants = [r for r in recipes if (d := paired(r, smskd)) is not None and d.low is not None]
    if not variants:
        return []
    m = len(variants)
    clear, unclear = [], []
    for recipe in variants:
        diff = paired(recipe, smskd, confidence=1 - 0.05 / m)
        assert diff is not None
        text = f"{recipe.label} {_diff_text(diff)}"
        (clear if diff.verdict in ("higher", "lower") else unclear).append(text)
    adjusted = f"{100 - 5 / m:.4g}% CIs (Bonferroni, {m} comparisons)" if m > 1 else "95% CI"
    said = (
        f"{group} against the default SMSKD run ({smskd.label}), Δ last-epoch test "
        f"accuracy with {adjusted}: "
    )
    if clear:
        said += f"different — {'; '.join(clear)}"
    if unclear:
        said += ("; " if clear else "") + f"no difference detectable — {'; '.join(unclear)}"
    return [said + "."]


def _preferred(
    results: SweepResults, recipes: list[RecipeResult], default: RecipeResult | None
) -> str | None:
    """Which of an ablation group's recipes, or the default SMSKD run they vary, the
    validation split prefers (never test), on the seeds all of them have."""
    if not results.has_validation:
        return None
    candidates = [r for r in recipes if r.val_final and r.final]
    # The default is a candidate unless the group holds its runs already (stages-3), or
    # runs on seeds of its own (a choice made on a seed apart holds its own default run).
    if (
        default is not None
        and default.val_final
        and all(default.label not in (r.label, r.same_as) for r in candidates)
        and _common_seeds([default.val_final, *(r.val_final for r in candidates)])
    ):
        candidates.insert(0, default)
    common = _common_seeds([r.val_final for r in candidates])
    if len(candidates) < 2 or not common:
        return None
    top = max(candidates, key=lambda r: _mean_on(r.val_final, common))
    name = f"the default {top.label}" if top is default else top.label
    return (
        f"preferred on validation: {name} ({_mean_on(top.val_final, common):.2f} val, "
        f"{_mean_on(top.final, common):.2f} test, mean over {_seed_list(common)})"
    )


def _seed_list(seeds: list[int]) -> str:
    """``seed 5`` or ``seeds 0, 1, 2``."""
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def order_principles(recipes: list[RecipeResult]) -> list[str]:
    """Whether the first or the last stage's method decides, among an ``orders`` group
    holding every order of the same K ≥ 3 stages once (with two stages, first and last
    mirror each other): for each position and method, that method's orders against the
    other orders, paired by seed on last-epoch test accuracy, with intervals
    Bonferroni-adjusted over the 2·K comparisons. Nothing is chosen, so no validation
    split is needed. Then where the order of the families, response → feature →
    relation, ranks. Nothing until every order has finished on a common seed."""
    orders = [r for r in recipes if r.kind == "orders" and r.final]
    plans = {r.label: tuple(r.stages.split(" → ")) for r in orders}
    stages = next(iter(plans.values()), ())
    common = _common_seeds([r.final for r in orders])
    if len(stages) < 3 or not common:
        return []
    if sorted(plans.values()) != sorted(itertools.permutations(stages)):
        return []  # an order missing (not finished yet), or several orders entries
    comparisons = 2 * len(stages)
    confidence = 1 - 0.05 / comparisons

    def mean_test(chosen: list[RecipeResult]) -> dict[int, float]:
        return {s: sum(r.final[s] for r in chosen) / len(chosen) for s in common}

    out = []
    for position, at in (("first", 0), ("last", -1)):
        said, clear = [], []
        for method in stages:
            mine = mean_test([r for r in orders if plans[r.label][at] == method])
            diff = paired_difference(
                mine, mean_test([r for r in orders if plans[r.label][at] != method]), confidence
            )
            assert diff is not None  # the seeds are common to all
            said.append(f"{method}{_family_suffix(method)} {_mean(mine):.2f}, {_diff_text(diff)}")
            if diff.verdict in ("higher", "lower"):
                clear.append(f"{method} {position} is {'better' if diff.mean > 0 else 'worse'}")
        out.append(
            f"orders by their {position} stage's method (mean last-epoch test over the orders "
            f"that share it, {_seed_list(common)}; Δ against the other orders, paired, "
            f"{100 * confidence:.4g}% CIs, Bonferroni over {comparisons}): {'; '.join(said)} — "
            + ("; ".join(clear) if clear else "no method makes a detectable difference there")
            + "."
        )
    family_ranks = {
        label: [FAMILIES.index(f) if (f := _family(m)) else -1 for m in plan]
        for label, plan in plans.items()
    }
    in_family_order = [
        r
        for r in orders
        if -1 not in family_ranks[r.label]
        and family_ranks[r.label] == sorted(family_ranks[r.label])
    ]
    ranked = sorted(orders, key=lambda r: -_mean_on(r.final, common))
    for recipe in in_family_order:
        families = " → ".join(_family(m) or m for m in plans[recipe.label])
        rank = ranked.index(recipe) + 1
        best = f"; the best, {ranked[0].stages}, {_mean_on(ranked[0].final, common):.2f}"
        out.append(
            f"orders: {recipe.stages} ({families}) ranks {rank} of {len(orders)} on test "
            f"({_mean_on(recipe.final, common):.2f}{best if rank > 1 else ''})."
        )
    return out


def _family(method: str) -> str | None:
    """A method's family, or None for a name the registry does not know (a method the
    runs registered that this process has not imported, or a stage's own label)."""
    cls = METHODS.get(method)
    return cls.family if cls is not None else None


def _family_suffix(method: str) -> str:
    family = _family(method)
    return f" ({family})" if family else ""


def versus_sentence(recipe: RecipeResult, anchor: RecipeResult, name: str) -> list[str]:
    """``recipe`` (called ``name``) against ``anchor`` in one sentence: the paired Δ of
    last-epoch test accuracy, its 95% CI and what it says; none without a common seed."""
    diff = paired(recipe, anchor)
    if diff is None:
        return []
    verdict = {
        "higher": f"{name} is better",
        "lower": f"{name} is worse",
        "no clear difference": "no difference is detectable at this number of seeds",
        "too few seeds to tell": "too few seeds to tell",
        "no spread to tell": "the same difference on every seed: no spread to judge by",
    }[diff.verdict]
    return [
        f"{name[:1].upper()}{name[1:]} ({recipe.label}: {recipe.stages}) vs {anchor.label}: "
        f"Δ last-epoch accuracy {_diff_text(diff)} over {diff.pairs} paired seeds — {verdict}."
    ]


def findings(results: SweepResults, base: str) -> list[str]:
    """Plain sentences for the headline comparisons and each ablation group, from paired
    CIs (95%, or Bonferroni-adjusted where a group makes several comparisons)."""
    out = []
    smskd = _anchor(results, base, "smskd")
    joint = _anchor(results, base, "joint")
    single = best_single(results, base)
    # Every SMSKD recipe of the main table: the default, and any variant it holds.
    headline = [r for r in results.of(base, "main", kind="smskd") if r.final]
    if smskd not in headline:
        headline = [smskd] if smskd is not None else []
    for recipe in headline:
        for anchor in (joint, single):
            if anchor is not None:
                out += versus_sentence(recipe, anchor, "SMSKD")
    for group in results.groups(base):
        if group in ("main", TUNE_GROUP):
            continue
        recipes = [r for r in results.of(base, group) if r.final]
        preferred = _preferred(results, recipes, smskd)
        if preferred:
            out.append(f"{group}: {preferred}.")
        if smskd is not None:
            out += _against_default(smskd, recipes, group)
        out += order_principles(recipes)
    if smskd is not None:
        weights = [
            r["train_ref_weight_mean"]
            for records in smskd.curves.values()
            for r in records
            if "train_ref_weight_mean" in r
        ]
        if weights:
            out.append(
                f"SMSKD's reference weight w_i averaged {sum(weights) / len(weights):.3f} over "
                "its training samples and reference stages (see the weight distributions)."
            )
    return out


def write_sweep_report(runs_dir: str | Path, *, plots: bool = True) -> Path:
    """``RUNS_DIR/report.md`` (and ``RUNS_DIR/plots/*.png``) from a sweep directory."""
    root = Path(runs_dir)
    results = load_sweep_results(root)
    index = results.index
    body = [f"# smskd sweep: {index.get('sweep', root.name)}", ""]
    if is_language_model_sweep(results):
        return _write_language_model_report(results, root, body, plots)
    made = _plots(results, root) if plots else {}
    for base in results.bases():
        if len(results.bases()) > 1:
            body += [f"## {base}", ""]
        for sentence in findings(results, base):
            body.append(f"- {sentence}")
        body.append("")
        body += tuning_section(results, base)
        for group in results.groups(base):
            if group != TUNE_GROUP:
                body += [f"### {group}", "", comparison_table(results, base, group), ""]
        body += forgetting_section(results, base)
        for title, path in made.get(base, []):
            body += [f"![{title}]({path.relative_to(root).as_posix()})", ""]
    body += _provenance(results, root)
    report = root / "report.md"
    report.write_text("\n".join(body) + "\n")
    return report


def _write_language_model_report(
    results: SweepResults, root: Path, body: list[str], plots: bool
) -> Path:
    """A language-model sweep: perplexity and bits per character instead of accuracy."""
    several = len(results.bases()) > 1
    teachers = {f"teacher {t['model']}": located(root, t["dir"]) for t in results.teachers()}
    for base in results.bases():
        if several:
            body += [f"## {base}", ""]
        body += language_model_section(results, base, teachers)
        if plots:
            try:
                path = root / "plots" / (base if several else "") / "perplexity.png"
                curves_plot(results, base, path)
                body += [f"![validation perplexity]({path.relative_to(root).as_posix()})", ""]
            except UserError as err:
                print(f"smskd report: plots skipped: {err}")
    runs = dict(teachers)
    for run in results.index["runs"]:
        if run["seed"] == min(r["seed"] for r in results.index["runs"]) and not run.get("same_as"):
            runs.setdefault(run["label"], located(root, run["dir"]))
    body += samples_section(runs)
    body += _provenance(results, root, language_model=True)
    report = root / "report.md"
    report.write_text("\n".join(body) + "\n")
    return report


def tuning_section(results: SweepResults, base: str) -> list[str]:
    """The β grid of each tuned method, its validation accuracy, and the choice."""
    tuning = results.tuning(base)
    if not tuning:
        return []
    lines = [
        "### tuning: β chosen on validation",
        "",
        "Each method alone at each β; the β with the highest mean last-epoch validation "
        "accuracy (over the tuning seeds) weighs that method in every other run.",
        "",
        "| method | β | val acc, last epoch | seeds | chosen |",
        "|---|---:|---:|---|:---:|",
    ]
    for method, entry in tuning.items():
        for beta, score in entry["val_acc"].items():
            seeds = ", ".join(str(s) for s in entry["seeds"].get(beta, []))
            mark = "✓" if entry["chosen"] is not None and float(beta) == entry["chosen"] else ""
            lines.append(f"| {method} | {beta} | {score:.2f} | {seeds} | {mark} |")
    return [*lines, ""]


def forgetting_section(results: SweepResults, base: str) -> list[str]:
    """Each multi-stage recipe's mean forgetting matrix, and what its later stages took
    from stage 1, with SMSKD against no reference, paired by seed."""
    recipes = [
        r
        for r in results.recipes
        if r.base == base and r.same_as is None and any(len(v) > 1 for v in r.forgetting.values())
    ]
    if not recipes:
        return []
    lines = [
        "### forgetting",
        "",
        "Measured at every stage end on a fixed probe set of validation images: each "
        "method's own loss against the teacher (lower: closer; a method with trained "
        "helpers from its own stage on; `@k`: as stage k uses it), agreement with the "
        "teacher's argmax (%), probe accuracy (%), and `kl_to_stagej` = KL(p_j ‖ p_k), "
        "p_j the softmax (T = 1) of stage j's student, p_k this row's, averaged over the "
        "probe images. A row is its stage's last epoch (with `reference.snapshot: best` "
        "the next stage's reference is its best validation epoch instead). Means over seeds.",
        "",
    ]
    for recipe in recipes:
        rows, measures, matrix = mean_matrix(recipe)
        seeds = len(recipe.forgetting)
        lines += [
            f"**{recipe.label}** ({recipe.stages}, {seeds} seed{'s' * (seeds > 1)})",
            "",
            "| stage end | " + " | ".join(measures) + " |",
            "|---|" + "---:|" * len(measures),
        ]
        for label, values in zip(rows, matrix, strict=True):
            cells = ["–" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    smskd = _anchor(results, base, "smskd")
    off = next((r for r in recipes if r.label == "ref-none"), None)
    if smskd is not None and off is not None:
        mine, theirs = stage_one_forgetting(smskd), stage_one_forgetting(off)
        lines += [
            f"What the later stages took from stage 1, {smskd.label} minus ref-none, on "
            "the seeds both have, paired by seed. Δ of a loss and kl_to_stage1: negative, "
            "the reference kept more of stage 1; Δ teacher_agreement: positive, it kept more:",
            "",
            f"| measure | {smskd.label} | ref-none | Δ [95% CI] |",
            "|---|---:|---:|---:|",
        ]
        for key in mine:
            seeds = set(mine[key]) & set(theirs.get(key, {}))
            if seeds:
                a = {s: mine[key][s] for s in seeds}
                b = {s: theirs[key][s] for s in seeds}
                lines.append(
                    f"| {key} | {_mean_std_text(a, 3)} | {_mean_std_text(b, 3)} | "
                    f"{_diff_text(paired_difference(a, b), 3)} |"
                )
        lines.append("")
    return lines


REPORT_NOTES = (
    "Accuracy: top-1 in percent, mean ± sample std over seeds. *Last epoch* is the "
    "headline: the student as training left it, on the whole test split. With a "
    "validation split (held out of the training images, the same for every recipe), "
    "everything chosen is chosen on it: *best-val epoch* is the test accuracy at the "
    "epoch with the highest validation accuracy, the best single method is the one with "
    "the highest validation accuracy, and tuned β are chosen on validation. Without one "
    "(older sweeps), *best epoch* is the best of all epochs on the test split itself, so "
    "it is optimistic; it is shown because papers often report it without saying so.",
    "Δ: the recipe's last-epoch test accuracy minus joint's (or the best single method's, "
    "or in an ablation table the default SMSKD run's), paired by seed, with a Student-t "
    "95% confidence interval; an interval that contains 0 means no difference is "
    "detectable at this number of seeds. "
    "Bold: the best value of each column (the teacher row aside).",
    "A row marked (= other) is the same config as that recipe (e.g. 3 stages = SMSKD): "
    "its runs were made once and count for both.",
)


def _provenance(results: SweepResults, root: Path, language_model: bool = False) -> list[str]:
    """What made the numbers; ``language_model``: the table's own note says how they
    are read, and a teacher's numbers are in the table."""
    index = results.index
    lines = ["## How these numbers were made", ""]
    lines += [f"- {note}" for note in ([] if language_model else REPORT_NOTES)]
    sweep_file = index.get("sweep_file", "?")
    lines.append(
        f"- Sweep file: `{sweep_file}` (copied to `sweep.yaml` here); base config(s): "
        + ", ".join(f"`{b}`" for b in index.get("bases", []))
        + "; every run's resolved config: `<recipe>/seed-<s>/config.yaml`, its per-epoch "
        "log `metrics.jsonl` beside it; the sweep's own log: `sweep.log`."
    )
    for base, info in index.get("sizes", {}).items():
        lines.append(f"- Sizes ({base}): {info}")
    for teacher in index.get("teachers", []):
        known = teacher.get("final_acc")  # None: a checkpoint without its run beside it
        accuracy = "" if language_model or known is None else f"; test acc {known:.2f}%"
        lines.append(
            f"- Teacher {teacher['model']}: trained once ({teacher.get('epochs')} epochs, "
            f"`{Path(teacher['dir']).name}`), shared by every run{accuracy}."
        )
    commits = index.get("commits") or [index.get("commit", "unknown")]
    runs = [r for r in results.recipes for _ in r.final]
    seconds = {
        r.runs.get(s, f"{r.label}/{s}"): r.wall_time.get(s, 0.0)
        for r in results.recipes
        for s in r.final
    }
    lines.append(
        f"- Runs made by smskd commit(s) {', '.join(f'`{c}`' for c in commits)}; "
        f"{len(runs)} recipe×seed results from {len(seconds)} distinct runs, "
        f"{sum(seconds.values()) / 60:.0f} min of student training and evaluation."
    )
    lines.append(
        f"- Report written by commit `{git_commit()}`, {software()}, {os.cpu_count()} CPU cores."
    )
    return [*lines, ""]


def _plots(results: SweepResults, root: Path) -> dict[str, list[tuple[str, Path]]]:
    try:
        require_matplotlib()
    except UserError as err:
        print(f"smskd report: plots skipped: {err}")
        return {}
    made: dict[str, list[tuple[str, Path]]] = {}
    several = len(results.bases()) > 1
    for base in results.bases():
        folder = root / "plots" / (base if several else "")
        made[base] = sweep_plots(results, base, folder)
    return made
