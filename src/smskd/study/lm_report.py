"""The report of a language-model sweep: perplexity and bits per character, chosen on
validation and reported on test, per-epoch curves, and sample generations.

Everything is read from the runs: each epoch's ``val_ppl``/``test_ppl`` in
``metrics.jsonl``, and for the samples the ``hf/`` folder a language-model run writes
(transformers' config and safetensors weights, and the tokenizer: data, no code).
"""

from __future__ import annotations

import json
from pathlib import Path

from smskd.store.tracking import MetricsLog
from smskd.study.results import RecipeResult, SweepResults
from smskd.study.stats import mean_std, paired_difference
from smskd.train.selection import best_epoch

SAMPLE_PROMPT = "KING.\n"
SAMPLED_ARCHITECTURES = ("gpt2", "llama")
SAMPLE_TOKENS = 160  # at most: the model's context bounds the prompt and the sample
SAMPLE_TEMPERATURE = 0.8


def is_language_model_sweep(results: SweepResults) -> bool:
    return any("test_ppl" in records[-1] for r in results.recipes for records in r.curves.values())


def _selected(recipe: RecipeResult, key: str) -> dict[int, float]:
    """Per seed: ``key`` at the epoch best on validation (lowest validation loss)."""
    chosen = {seed: best_epoch(records) for seed, records in recipe.curves.items()}
    return {seed: record[key] for seed, record in chosen.items() if record is not None}


def _text(values: dict[int, float], digits: int = 2) -> str:
    if not values:
        return "–"
    mean, std = mean_std(list(values.values()))
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _delta(a: dict[int, float], b: dict[int, float]) -> str:
    diff = paired_difference(a, b)
    if diff is None:
        return "–"
    if diff.low is None:
        return f"{diff.mean:+.2f} (1 seed)"
    return f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]"


def language_model_section(
    results: SweepResults, base: str, teachers: dict[str, Path] | None = None
) -> list[str]:
    """Findings and the table of every recipe, for one base; ``teachers``: label → run
    directory of each teacher, listed first (their last epoch: what the students saw)."""
    recipes = [r for r in results.recipes if r.base == base and r.curves]
    ppl = {r.label: _selected(r, "test_ppl") for r in recipes}
    bpc = {r.label: _selected(r, "test_bpc") for r in recipes}
    val = {r.label: _selected(r, "val_ppl") for r in recipes}
    lines: list[str] = []
    by_kind = {r.kind: r for r in recipes if r.group == "main"}
    singles = [r for r in recipes if r.kind == "single"]
    best = min(singles, key=lambda r: mean_std(list(val[r.label].values()))[0], default=None)
    anchors = [a for a in (by_kind.get("scratch"), best, by_kind.get("joint")) if a is not None]
    for recipe in (r for r in recipes if r.kind == "smskd"):
        for anchor in anchors:
            diff = paired_difference(ppl[recipe.label], ppl[anchor.label])
            if diff is None:
                continue
            verdict = {"lower": "lower (better)", "higher": "higher (worse)"}.get(
                diff.verdict, diff.verdict
            )
            lines.append(
                f"- {recipe.label} ({recipe.stages}) vs {anchor.label}: Δ test perplexity "
                f"{_delta(ppl[recipe.label], ppl[anchor.label])} over {diff.pairs} seeds: "
                f"{verdict}."
            )
    headers = ["val ppl", "test ppl", "test bpc"] + [f"Δ test ppl vs {a.label}" for a in anchors]
    lines += [
        "",
        "| recipe | stages | seeds | " + " | ".join(headers) + " | time per run |",
        "|---|---|---:|" + "---:|" * len(headers) + "---:|",
    ]
    for label, run_dir in (teachers or {}).items():
        records = MetricsLog(run_dir / "metrics.jsonl").records
        if records:
            last = records[-1]
            cells = [
                "–" if last.get(key) is None else f"{last[key]:.{digits}f}"
                for key, digits in (("val_ppl", 2), ("test_ppl", 2), ("test_bpc", 3))
            ]
            cells += ["–"] * (len(headers) - 3) + ["–"]  # no Δ, no student time
            lines.append(f"| {label} | labels only | 1 | {' | '.join(cells)} |")
    for recipe in recipes:
        deltas = ["–" if a is recipe else _delta(ppl[recipe.label], ppl[a.label]) for a in anchors]
        seconds = mean_std(list(recipe.wall_time.values()))[0] if recipe.wall_time else 0.0
        cells = [_text(val[recipe.label]), _text(ppl[recipe.label]), _text(bpc[recipe.label], 3)]
        lines.append(
            f"| {recipe.label} | {recipe.stages} | {len(recipe.curves)} | "
            + " | ".join([*cells, *deltas])
            + f" | {seconds:.0f}s |"
        )
    lines += [
        "",
        "Every student number is taken at the epoch with the lowest validation perplexity "
        "of its run (validation plays; the test plays only report); a teacher's at its "
        "last epoch, the weights the students learn from. ppl: perplexity per token; "
        "bpc: bits per character of the test text. Δ: paired by seed, mean [95% CI]; "
        f"the best single method ({best.label if best else '–'}) is chosen on validation.",
        "",
    ]
    return lines


def curves_plot(results: SweepResults, base: str, path: Path) -> None:
    from smskd.study.plots import require_matplotlib, save_figure, stage_boundaries

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    recipes = [r for r in results.recipes if r.base == base and r.curves]
    for recipe in recipes:
        by_epoch: dict[int, list[float]] = {}
        for records in recipe.curves.values():
            for r in records:
                by_epoch.setdefault(r["global_epoch"], []).append(r["val_ppl"])
        epochs = sorted(by_epoch)
        ax.plot(epochs, [mean_std(by_epoch[e])[0] for e in epochs], marker=".", label=recipe.label)
    staged = next((r for r in recipes if r.kind == "smskd"), None)
    if staged is not None:
        for x in stage_boundaries(next(iter(staged.curves.values()))):
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("student epoch (all stages)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{base}: validation perplexity per epoch (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def sample(folder: Path, prompt: str = SAMPLE_PROMPT, seed: int = 0) -> str:
    """A sampled continuation of ``prompt`` by the model saved in ``folder`` (``hf/``)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    # A run directory is data (DESIGN.md §7): only the architectures smskd builds, and
    # never a model's own code.
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in SAMPLED_ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not one smskd builds")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    ).eval()
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    context = model.config.max_position_embeddings  # positions beyond it were never trained
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=SAMPLE_TEMPERATURE,
            top_k=0,
            max_new_tokens=min(SAMPLE_TOKENS, context - ids.shape[1]),
            pad_token_id=0,
        )
    return tokenizer.decode(out[0].tolist())


def samples_section(run_dirs: dict[str, Path]) -> list[str]:
    """Teacher and each recipe's first seed, continuing the same prompt."""
    lines = [
        "## Samples",
        "",
        f"Each model continues {SAMPLE_PROMPT!r}, sampled at temperature "
        f"{SAMPLE_TEMPERATURE} from the full distribution, torch seed 0: the weights of "
        "the run's last epoch (`hf/`), where the tables take the best validation epoch.",
        "",
    ]
    for label, run_dir in run_dirs.items():
        folder = run_dir / "hf"
        if not (folder / "model.safetensors").is_file():
            continue
        try:
            text = sample(folder).rstrip()
        except Exception as err:  # the folder is data: whatever is wrong with it, say so
            lines += [f"**{label}**: no sample ({str(err).splitlines()[0][:200]})", ""]
            continue
        lines += [f"**{label}**", "", "```", text, "```", ""]
    return lines
