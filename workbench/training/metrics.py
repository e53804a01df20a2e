"""One JSONL metrics log per run (step, loss, lr, grad norm, samples/s, memory, eval): what front ends poll."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **values: Any) -> dict:
        row = {"time": round(time.time(), 3), "kind": kind, **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
        return row


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    return list(iter_metrics(path, kind))


def iter_metrics(path: str | Path, kind: str | None = None) -> Iterator[dict]:
    """Rows of a metrics log; a half-written last line (run still going, or killed) is skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or row.get("kind") == kind:
                yield row
