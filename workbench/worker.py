"""The process behind one background run: `python -m workbench.worker RUN_DIR [--resume]`.

Writes an exit record (status, reason, exit code) however the run ends, so the registry can tell a
finished, cancelled or failed run from one that died without a word (killed, out of memory).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import WorkbenchError


@contextlib.contextmanager
def gpu_slot(root: Path, needs_gpu: bool):
    """One GPU run at a time: later ones wait here (status stays 'queued') until the lock frees."""
    if not needs_gpu:
        yield
        return
    with open(root / "gpu.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


class _Terminated(Exception):
    """SIGTERM outside the training loop (queued, loading, finishing): still leave an exit record."""


def _on_sigterm(*_):
    raise _Terminated()


def main(argv: list[str] | None = None, on_log=None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)  # the trainer swaps in its own graceful handler while it runs
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--registry")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    exit_file = run_dir / "exit.json"

    def finish(status: str, code: int, reason: str | None = None) -> int:
        if os.environ.get("RANK", "0") != "0":  # multi-process: the main process speaks for the run
            return code
        if exit_file.exists():  # a late signal must not overwrite how the run really ended
            return code
        tmp = exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "exit_code": code, "reason": reason, "time": time.time()}))
        tmp.replace(exit_file)
        if registry is not None:
            registry.mark(run_dir.name, status, exit_code=code, reason=reason, finished=time.time())
        return code

    registry = None
    try:
        import torch

        from .config import load_run_config
        from .jobs import RunRegistry
        from .logs import quiet_libraries
        from .training.trainer import Trainer

        quiet_libraries()
        registry = RunRegistry(args.registry) if args.registry else None
        run = load_run_config(run_dir / "run.yaml")
        needs_gpu = run.model.llm.device != "cpu" and torch.cuda.is_available()
        with gpu_slot(run_dir.parent, needs_gpu):
            if registry is not None:
                registry.mark(run_dir.name, "running")
            print(f"[worker] training {run.name} ({run.paradigm}) in {run_dir}", flush=True)
            result = Trainer(run, run_dir, on_log=on_log or _print_row).train(resume=args.resume)
        code = finish(result["status"], 0)
        return code
    except KeyboardInterrupt:
        return finish("cancelled", 130, "interrupted")
    except _Terminated:
        return finish("cancelled", 143, "terminated before training could checkpoint")
    except WorkbenchError as e:  # a problem the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return finish("failed", 1, str(e).splitlines()[0][:300])
    except Exception as e:  # anything else: record why, then fail
        traceback.print_exc()
        return finish("failed", 1, f"{type(e).__name__}: {e}".splitlines()[0][:300])


def _print_row(row: dict) -> None:
    if row["kind"] == "train":
        print(f"[step {row['step']}] loss {row['loss']:.4f} lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s",
              flush=True)
    elif row["kind"] in ("eval", "stage", "checkpoint", "resume", "early_stop", "end"):
        print(f"[{row['kind']}] " + json.dumps({k: v for k, v in row.items() if k not in ("time", "kind")},
                                              default=str)[:400], flush=True)


if __name__ == "__main__":
    sys.exit(main())
