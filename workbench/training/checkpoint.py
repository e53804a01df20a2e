"""Checkpoints: every trained part (via the model's own save format) plus optimizer, scheduler, RNG and
data position, written atomically; the last K kept. Loaded with weights_only=True (no code unpickled)."""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, info: dict, keep_last: int = 2) -> Path:
    """Write checkpoints/step-N atomically; `info` holds stage, epoch, batch position and trainable names."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for partial in root.glob(".ckpt-*"):  # left by a process killed mid-write; one writer per run, so not ours
        shutil.rmtree(partial, ignore_errors=True)
    final = root / f"stage{info['stage']}-step{info['global_step']:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=root))
    try:
        model.save_pretrained(tmp / "model")
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": list(random.getstate()[1]),
        }, tmp / STATE_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one never has its final name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / INFO_FILE).is_file()]
    return sorted(found, key=lambda p: json.loads((p / INFO_FILE).read_text())["global_step"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> tuple[dict, dict]:
    info = json.loads((checkpoint / INFO_FILE).read_text())
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    return info, state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
