"""The ``smskd`` command: a thin face over the same functions as the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from smskd.errors import UserError
from smskd.interrupt import RunStopped

EXAMPLES = {
    "quickstart": "smskd quickstart --out runs/quickstart",
    "train-teacher": "smskd train-teacher configs/quickstart.yaml --out runs/teacher",
    "distill": ("smskd distill configs/quickstart.yaml --out runs/smskd --set stages.*.epochs=5"),
    "sweep": "smskd sweep configs/sweeps/fashion-mnist.yaml --out results/fashion-mnist",
    "report": "smskd report results/fashion-mnist",
    "eval": "smskd eval runs/quickstart/smskd/student.pt",
    "methods": "smskd methods --format json",
    "models": "smskd models",
    "datasets": "smskd datasets",
}


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


def _print_rows(rows: list[dict[str, object]], columns: list[str], fmt: str) -> None:
    print(json.dumps(rows, indent=2) if fmt == "json" else _table(rows, columns))


def _say(message: str) -> None:
    """Print once per job: on rank 0 under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from smskd.quickstart import run_quickstart

    run_quickstart(
        args.out,
        teacher_epochs=args.teacher_epochs,
        stage_epochs=args.stage_epochs,
        seed=args.seed,
        force=args.force,
        progress=not args.no_progress,
    )


def _load(args: argparse.Namespace):
    from smskd.config import load_config

    download = ["data.download=true"] if args.download else []
    return load_config(args.config, [*args.set, *download])


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from smskd.experiment import TEACHER_WEIGHTS, train_teacher

    result = train_teacher(
        _load(args),
        args.out,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        export_safetensors=args.safetensors,
    )
    _say(f"teacher test acc {result.final_accuracy:.2f}%; weights: {args.out}/{TEACHER_WEIGHTS}")


def cmd_distill(args: argparse.Namespace) -> None:
    from smskd.experiment import distill

    result = distill(
        _load(args),
        args.out,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        export_safetensors=args.safetensors,
    )
    _say(
        f"student test acc {result.final_accuracy:.2f}% (last epoch), "
        f"{result.best_accuracy:.2f}% (best epoch); weights: {args.out}/student.pt"
    )


def cmd_sweep(args: argparse.Namespace) -> None:
    from smskd.sweep import load_sweep, plan, run_sweep, select

    seeds = args.seeds
    if args.dry_run:
        runs = plan(load_sweep(args.sweep, args.set, seeds), args.sweep, args.out)
        chosen = select(runs, args.only)
        runs = [r for r in runs if (r.same_as or r.dir) in chosen]
        rows = [
            {
                "label": r.label,
                "seed": r.seed,
                "group": r.group,
                "stages": r.stages,
                "dir": (r.same_as and f"= {r.same_as}") or r.dir,
            }
            for r in runs
        ]
        _print_rows(rows, ["label", "seed", "group", "stages", "dir"], args.format)
        return
    run_sweep(args.sweep, args.out, overrides=args.set, seeds=seeds, progress=not args.no_progress)
    if not args.no_report:
        from smskd.report import write_sweep_report

        _say(f"report: {write_sweep_report(args.out)}")


