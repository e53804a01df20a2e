"""The Gradio app as its own process on a free loopback port, as `make run` starts it — for the browser tests and
the load benchmark, which must talk to the real server rather than to objects in their own process."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
APP_MODULE = "workbench.app"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(runs_dir: str | Path, log_path: str | Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> Iterator[str]:
    """Start the app (offline, no auth, own runs folder), wait until it answers, yield its URL, stop it after.

    Raises RuntimeError, with the end of the app's log when there is one, if it exits or does not answer in time.
    """
    port = free_port()
    environment = {**os.environ, "WORKBENCH_OFFLINE": "1", **(env or {})}
    environment.pop("WORKBENCH_APP_AUTH", None)
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", APP_MODULE, "--port", str(port), "--runs", str(runs_dir)],
                            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    tail = Path(log_path).read_text()[-3000:] if log_path else ""
                    raise RuntimeError(f"the app did not start (exit code {proc.poll()}):\n{tail}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()
