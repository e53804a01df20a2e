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

from .atomic_files import write_text_atomic
from .errors import WorkbenchError


def launch_group() -> tuple[int, str | None]:
    """(local rank, an id every process of this launch shares) under torchrun/accelerate; (0, None) alone.

    The launcher gives all its processes the same rendezvous address, and two launches on one machine
    cannot share one, so it names the run's group without any communication between the processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    group = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    return local, group


def needs_gpu(run) -> bool:
    """Whether a run will put work on a GPU, and so must wait for the GPU slot."""
    import torch

    return run.model.llm.device != "cpu" and torch.cuda.is_available()


@contextlib.contextmanager
def device_slot(root: Path, device: str, poll: float = 1.0):
    """One run at a time on each device ("gpu" or "cpu") of a runs folder: later ones wait here (status stays
    'queued') until the lock frees. Two runs sharing a small CPU or one GPU only slow each other down (and
    their wall-clock budgets then buy half the training), so they queue as on a cluster.

    The slot belongs to a run, not to a process: under torchrun only local rank 0 takes the lock and
    then writes its group's id next to it; the other ranks of that run wait for that id and go on
    without the lock. Were every rank to take the lock, rank 1 would wait for rank 0 to let go while
    rank 0 waits for rank 1 to join the process group: a deadlock. The other ranks still wait while
    another run holds the device, so no rank of a queued run loads a model onto a busy GPU.
    """
    local_rank, group = launch_group()
    lock, owner = root / f"{device}.lock", root / f"{device}.owner"
    if local_rank == 0:
        with open(lock, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[worker] queued: waiting for the {device} (another run of {root} is training on it)",
                      flush=True)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if group is not None:
                    write_text_atomic(owner, group)
                yield
            finally:
                if group is not None:
                    with contextlib.suppress(FileNotFoundError):
                        owner.unlink()
        return
    while not _held_by(lock, owner, group):
        time.sleep(poll)
    yield


def _held_by(lock: Path, owner: Path, group: str) -> bool:
    """Whether the lock is held now and `owner` names `group` (an owner file whose holder died is stale)."""
    try:
        if owner.read_text() != group:
            return False
    except FileNotFoundError:
        return False
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # held, by the process that wrote our group's id
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


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
        write_text_atomic(exit_file, json.dumps({"status": status, "exit_code": code, "reason": reason,
                                                 "time": time.time()}))
        if registry is not None:
            registry.mark(run_dir.name, status, exit_code=code, reason=reason, finished=time.time())
        return code

    registry = run = None
    try:
        from .config import load_run_config
        from .jobs import RunRegistry
        from .logs import quiet_libraries
        from .training.trainer import Trainer

        quiet_libraries()
        registry = RunRegistry(args.registry) if args.registry else None
        run = load_run_config(run_dir / "run.yaml")
        with device_slot(run_dir.parent, "gpu" if needs_gpu(run) else "cpu"):
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
        from .training.oom import oom_reason

        reason = oom_reason(e, run) or f"{type(e).__name__}: {e}".splitlines()[0]
        return finish("failed", 1, reason[:300])


def _print_row(row: dict) -> None:
    if row["kind"] == "train":
        print(f"[step {row['step']}] loss {row['loss']:.4f} lr {row['lr']:.2e} {row['samples_per_s']:.1f} samples/s",
              flush=True)
    elif row["kind"] in ("eval", "stage", "checkpoint", "resume", "early_stop", "end"):
        print(f"[{row['kind']}] " + json.dumps({k: v for k, v in row.items() if k not in ("time", "kind")},
                                              default=str)[:400], flush=True)


if __name__ == "__main__":
    sys.exit(main())
