"""Metrics as JSON lines: one record per epoch, appended and flushed as it happens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """``metrics.jsonl`` of a run; in memory only when ``path`` is None."""

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

    def keep_until(self, global_epoch: int) -> None:
        """Drop records after ``global_epoch`` (a resumed run rewrites them)."""
        self.records = [r for r in self.records if r.get("global_epoch", 0) <= global_epoch]
        if self.path is not None:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
