"""What a run records, and where.

Always, in the run directory: ``metrics.jsonl`` and ``metrics.csv`` (one record per
epoch) and ``steps.csv`` (the loss terms per logged step, long format). With
``tracking: [tensorboard, mlflow]``: the same numbers as TensorBoard event files
(``RUN_DIR/tensorboard``) and as an MLflow run. Every writer is keyed by the run's
global step, so a resumed run drops what it is about to redo: the CSVs are cut back
to the checkpoint, TensorBoard purges later events, MLflow continues the same run.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from smskd.config import TrackingConfig
from smskd.extras import require

STEP_COLUMNS = ["global_step", "stage", "epoch", "key", "value"]
# Per-step terms that are bookkeeping for the epoch summary, not curves.
_NOT_CURVES = {"ref_weight_sq_mean", "ref_weight_hist"}


def check_backends(cfg: TrackingConfig) -> None:
    """Refuse a backend whose package is missing, before any training."""
    for backend in cfg.backends:
        modules = ["tensorboard"] if backend == "tensorboard" else ["mlflow"]
        if backend == "mlflow" and cfg.mlflow_store_uri("").startswith("sqlite:"):
            modules += ["sqlalchemy", "alembic"]  # the local store
        install = f"pip install 'smskd[{backend}]' or remove {backend} from tracking"
        require(modules, f"tracking: {backend}", install)


class MetricsLog:
    """``metrics.jsonl`` (and its table, ``metrics.csv``) of a run; in memory only
    when ``path`` is None."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self._write_table()

    def keep_until(self, global_epoch: int) -> None:
        """Drop records after ``global_epoch`` (a resumed run rewrites them)."""
        self.records = [r for r in self.records if r.get("global_epoch", 0) <= global_epoch]
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            self._write_table()

    def _write_table(self) -> None:
        # Rewritten whole: later stages add columns (the reference term) that a
        # header written at epoch 1 could not know. A few hundred rows at most.
        assert self.path is not None
        columns = list(dict.fromkeys(key for record in self.records for key in record))
        table = self.path.with_suffix(".csv")
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: _cell(v) for k, v in record.items()})


def _cell(value: Any) -> Any:
    return " ".join(f"{v:.6g}" for v in value) if isinstance(value, list) else value


class _StepTable:
    """``steps.csv``: one row per (logged step, term), appended as the run goes."""

    def __init__(self, path: Path, keep_until: int) -> None:
        self.path = path
        rows = []
        if path.exists():
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["global_step"]) <= keep_until]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, STEP_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def scalars(self, values: Mapping[str, float], step: int, stage: int, epoch: int) -> None:
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerows([step, stage, epoch, key, f"{v:.8g}"] for key, v in values.items())


