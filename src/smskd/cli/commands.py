"""The ``smskd`` command: a thin face over the same functions as the Python API."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smskd.errors import UserError
from smskd.train.interrupt import RunStopped
from smskd.version import __version__

EXAMPLES = {
    "quickstart": "smskd quickstart --out runs/quickstart",
    "train-teacher": "smskd train-teacher configs/quickstart.yaml --out runs/teacher",
    "distill": ("smskd distill configs/quickstart.yaml --out runs/smskd --set stages.*.epochs=5"),
    "sweep": "smskd sweep configs/sweeps/fashion-mnist.yaml --out results/fashion-mnist",
    "search": "smskd search configs/search/fashion-mnist.yaml --out results/fashion-mnist-search",
    "report": "smskd report results/fashion-mnist",
    "eval": "smskd eval runs/quickstart/smskd/student.pt",
    "export": "smskd export runs/quickstart/smskd --format onnx --out student.onnx",
    "methods": "smskd methods --format json",
    "models": "smskd models",
    "datasets": "smskd datasets",
    "completion": 'eval "$(smskd completion bash)"   # in ~/.bashrc',
}


@dataclasses.dataclass
class Output:
    """What a command reports: ``text`` for people, ``data`` for ``--json``."""

    text: str
    data: Any


def _table(rows: list[dict[str, object]], columns: list[str]) -> str:
    def cell(value: object) -> str:
        return "–" if value is None else str(value)  # unknown (a model that needs options)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(cell(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


def _rows(rows: list[dict[str, object]], columns: list[str]) -> Output:
    return Output(_table(rows, columns), rows)


def _progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or args.quiet or args.json)


def cmd_quickstart(args: argparse.Namespace) -> Output:
    from smskd.cli.quickstart import run_quickstart

    rows = run_quickstart(
        args.out,
        teacher_epochs=args.teacher_epochs,
        stage_epochs=args.stage_epochs,
        seed=args.seed,
        force=args.force,
        progress=_progress(args),
    )
    # The table was printed as the run's last log lines; here only the data remains.
    return Output("", {"out": args.out, "recipes": [dataclasses.asdict(r) for r in rows]})


def _load(args: argparse.Namespace):
    from smskd.config import load_config

    download = ["data.download=true"] if args.download else []
    return load_config(args.config, [*args.set, *download])


def _run_summary(result: Any, weights: Path) -> dict[str, Any]:
    summary = {
        "final_acc": result.final_accuracy,
        "best_acc": result.best_accuracy,
        "selected_acc": result.selected_accuracy,
        "epochs": len(result.history),
        "wall_time": result.wall_time,
        "weights": str(weights),
    }
    if "test_ppl" in result.history[-1]:  # a language model: perplexity is its measure
        summary["final_ppl"] = result.history[-1]["test_ppl"]
        summary["selected_ppl"] = (result.selected_record or {}).get("test_ppl")
    return summary


def _language_model_line(result: Any, who: str) -> str | None:
    """What a language model's run says instead of accuracy."""
    last = result.history[-1]
    if "test_ppl" not in last:
        return None
    chosen = result.selected_record
    at_best = f", {chosen['test_ppl']:.2f} at the best validation epoch" if chosen else ""
    return f"{who} test perplexity {last['test_ppl']:.2f} (last epoch){at_best}"


def cmd_train_teacher(args: argparse.Namespace) -> Output:
    from smskd.experiment import TEACHER_WEIGHTS, train_teacher

    result = train_teacher(
        _load(args),
        args.out,
        resume=args.resume,
        force=args.force,
        progress=_progress(args),
        export_safetensors=args.safetensors,
    )
    weights = Path(args.out) / TEACHER_WEIGHTS
    said = (
        _language_model_line(result, "teacher") or f"teacher test acc {result.final_accuracy:.2f}%"
    )
    return Output(
        f"{said}; weights: {weights}",
        _run_summary(result, weights),
    )


def cmd_distill(args: argparse.Namespace) -> Output:
    from smskd.experiment import distill

    result = distill(
        _load(args),
        args.out,
        resume=args.resume,
        force=args.force,
        progress=_progress(args),
        export_safetensors=args.safetensors,
    )
    weights = Path(args.out) / "student.pt"
    if result.selected_accuracy is not None:
        chosen = f"{result.selected_accuracy:.2f}% (best validation epoch)"
    else:
        chosen = f"{result.best_accuracy:.2f}% (best epoch, chosen on test: optimistic)"
    said = _language_model_line(result, "student")
    said = said or f"student test acc {result.final_accuracy:.2f}% (last epoch), {chosen}"
    return Output(
        f"{said}; weights: {weights}",
        _run_summary(result, weights),
    )


