"""Background runs: each run is its own process, recorded in a small SQLite registry.

The registry's status is reconciled with reality on every read: a "running" row whose process is
gone, or is another process that reused its pid, becomes "died" with the reason read from its exit
record, its exit code (when we launched it) or the tail of its log. Cancel is graceful (the trainer
checkpoints, then stops); resume restarts from the last checkpoint. GPU runs queue on a file lock so
one GPU job runs at a time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import psutil

from .config import RunConfig, load_run_config, save_run_config, to_dict
from .errors import ConfigError

EXIT_FILE = "exit.json"
LOG_FILE = "log.txt"
ACTIVE = ("queued", "running", "cancelling")
_SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, paradigm TEXT, status TEXT, pid INTEGER, pid_started REAL,
    created REAL, started REAL, finished REAL, exit_code INTEGER, reason TEXT, config TEXT);
CREATE TABLE IF NOT EXISTS history (run_id TEXT, time REAL, status TEXT, reason TEXT)"""


def default_runs_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_RUNS", "runs")).expanduser().resolve()


class RunRegistry:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser().resolve() if root else default_runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "runs.sqlite"
        self._children: dict[str, subprocess.Popen] = {}
        with closing(self._connect()) as con, con:
            con.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def _update(self, run_id: str, **values) -> None:
        """Change a run's row; a change of status is also appended to the run's history."""
        cols = ", ".join(f"{k} = ?" for k in values)
        with closing(self._connect()) as con, con:
            con.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*values.values(), run_id))
            if "status" in values:
                _record(con, run_id, values["status"], values.get("reason"))

    def history(self, run_id: str) -> list[dict]:
        """Every state the run went through, oldest first: created → running → died → queued → … → completed."""
        with closing(self._connect()) as con:
            return [dict(r) for r in con.execute("SELECT time, status, reason FROM history WHERE run_id = ? "
                                                 "ORDER BY rowid", (run_id,))]

    # ------------------------------------------------------------------ create / start
    def create(self, config: RunConfig) -> str:
        """Register a new run (status 'created') after checking it can start: a bad config leaves nothing behind."""
        from .preflight import check_run

        check_run(config)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.name).strip("-") or "run"
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        while (self.root / run_id).exists():
            run_id += "-1"
        run_dir = self.root / run_id
        run_dir.mkdir(parents=True)
        save_run_config(config, run_dir / "run.yaml")
        with closing(self._connect()) as con, con:
            con.execute("INSERT INTO runs (id, name, paradigm, status, created, config) VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, config.name, config.paradigm, "created", time.time(), json.dumps(to_dict(config))))
            _record(con, run_id, "created", None)
        return run_id

    def start(self, run_id: str, resume: bool = False) -> int:
        """Launch the run's worker process; returns its pid."""
        row = self.get(run_id)
        if row["status"] in ACTIVE:
            raise ConfigError(f"Run {run_id} is already {row['status']}")
        run_dir = self.run_dir(run_id)
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
        (run_dir / "CANCEL").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "workbench.worker", str(run_dir), "--registry", str(self.root)]
        if resume:
            cmd.append("--resume")
        log = open(run_dir / LOG_FILE, "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self._children[run_id] = proc
        self._update(run_id, status="queued", pid=proc.pid, pid_started=_create_time(proc.pid), started=time.time(),
                     finished=None, exit_code=None, reason="resumed" if resume else None)
        return proc.pid

    def attach_current_process(self, run_id: str) -> None:
        """A foreground run: this very process is the run's worker."""
        self._update(run_id, status="running", pid=os.getpid(), pid_started=_create_time(os.getpid()),
                     started=time.time(), finished=None, exit_code=None, reason=None)

    # ------------------------------------------------------------------ read (with reconciliation)
    def get(self, run_id: str) -> dict:
        with closing(self._connect()) as con:
            row = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise ConfigError(f"No run '{run_id}' in {self.root}")
        return self._reconcile(dict(row))

    def list(self) -> list[dict]:
        with closing(self._connect()) as con:
            rows = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY created DESC")]
        return [self._reconcile(r) for r in rows]

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def config(self, run_id: str) -> RunConfig:
        return load_run_config(self.run_dir(run_id) / "run.yaml")

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        path = self.run_dir(run_id) / LOG_FILE
        if not path.is_file():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")

    def _reconcile(self, row: dict) -> dict:
        if row["status"] not in ACTIVE or _alive(row["pid"], row["pid_started"]):
            return row
        exit_record = self.run_dir(row["id"]) / EXIT_FILE
        code = None
        child = self._children.pop(row["id"], None)
        if child is not None:
            code = child.wait(timeout=5)
        if exit_record.is_file():
            info = json.loads(exit_record.read_text())
            status, reason = info.get("status", "failed"), info.get("reason")
            code = info.get("exit_code", code)
        else:
            status, reason = "died", _death_reason(code, self.log_tail(row["id"], 5))
        row.update(status=status, reason=reason, exit_code=code, finished=row["finished"] or time.time())
        self._update(row["id"], status=status, reason=reason, exit_code=code, finished=row["finished"])
        return row

    # ------------------------------------------------------------------ control
    def cancel(self, run_id: str, wait: float = 0.0) -> dict:
        """Graceful: ask the trainer to checkpoint and stop; SIGTERM does the same if the file is not seen."""
        row = self.get(run_id)
        if row["status"] not in ACTIVE:
            return row
        self._update(run_id, status="cancelling")  # before the file: a fast worker's final status must win
        (self.run_dir(run_id) / "CANCEL").touch()
        if row["pid"] and _alive(row["pid"], row["pid_started"]):
            os.kill(row["pid"], signal.SIGTERM)
        deadline = time.time() + wait
        while wait and time.time() < deadline and self.get(run_id)["status"] in ACTIVE:
            time.sleep(0.2)
        return self.get(run_id)

    def resume(self, run_id: str) -> int:
        return self.start(run_id, resume=True)

    def delete(self, run_id: str) -> None:
        row = self.get(run_id)
        if row["status"] in ACTIVE:
            raise ConfigError(f"Run {run_id} is {row['status']}: cancel it before deleting")
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)
        with closing(self._connect()) as con, con:
            con.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            con.execute("DELETE FROM history WHERE run_id = ?", (run_id,))

    def wait(self, run_id: str, timeout: float = 600, poll: float = 0.5) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            row = self.get(run_id)
            if row["status"] not in ACTIVE:
                return row
            time.sleep(poll)
        raise TimeoutError(f"Run {run_id} still {row['status']} after {timeout:.0f} s")

    # ------------------------------------------------------------------ called by the worker
    def mark(self, run_id: str, status: str, **values) -> None:
        self._update(run_id, status=status, **values)


def _record(con: sqlite3.Connection, run_id: str, status: str, reason: str | None) -> None:
    """Append a state to the run's history unless it repeats the last one."""
    last = con.execute("SELECT status, reason FROM history WHERE run_id = ? ORDER BY rowid DESC LIMIT 1",
                       (run_id,)).fetchone()
    if last is None or (last[0], last[1]) != (status, reason):
        con.execute("INSERT INTO history (run_id, time, status, reason) VALUES (?, ?, ?, ?)",
                    (run_id, time.time(), status, reason))


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int | None, started: float | None) -> bool:
    """The very process we launched is still there (not a zombie, not a new process with a reused pid)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def _death_reason(code: int | None, tail: str) -> str:
    last = (tail.strip().splitlines() or [""])[-1][:200]
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        why = " (out of memory, or killed by hand)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{why}" + (f"; last log line: {last}" if last else "")
    if code is not None:
        return f"exited with code {code} without finishing" + (f"; last log line: {last}" if last else "")
    return "the process is gone without an exit record (killed, or out of memory)" + (
        f"; last log line: {last}" if last else "")