class _TensorBoard:
    def __init__(self, log_dir: Path, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or past it, left by a run that died after its last
        # checkpoint, are hidden from TensorBoard, so resumed curves do not double.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def hparams(self, params: Mapping[str, Any], config_text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Into this run's own event file (add_hparams would open a second run).
        for summary in hparams(dict(params), {"epoch/test_acc": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", f"```\n{config_text}\n```")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def stage_started(self, stage: int, label: str, step: int) -> None:
        self.writer.add_text("stage", f"stage {stage}: {label}", step)

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run per training run, through the client API: nothing global, so a
    user's own ``mlflow.start_run()`` around ours is left alone."""

    RUN_FILE = "mlflow_run.json"  # which MLflow run this directory writes to

    def __init__(self, cfg: TrackingConfig, out: Path, name: str, resume: bool):
        import logging

        from mlflow.tracking import MlflowClient

        # Its "Creating initial MLflow database tables..." lines would cut the progress bar.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        uri = cfg.mlflow_store_uri(out)
        self.client = MlflowClient(uri)
        saved = out / self.RUN_FILE
        known = json.loads(saved.read_text()) if resume and saved.exists() else None
        if known is not None and known.get("uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # Artifacts beside a local store, not in ./mlruns of whatever the cwd is.
            local = uri.startswith("sqlite:///")
            store = Path(uri.removeprefix("sqlite:///"))
            artifacts = (store.parent / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(cfg.mlflow_experiment, artifacts)
        run = self.client.create_run(
            experiment_id, run_name=name, tags={"smskd.run_dir": str(out.resolve())}
        )
        self.run_id = run.info.run_id
        saved.write_text(json.dumps({"uri": uri, "run_id": self.run_id}))

    def hparams(self, params: Mapping[str, Any], config_text: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # a resume logs them once
        for start in range(0, len(items), 100):  # the store's batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def stage_started(self, stage: int, label: str, step: int) -> None:
        self.client.set_tag(self.run_id, f"smskd.stage{stage}", f"{label}, from step {step}")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class RunTracker:
    """The per-step and per-epoch numbers of one run, to every writer it has.

    Per-step loss terms stay on the device and are averaged over ``every_steps``
    steps; each logged point costs one host synchronization. Under DDP only rank 0
    tracks: per-step points are its own batches', epoch records are over all ranks.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        out: Path | None,
        *,
        name: str = "smskd",
        hparams: Mapping[str, Any] | None = None,
        resume_step: int = 0,
        resume: bool = False,
    ) -> None:
        self.every = cfg.every_steps
        self.global_step = resume_step
        self.stage = self.epoch = 0
        self.lr = math.nan
        self._window: dict[str, list[Tensor]] = {}
        self._steps_table: _StepTable | None = None
        self._writers: list[_TensorBoard | _MLflow] = []
        if out is None:  # run_stages refuses backends without a directory
            return
        self._steps_table = _StepTable(out / "steps.csv", keep_until=resume_step)
        if "tensorboard" in cfg.backends:
            self._writers.append(_TensorBoard(out / "tensorboard", resume_step + 1))
        if "mlflow" in cfg.backends:
            self._writers.append(_MLflow(cfg, out, name, resume))
        flat = flatten(hparams or {})
        config_text = yaml.safe_dump(dict(hparams or {}), sort_keys=False)
        for writer in self._writers:
            writer.hparams(flat, config_text)

    def start_epoch(self, stage: int, label: str, epoch: int, lr: float, first: bool) -> None:
        self.stage, self.epoch, self.lr = stage, epoch, lr
        if first:  # a stage boundary: marked where the stage's first step will land
            for writer in self._writers:
                writer.stage_started(stage, label, self.global_step + 1)

    def step(self, terms: Mapping[str, Tensor]) -> None:
        self.global_step += 1
        if self._steps_table is None:  # nothing to write to: no device syncs for nothing
            return
        for key, value in terms.items():
            if key not in _NOT_CURVES:
                self._window.setdefault(key, []).append(value)
        if self.global_step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Write the steps averaged so far (called at every epoch end, too)."""
        if not self._window:
            return
        keys = sorted(self._window)
        # Batches left out for a NaN/Inf loss (nonfinite: skip) are left out here too,
        # as in the epoch means; a window of only such batches logs nothing.
        finite = torch.isfinite(torch.stack(self._window["loss"]))
        stacked = [torch.stack(self._window[k]).float() for k in keys]
        sums = [torch.where(finite, v, torch.zeros_like(v)).sum() for v in stacked]
        *means, counted = torch.stack([*sums, finite.sum().float()]).tolist()
        self._window = {}
        if counted == 0:
            return
        values = {f"step/{k}": v / counted for k, v in zip(keys, means, strict=True)}
        values["step/lr"] = self.lr
        assert self._steps_table is not None  # step() fills no window without it
        self._steps_table.scalars(values, self.global_step, self.stage, self.epoch)
        for writer in self._writers:
            writer.scalars({**values, "stage": float(self.stage)}, self.global_step)

    def end_epoch(self, record: Mapping[str, Any]) -> None:
        self.flush()
        values = {
            f"epoch/{k}": float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("stage", "epoch")
        }
        for writer in self._writers:
            writer.scalars(values, self.global_step)

    def close(self, status: str = "FINISHED") -> None:
        """``status``: MLflow's ``FINISHED``, ``FAILED`` or ``KILLED``."""
        for writer in self._writers:
            writer.close(status)
        self._writers = []


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Hyper-parameters as the flat, scalar key → value pairs TensorBoard and MLflow
    take: ``{"a": {"b": 1}, "c": [2, 3], "d": [{"e": 4}]}`` → ``{"a.b": 1,
    "c": "[2, 3]", "d.0.e": 4}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            flat.update(flatten(dict(enumerate(value)), f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # lists (stages, milestones) and None
            flat[name] = json.dumps(value)
    return flat
