"""``OUT/report.md`` of ``smskd search``: the cost against a grid, every prefix tried with
its validation accuracy, the chosen plan, the search as a plot, and the final retrain
on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from smskd.errors import UserError
from smskd.store.checkpoint import atomic_write_text

# ``search`` below is a smskd.study.search.Search and a node one of its Nodes; this
# module is below that one (the search writes its report), so it names neither.


def write_search_report(
    search: Any, grid: tuple[int, int], best_file: str, *, plots: bool = True
) -> Path:
    """``grid``: the space's plans, and the stage trainings of a grid from scratch."""
    spec = search.spec
    nodes = sorted(search.trained(), key=lambda n: (len(n.stages), -(n.val_acc or 0)))
    best = search.best()
    plans, grid_trainings = grid
    count, epochs, seconds = search.spent()
    wall = sum(node.wall_seconds for node in nodes)
    grids = ", ".join(
        f"{m} β ∈ {{{', '.join(f'{b:g}' for b in g)}}}" for m, g in spec.methods.items()
    )
    lines = [
        f"# smskd search: {spec.name}",
        "",
        f"- Chosen on validation: **{best.label}**, {best.val_acc:.2f}% validation accuracy "
        f"(seed {spec.seed}); its config: `{best_file}`.",
        f"- Space: up to {spec.max_stages} stages, each one of {grids}; epochs per stage ∈ "
        f"{spec.epochs}; λ ∈ {spec.lam}: {plans:,} plans.",
        f"- Cost: {count} stage trainings ({epochs} student epochs, {seconds / 60:.0f} min of "
        f"training and evaluation, {wall / 60:.0f} min of the workers' time with setup, "
        f"caches and probes). A grid over the same space trains {grid_trainings:,} "
        f"stages if every plan starts from scratch, {plans:,} (one per plan) if it shares "
        "prefixes too.",
        "",
    ]
    lines += _final_section(search)
    made = _plot(search, nodes, best) if plots else None
    if made is not None:
        lines += [f"![the search]({made.relative_to(search.out).as_posix()})", ""]
    lines += [
        "## Every prefix trained",
        "",
        "Each prefix is a plan of its own, scored by the validation accuracy at its last "
        "epoch; plans that extend it start from its student.",
        "",
        "| stages | plan | val acc | epochs |",
        "|---:|---|---:|---:|",
    ]
    for node in nodes:
        mark = " **(chosen)**" if node.dir == best.dir else ""
        total = sum(s.epochs for s in node.stages)
        score = "failed" if node.val_acc is None else f"{node.val_acc:.2f}"
        lines.append(f"| {len(node.stages)} | {node.label}{mark} | {score} | {total} |")
    lines += [
        "",
        "## How these numbers were made",
        "",
        f"- Search spec: `search.yaml` (a copy); base config `{search.base_path}`. Plans "
        "proposed by Optuna's TPE sampler over the categorical choices, pruned after each "
        "stage by successive halving on validation accuracy; each distinct prefix trained "
        "once (`nodes/`), as a run that continues its parent exactly as the whole plan "
        "would train it. The Optuna store is `search.db`.",
        "- Selection reads validation accuracy only; the test split is used by the final "
        "retrain alone.",
        "",
    ]
    report = search.out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _final_section(search: Any) -> list[str]:
    from smskd.study.report import comparison_table, versus_sentence
    from smskd.study.results import load_sweep_results

    final = search.out / "final"
    if not (final / "index.json").is_file():
        return ["The final retrain has not run (`smskd search ... ` without `--no-final`).", ""]
    results = load_sweep_results(final)
    lines = [
        "## The chosen plan on the test split",
        "",
        f"Retrained from scratch over seeds {search.spec.final_seeds} beside single KD, "
        "joint and the base plan (`final/`, sweep file `final.yaml`): last-epoch test "
        "accuracy, Δ paired by seed with a 95% CI.",
        "",
    ]
    by_label = {r.label: r for r in results.recipes if r.final}
    searched = by_label.get("searched")
    if searched is not None:
        for label in ("smskd", "single-kd", "joint"):
            if label in by_label:
                lines += [
                    f"- {s}"
                    for s in versus_sentence(searched, by_label[label], "the searched plan")
                ]
    lines += [f"- {label}: {_weights(recipe)}" for label, recipe in by_label.items()]
    lines.append("")
    for base in results.bases():
        for group in results.groups(base):
            lines += [f"### {group}", "", comparison_table(results, base, group), ""]
    return lines