def cmd_sweep(args: argparse.Namespace) -> Output:
    from smskd.study.sweep import load_sweep, plan, run_sweep, select

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
                "stages": r.stages + (" (β: after tuning)" if r.waits_for_tuning else ""),
                "dir": (r.same_as and f"= {r.same_as}") or r.dir,
            }
            for r in runs
        ]
        return _rows(rows, ["label", "seed", "group", "stages", "dir"])
    run_sweep(
        args.sweep,
        args.out,
        overrides=args.set,
        seeds=seeds,
        only=args.only,
        progress=_progress(args),
    )
    data: dict[str, Any] = {"out": args.out, "index": str(Path(args.out) / "index.json")}
    if args.no_report:
        return Output(f"sweep done: {args.out}", data)
    from smskd.study.report import write_sweep_report

    data["report"] = str(write_sweep_report(args.out))
    return Output(f"report: {data['report']}", data)


def cmd_search(args: argparse.Namespace) -> Output:
    from smskd.study.search import BEST, run_search

    best = run_search(args.spec, args.out, final=not args.no_final, progress=_progress(args))
    data = {
        "out": args.out,
        "best": str(Path(args.out) / BEST),
        "plan": best.label,
        "val_acc": best.val_acc,
        "report": str(Path(args.out) / "report.md"),
    }
    return Output(f"report: {data['report']}", data)


def cmd_report(args: argparse.Namespace) -> Output:
    from smskd.study.report import write_sweep_report

    report = write_sweep_report(args.runs_dir, plots=not args.no_plots)
    return Output(f"report: {report}", {"report": str(report)})


def cmd_eval(args: argparse.Namespace) -> Output:
    from smskd.experiment import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        args.model,
        args.root,
        args.device,
        trust_code=args.trust_code,
    )
    said = f"test acc {metrics['acc']:.2f}%  test loss {metrics['loss']:.4f}"
    if "ppl" in metrics:  # a language model: per token, and bits per character
        said += f"  perplexity {metrics['ppl']:.2f}  bpc {metrics.get('bpc', float('nan')):.3f}"
    return Output(said, metrics)


def cmd_export(args: argparse.Namespace) -> Output:
    from smskd.cli.export import export_student

    result = export_student(
        args.run_dir,
        args.format,
        args.out,
        check=not args.no_check,
        opset=args.opset,
        input_shape=args.input_shape,
        trust_code=args.trust_code,
    )
    return Output(result.summary(), dataclasses.asdict(result))


def cmd_methods(args: argparse.Namespace) -> Output:
    from smskd.methods.registry import describe_methods

    return _rows(
        describe_methods(), ["name", "family", "taps", "helpers", "default_weight", "citation"]
    )


def cmd_models(args: argparse.Namespace) -> Output:
    from smskd.models.registry import MODELS, listed_parameter_count

    rows = [
        {
            "name": name,
            "params": listed_parameter_count(name, args.num_classes, args.in_channels),
            "description": entry.description,
        }
        for name, entry in MODELS.items()
    ]
    return _rows(rows, ["name", "params", "description"])


def cmd_datasets(args: argparse.Namespace) -> Output:
    from smskd.data.registry import DATASETS

    rows = [
        {"name": name, "description": e.description, "location": e.location}
        for name, e in DATASETS.items()
    ]
    return _rows(rows, ["name", "description", "location"])