def cmd_report(args: argparse.Namespace) -> None:
    from smskd.report import write_sweep_report

    print(f"report: {write_sweep_report(args.runs_dir, plots=not args.no_plots)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from smskd.experiment import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.model, args.root, args.device)
    print(f"test acc {metrics['acc']:.2f}%  test loss {metrics['loss']:.4f}")


def cmd_methods(args: argparse.Namespace) -> None:
    from smskd.methods.registry import describe_methods

    _print_rows(
        describe_methods(),
        ["name", "family", "taps", "helpers", "default_weight", "citation"],
        args.format,
    )


def cmd_models(args: argparse.Namespace) -> None:
    from smskd.models.registry import MODELS, build_model, parameter_count

    rows = [
        {
            "name": name,
            "params": parameter_count(build_model(name, args.num_classes, args.in_channels)),
            "description": entry.description,
        }
        for name, entry in MODELS.items()
    ]
    _print_rows(rows, ["name", "params", "description"], args.format)


def cmd_datasets(args: argparse.Namespace) -> None:
    from smskd.data.registry import DATASETS

    rows = [
        {"name": name, "description": e.description, "location": e.location}
        for name, e in DATASETS.items()
    ]
    _print_rows(rows, ["name", "description", "location"], args.format)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError("seeds must be ≥ 0")
    return seeds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smskd",
        description="Sequential multi-stage knowledge distillation (SMSKD).",
        epilog="Start with: smskd quickstart",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example: {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    def run_options(p: argparse.ArgumentParser, default_out: str | None) -> None:
        p.add_argument(
            "--out",
            default=default_out,
            required=default_out is None,
            help="run directory" + (f" (default {default_out})" if default_out else ""),
        )
        p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="run config (YAML)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. stages.*.epochs=5 (repeatable)",
        )
        p.add_argument(
            "--safetensors",
            action="store_true",
            help="also write the final weights as .safetensors (pip install safetensors)",
        )
        p.add_argument(
            "--download",
            action="store_true",
            help="fetch the dataset first if it is missing (cifar10/100, fashion-mnist)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out after its last completed epoch",
        )

    p = command(
        "quickstart",
        cmd_quickstart,
        "Train a teacher on the embedded digits data, then compare scratch, single "
        "(KD), joint (KD+FitNets+RKD) and SMSKD (KD → FitNets → RKD).",
    )
    run_options(p, "runs/quickstart")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default 30)")
    p.add_argument("--stage-epochs", type=int, help="epochs per SMSKD stage (default 10)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")

    p = command(
        "train-teacher",
        cmd_train_teacher,
        "Train the config's teacher on labels; writes OUT/teacher.pt.",
    )
    config_options(p)
    run_options(p, None)

    p = command(
        "distill",
        cmd_distill,
        "Run the config's stage list (trains the teacher first if it has no checkpoint).",
    )
    config_options(p)
    run_options(p, None)

    p = command(
        "sweep",
        cmd_sweep,
        "Expand a sweep file (recipes × seeds × overrides) and run every run in turn; "
        "finished runs are skipped, a half-done one resumes. Writes OUT/index.json and "
        "OUT/report.md.",
    )
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key in every run, e.g. data.root=/data (repeatable)",
    )
    p.add_argument(
        "--seeds", type=_seed_list, help="comma-separated seeds instead of the file's, e.g. 0,1"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only labels matching this shell pattern, e.g. 'order-*' or "
        "'vgg19-resnet18/*' (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs; train nothing")
    p.add_argument("--format", choices=["table", "json"], default="table", help="for --dry-run")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "report",
        cmd_report,
        "Aggregate a sweep directory: tables (mean ± std over seeds, paired differences "
        "with 95%% CIs) and plots, into RUNS_DIR/report.md and RUNS_DIR/plots/.",
    )
    p.add_argument("runs_dir", help="a directory written by smskd sweep")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib)")

    p = command("eval", cmd_eval, "Test accuracy of saved weights (student.pt / teacher.pt).")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset name (default: from the run's config.yaml)")
    p.add_argument("--root", help="dataset directory, for datasets read from disk")
    p.add_argument("--model", help="model name (default: from the run's config.yaml)")
    p.add_argument("--device", default="auto")

    for name, handler, text in (
        ("methods", cmd_methods, "List the KD methods."),
        ("models", cmd_models, "List the model zoo with parameter counts."),
        ("datasets", cmd_datasets, "List the datasets and where each looks for files."),
    ):
        p = command(name, handler, text)
        p.add_argument("--format", choices=["table", "json"], default="table")
        if name == "models":
            p.add_argument("--num-classes", type=int, default=10)
            p.add_argument("--in-channels", type=int, default=3)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, argv)
    finally:
        # Under torchrun, leave the process group cleanly (imported only if a run used it).
        if "smskd.distributed" in sys.modules:
            sys.modules["smskd.distributed"].teardown()


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        args.handler(args)
    except UserError as err:
        print(f"smskd: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        again = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--force"]
        # A sweep resumes by running it again; a single run needs --resume.
        resume = [] if "--resume" in again or args.command == "sweep" else ["--resume"]
        hint = " ".join(["smskd", *again, *resume])
        print(f"smskd: {stopped}; continue with: {hint}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("smskd: interrupted; continue the run with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
