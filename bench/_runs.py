"""Helpers for benchmarks that train real runs: budgeted configs, `workbench train` in its own process, and
evaluation of the saved model on the easy-VQA test split. Shared by easyvqa_time_to_accuracy.py and
integrators.py so both measure the same way."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

PYTHON = sys.executable


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def fresh_home(tmp: Path, share_features: Path | None = None) -> dict:
    """An environment with its own workbench home (empty feature cache unless `share_features` names one to
    reuse) that links the converted SmolLM2 (a one-time set-up cost, not part of training)."""
    from workbench.assets import home

    fresh = tmp / "home"
    fresh.mkdir(parents=True, exist_ok=True)
    models = home() / "models"
    if models.is_dir() and not (fresh / "models").exists():
        (fresh / "models").symlink_to(models)
    if share_features is not None and not (fresh / "feature-cache").exists():
        share_features.mkdir(parents=True, exist_ok=True)
        (fresh / "feature-cache").symlink_to(share_features)
    return {**os.environ, "WORKBENCH_HOME": str(fresh), "WORKBENCH_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def with_budget(config: dict, minutes: float | None, *, text_only: bool = False,
                checkpoint_minutes: float | None = None) -> dict:
    """The config with every stage's time budget scaled so the whole run takes `minutes` of training."""
    from workbench.config import RunConfig, from_dict, to_dict
    from workbench.paradigms import resolve_stages, spread_budget

    run = from_dict(RunConfig, copy.deepcopy(config)).validate()
    stages = resolve_stages(run)
    if minutes is not None:
        spread_budget(stages, minutes)
        for s in stages:
            s.max_steps = None
            s.epochs = max(s.epochs, 50.0)  # the clock, not the data, ends the stage
    for s in stages:  # a stage on the run's own data names none, so `--set data.…` still reaches it
        if s.data == run.data:
            s.data = None
    run.stages = stages
    run.text_only = text_only
    run.eval_data = None  # evaluation happens afterwards, outside the training budget
    run.training.eval_every = 0
    if checkpoint_minutes:
        run.training.save_every, run.training.save_every_minutes = 0, checkpoint_minutes
        run.training.keep_last = 1000
    if text_only:
        run.name = (run.name or "run") + "-text-only"
    return to_dict(run)


def train(config: dict, tmp: Path, env: dict, label: str, extra_args: list[str] | None = None) -> dict:
    """`workbench train` in its own process, as a user runs it; returns the run directory and wall time."""
    import yaml

    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = tmp / "runs"
    t0 = time.time()
    proc = subprocess.run([PYTHON, "-m", "workbench.cli", "train", str(path), "--runs", str(runs), *(extra_args or [])],
                          env=env, cwd=C.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: workbench train failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    run_dir = max((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    return {"run_dir": str(run_dir), "wall_s": wall}


def metrics(run_dir: Path) -> list[dict]:
    from workbench.training.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def peak_mb(rows: list[dict]) -> float:
    return max((r.get("memory_mb", 0.0) for r in rows if r["kind"] == "train"), default=0.0)


def seconds_per_step(rows: list[dict]) -> float:
    """Median seconds per optimizer step over the logged windows (the first, which fills the cache, excluded)."""
    train = [r for r in rows if r["kind"] == "train"]
    windows = []
    for prev, row in zip(train, train[1:]):
        if row["step"] > prev["step"] and row["stage"] == prev["stage"]:
            windows.append((row["time"] - prev["time"]) / (row["step"] - prev["step"]))
    return C.median(windows) if windows else float("nan")


def steps_taken(rows: list[dict]) -> int:
    """Optimizer steps of the run (training rows are logged every few steps; budget stops and checkpoints carry
    the exact step)."""
    return max((r["step"] for r in rows if r["kind"] in ("train", "time_budget", "checkpoint")), default=0)


def checkpoint_points(run_dir: Path, start: float, every_minutes: float) -> list[tuple[float, int, Path]]:
    """(training seconds, optimizer step, model dir) of checkpoints about `every_minutes` apart, plus the final
    model."""
    rows = metrics(run_dir)
    points, next_mark = [], every_minutes * 60
    for r in rows:
        if r["kind"] == "checkpoint" and r["time"] - start >= next_mark - 30:
            ckpt = run_dir / "checkpoints" / r["path"] / "model"
            if ckpt.is_dir():
                points.append((r["time"] - start, r["step"], ckpt))
                next_mark = r["time"] - start + every_minutes * 60
    end = next(r["time"] for r in reversed(rows) if r["kind"] == "end")
    points.append((end - start, steps_taken(rows), run_dir / "model"))
    return points


def evaluate(model_dir: Path, limit: int | None, text_only: bool = False, batch_size: int = 64) -> dict:
    """Accuracy of a saved model on the easy-VQA test split (all 9,673 questions unless `limit`)."""
    from workbench.config import DataSpec
    from workbench.evaluation import evaluate as evaluate_model

    result = evaluate_model(model_dir, DataSpec(kind="easy-vqa", options={"split": "test"}), "vqa",
                            limit=limit or None, text_only=text_only, batch_size=batch_size, precision="auto")
    result["eval_s"] = result["seconds"]
    result.pop("examples", None)
    return result


def by_type(r: dict) -> list[str]:
    return [f"{100 * r['by_type'].get(k, float('nan')):.1f}" for k in ("yes/no", "color", "shape")]