def _weights(recipe: Any) -> str:
    """A recipe's stages with each method's β (and λ from the second stage on), from its
    first run's resolved config (read as data)."""
    from smskd.methods.registry import METHODS

    def beta(method: dict[str, Any]) -> float:
        given = method.get("weight")
        return METHODS[method["name"]].default_weight if given is None else given

    config = yaml.safe_load((Path(recipe.runs[min(recipe.runs)]) / "config.yaml").read_text())
    stages = [
        " + ".join(f"{m['name']} β {beta(m):g}" for m in stage["methods"]) or "CE only"
        for stage in config["stages"]
    ]
    text = " → ".join(stages)
    if len(stages) > 1 and config.get("reference", {}).get("weighting") != "none":
        text += f", λ {config['reference']['lam']:g}"
    return text


def _plot(search: Any, nodes: list[Any], best: Any) -> Path | None:
    from smskd.study.plots import require_matplotlib

    try:
        plt = require_matplotlib()
    except UserError as err:
        print(f"smskd search: plot skipped: {err}")
        return None
    nodes = [n for n in nodes if n.val_acc is not None]  # failed prefixes have no score
    by_plan = {(n.stages, n.lam): n for n in nodes}
    fig, (tree, trace) = plt.subplots(1, 2, figsize=(11, 4.5))
    for node in nodes:
        parent_key = (node.stages[:-1], node.lam if len(node.stages) > 2 else None)
        parent = by_plan.get(parent_key)
        if parent is not None:
            tree.plot([len(parent.stages), len(node.stages)], [parent.val_acc, node.val_acc],
                      color="lightgrey", linewidth=0.8, zorder=1)  # fmt: skip
    tree.scatter([len(n.stages) for n in nodes], [n.val_acc for n in nodes], s=14, zorder=2)
    path = [n for n in nodes if best.stages[: len(n.stages)] == n.stages and
            (len(n.stages) == 1 or n.lam == best.lam)]  # fmt: skip
    tree.plot([len(n.stages) for n in path], [n.val_acc for n in path], color="tab:red",
              marker="o", label=f"chosen: {best.label}")  # fmt: skip
    tree.set_xticks(range(1, search.spec.max_stages + 1))
    tree.set_xlabel("stages in the plan")
    tree.set_ylabel("validation accuracy (%)")
    tree.set_title("every prefix trained (lines: plan → its extension)", fontsize=9)
    tree.legend(fontsize=7, loc="lower right")
    order = sorted(nodes, key=lambda n: _finished(n))
    best_so_far: list[float] = []
    for node in order:
        best_so_far.append(max(best_so_far[-1] if best_so_far else 0.0, node.val_acc or 0.0))
    trace.step(range(1, len(order) + 1), best_so_far, where="post")
    trace.set_xlabel("stage trainings (in the order they finished)")
    trace.set_ylabel("best validation accuracy so far (%)")
    trace.set_title("trajectory", fontsize=9)
    for ax in (tree, trace):
        ax.grid(alpha=0.3)
    fig.suptitle(f"smskd search {search.spec.name}")
    path_png = search.out / "plots" / "search.png"
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


def _finished(node: Any) -> float:
    result = node.dir / "result.json"
    return result.stat().st_mtime if result.exists() else 0.0