def cmd_completion(args: argparse.Namespace) -> Output:
    from smskd.cli.completion import completion_script

    script = completion_script(build_parser(), args.shell)
    return Output(script, {"shell": args.shell, "script": script})


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


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not C,H,W, e.g. 3,32,32")
    return shape  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The ``smskd`` parser: every command with its options (completion is written from it)."""
    parser = argparse.ArgumentParser(
        prog="smskd",
        description="Sequential multi-stage knowledge distillation (SMSKD).",
        epilog="Start with: smskd quickstart.  Help on a command: smskd COMMAND --help",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # On every command, after its name: `smskd distill cfg.yaml --out o --json`.
    output = argparse.ArgumentParser(add_help=False)
    modes = output.add_argument_group("output")
    modes.add_argument(
        "-q", "--quiet", action="store_true", help="no progress or log lines; errors only"
    )
    modes.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object (logs go to stderr, no progress bar)",
    )

    def command(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text % {},  # argparse %-formats help, not the description
            epilog=f"example: {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[output],
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
        p.add_argument(
            "--force",
            action="store_true",
            help="start over in an existing run directory: removes the files smskd wrote "
            "there (named), nothing else",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def trust_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--trust-code",
            action="store_true",
            help="let the run's config.yaml import the model factory it names (only for "
            "runs you trust: a received run directory is data)",
        )

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
    p.add_argument("--format", choices=["table", "json"], default="table", help="= --json")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "search",
        cmd_search,
        "Search the best stage plan (methods, order, β, epochs, λ) on the validation "
        "split, training each shared prefix once; write OUT/best.yaml, retrain it against "
        "single KD, joint and the base plan on the test split, and write OUT/report.md. "
        "Run the same command again to resume, or in another shell to add a worker.",
    )
    p.add_argument("spec", help="search spec (YAML)")
    p.add_argument("--out", required=True, help="search directory")
    p.add_argument("--no-final", action="store_true", help="skip the final retrain")
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
    trust_option(p)

    p = command(
        "export",
        cmd_export,
        "Write a finished run's student alone as ONNX, safetensors or TorchScript; "
        "the ONNX and TorchScript files are run once and compared with PyTorch.",
    )
    p.add_argument("run_dir", help="a run directory holding config.yaml and student.pt")
    p.add_argument("--format", required=True, choices=["onnx", "safetensors", "torchscript"])
    p.add_argument("--out", required=True, help="file to write, e.g. student.onnx")
    p.add_argument(
        "--no-check", action="store_true", help="skip running the exported file against PyTorch"
    )
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="example input shape, when the run's dataset is not on this machine",
    )
    trust_option(p)

    for name, handler, text in (
        ("methods", cmd_methods, "List the KD methods."),
        ("models", cmd_models, "List the model zoo with parameter counts."),
        ("datasets", cmd_datasets, "List the datasets and where each looks for files."),
    ):
        p = command(name, handler, text)
        p.add_argument("--format", choices=["table", "json"], default="table", help="= --json")
        if name == "models":
            p.add_argument("--num-classes", type=int, default=10)
            p.add_argument("--in-channels", type=int, default=3)

    p = command(
        "completion",
        cmd_completion,
        "Print a shell completion script for commands and options (bash or zsh).",
    )
    p.add_argument("shell", choices=["bash", "zsh"])
    return parser


def _version() -> str:
    import platform

    import torch

    return f"smskd {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


class Style:
    """ANSI colour on a terminal only, and never with NO_COLOR set (no-color.org)."""

    def __init__(self, stream: Any) -> None:
        self.on = stream.isatty() and not os.environ.get("NO_COLOR") and os.name != "nt"

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = args.json or getattr(args, "format", None) == "json"
    try:
        return _run(args, argv)
    except BrokenPipeError:  # `smskd methods | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        # Under torchrun, leave the process group cleanly (imported only if a run used it).
        if "smskd.train.distributed" in sys.modules:
            sys.modules["smskd.train.distributed"].teardown()


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    red = Style(sys.stderr)
    # The library's log lines go to stdout; a script reading --json output must get
    # the JSON alone there, and --quiet wants none of them.
    try:
        with contextlib.ExitStack() as stack:
            if args.quiet:
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            elif args.json:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            output = args.handler(args)
    except UserError as err:
        print(f"{red('smskd: error:', '1;31')} {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # main(): the reader of our output left
    except OSError as err:
        # The machine, not the input: a full disk, a read-only or vanished directory.
        # Checkpoints are written atomically, so the last one is whole.
        where = f": {err.filename}" if err.filename else ""
        print(
            f"{red('smskd: error:', '1;31')} {err.strerror or err}{where}; fix that and run "
            "the command again (a run continues from its last checkpoint with --resume)",
            file=sys.stderr,
        )
        return 2
    except RunStopped as stopped:
        again = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--force"]
        # A sweep or search resumes by running it again; a single run needs --resume.
        resume = [] if "--resume" in again or args.command in ("sweep", "search") else ["--resume"]
        hint = " ".join(["smskd", *again, *resume])
        print(f"{red('smskd:', '1;33')} {stopped}; continue with: {hint}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"{red('smskd:', '1;33')} interrupted; continue with --resume", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return 0
    if args.json:
        print(json.dumps(output.data, indent=2, default=str))
    elif output.text and not (args.quiet and args.command in _DONE_LINE):
        bold = Style(sys.stdout)
        print(bold(output.text, "1") if args.command in _DONE_LINE else output.text)
    return 0


# Commands whose result is a closing "done" line, which --quiet drops; the others'
# output (a listing, an accuracy, a script) is what they are run for.
_DONE_LINE = {"quickstart", "train-teacher", "distill", "sweep", "search", "report", "export"}


if __name__ == "__main__":
    sys.exit(main())
