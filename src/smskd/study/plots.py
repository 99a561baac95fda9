"""The sweep report's figures (matplotlib, PNG; ``pip install 'smskd[plots]'``).

- ``curves.png``   test accuracy per epoch of the main recipes (mean over seeds, ±std
                   band), SMSKD's stage boundaries as dashed lines
- ``final.png``    last-epoch accuracy per main recipe, error bars = std over seeds,
                   the teacher as a line
- ``ablations.png`` the same bars for every other comparison group, one panel each
- ``weights.png``  the distribution of the reference weights w_i / λ in each stage,
                   one panel per recipe with a reference
- ``forgetting.png`` the forgetting matrix (stage end × measure, mean over seeds) of
                   SMSKD and of its no-reference ablation, side by side, each column
                   coloured on one scale for both
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from smskd.errors import UserError
from smskd.study.forgetting import mean_matrix
from smskd.study.results import RecipeResult, SweepResults
from smskd.study.stats import mean_std


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "matplotlib is not installed: pip install matplotlib (or 'smskd[plots]')"
        ) from None
    return plt


def _mean_curve(recipe: RecipeResult) -> tuple[list[int], list[float], list[float]]:
    """Per global epoch: mean and std of test accuracy over the seeds."""
    by_epoch: dict[int, list[float]] = {}
    for records in recipe.curves.values():
        for r in records:
            by_epoch.setdefault(r["global_epoch"], []).append(r["test_acc"])
    epochs = sorted(by_epoch)
    stats = [mean_std(by_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def stage_boundaries(records: list[dict[str, Any]]) -> list[float]:
    """Global epochs after which a new stage starts (between the two epochs)."""
    return [
        prev["global_epoch"] + 0.5
        for prev, cur in itertools.pairwise(records)
        if cur["stage"] != prev["stage"]
    ]


def _curves(plt: Any, results: SweepResults, base: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for recipe in results.of(base, "main"):
        if not recipe.curves:
            continue
        epochs, mean, std = _mean_curve(recipe)
        name = (
            recipe.label if recipe.stages == recipe.label else f"{recipe.label} ({recipe.stages})"
        )
        (line,) = ax.plot(epochs, mean, marker=".", label=name)
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
    smskd = next((r for r in results.of(base, kind="smskd") if r.curves), None)
    if smskd is not None:
        records = next(iter(smskd.curves.values()))
        for k, x in enumerate(stage_boundaries(records)):
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
            ax.text(x, 0.97, f" stage {k + 2}", transform=ax.get_xaxis_transform(), color="grey")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("student epoch (all stages)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{base}: test accuracy per epoch (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def _bars(ax: Any, recipes: list[RecipeResult], title: str) -> None:
    shown = [r for r in recipes if r.final]
    stats = [mean_std(list(r.final.values())) for r in shown]
    means = [m for m, _ in stats]
    ax.bar(range(len(shown)), means, yerr=[s for _, s in stats], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(shown)), [r.label for r in shown], rotation=30, ha="right", fontsize=8)
    if means:  # zoom in on the differences, error bars included
        low = min(m - s for m, s in stats)
        high = max(m + s for m, s in stats)
        pad = max(0.15 * (high - low), 0.5)
        ax.set_ylim(low - pad, high + pad)
    for i, (mean, _) in enumerate(stats):
        ax.text(i, mean, f"{mean:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("last-epoch test acc (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _final(plt: Any, results: SweepResults, base: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(ax, results.of(base, "main"), f"{base}: last-epoch accuracy (error bars: std over seeds)")
    for teacher in results.teachers():
        ax.axhline(teacher["final_acc"], color="tab:red", linestyle=":", linewidth=1)
        ax.text(
            -0.4, teacher["final_acc"], f"teacher {teacher['model']}", color="tab:red", fontsize=7
        )
    save_figure(fig, path)


def _ablations(plt: Any, results: SweepResults, base: str, path: Path) -> bool:
    groups = [g for g in results.groups(base) if g not in ("main", "tune")]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        _bars(ax, results.of(base, group), group)
    fig.suptitle(f"{base}: ablations (last-epoch accuracy, std over seeds)")
    save_figure(fig, path)
    return True


def weight_distributions(recipe: RecipeResult) -> dict[int, list[float]]:
    """Stage → mean histogram of w_i / λ over its epochs and seeds (stages with a reference)."""
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for records in recipe.curves.values():
        for r in records:
            hist = r.get("train_ref_weight_hist")
            if hist is None:
                continue
            total = sums.setdefault(r["stage"], [0.0] * len(hist))
            sums[r["stage"]] = [a + b for a, b in zip(total, hist, strict=True)]
            counts[r["stage"]] = counts.get(r["stage"], 0) + 1
    return {stage: [v / counts[stage] for v in hist] for stage, hist in sorted(sums.items())}


def _alike(results: SweepResults, base: str) -> list[tuple[RecipeResult, int]]:
    """Recipes with a reference, one per distinct weight distribution (orders and λ
    values share one: w/λ depends on the teacher alone), with how many it stands for."""
    panels: dict[tuple, list[RecipeResult]] = {}
    for recipe in results.of(base):
        hists = weight_distributions(recipe) if recipe.same_as is None else {}
        if hists:
            key = tuple((stage, tuple(round(v, 2) for v in h)) for stage, h in hists.items())
            panels.setdefault(key, []).append(recipe)
    return [(group[0], len(group) - 1) for group in panels.values()]


def _weights(plt: Any, results: SweepResults, base: str, path: Path) -> bool:
    panels = _alike(results, base)
    recipes = [recipe for recipe, _ in panels]
    if not recipes:
        return False
    columns = min(len(recipes), 4)
    rows = -(-len(recipes) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(recipes) :]:
        ax.set_visible(False)
    for ax, (recipe, more) in zip(axes.flat, panels, strict=False):
        for stage, hist in weight_distributions(recipe).items():
            width = 1.0 / len(hist)
            centres = [(i + 0.5) * width for i in range(len(hist))]
            ax.step(centres, hist, where="mid", label=f"stage {stage}")
        ax.set_title(recipe.label + (f" (and {more} alike)" if more else ""), fontsize=9)
        ax.set_xlabel("w_i / λ")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("fraction of samples")
    fig.suptitle(f"{base}: reference weights per stage (training samples, all epochs and seeds)")
    save_figure(fig, path)
    return True


def _forgetting(plt: Any, results: SweepResults, base: str, path: Path) -> bool:
    smskd = [r for r in results.of(base, kind="smskd") if r.same_as is None and r.forgetting]
    default = next((r for r in smskd if r.group == "main"), None)  # the report's anchor
    panels = [r for r in (default, next((r for r in smskd if r.label == "ref-none"), None)) if r]
    if not panels:
        return False
    matrices = [mean_matrix(r) for r in panels]
    measures = list(dict.fromkeys(m for _, names, _ in matrices for m in names))
    # One colour scale per measure, shared by the panels: equal colours, equal values.
    spans: dict[str, tuple[float, float]] = {}
    for _, names, matrix in matrices:
        for row in matrix:
            for name, value in zip(names, row, strict=True):
                if value is not None:
                    low, high = spans.get(name, (value, value))
                    spans[name] = (min(low, value), max(high, value))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.3 * len(measures) * len(panels) + 1, 3.2), squeeze=False
    )
    for ax, recipe, (rows, names, matrix) in zip(axes[0], panels, matrices, strict=True):
        grid = [[float("nan")] * len(measures) for _ in rows]
        for i, row in enumerate(matrix):
            for name, value in zip(names, row, strict=True):
                if value is not None:
                    low, high = spans[name]
                    j = measures.index(name)
                    grid[i][j] = (value - low) / (high - low) if high > low else 0.5
                    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7)
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", alpha=0.8)
        ax.set_xticks(range(len(measures)), measures, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [f"end of {r}" for r in rows], fontsize=8)
        ax.set_title(f"{recipe.label} ({len(recipe.forgetting)} seeds)", fontsize=9)
    fig.suptitle(f"{base}: forgetting on the validation probe (colour: per measure, shared)")
    save_figure(fig, path)
    return True


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def sweep_plots(results: SweepResults, base: str, folder: Path) -> list[tuple[str, Path]]:
    """Every figure for ``base`` into ``folder``; returns (title, path) of those made."""
    plt = require_matplotlib()
    made = []
    _curves(plt, results, base, folder / "curves.png")
    made.append(("test accuracy per epoch", folder / "curves.png"))
    _final(plt, results, base, folder / "final.png")
    made.append(("final accuracy per recipe", folder / "final.png"))
    if _ablations(plt, results, base, folder / "ablations.png"):
        made.append(("ablations", folder / "ablations.png"))
    if _weights(plt, results, base, folder / "weights.png"):
        made.append(("reference weight distribution per stage", folder / "weights.png"))
    if _forgetting(plt, results, base, folder / "forgetting.png"):
        made.append(("forgetting matrices", folder / "forgetting.png"))
    return made
