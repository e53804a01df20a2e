"""Background runs as real processes: finish, report true status after kill -9, cancel gracefully, resume."""
import copy
import json
import math
import os
import signal
import time

import pytest

from workbench.config import DataSpec, RunConfig, StageSpec, TrainingSpec
from workbench.errors import ConfigError
from workbench.jobs import RunRegistry
from workbench.training.checkpoint import latest_checkpoint


def _config(tiny_config, data, epochs=1.0, **training):
    settings = dict(batch_size=2, log_every=1, warmup_ratio=0.0, cache_features=False)
    settings.update(training)
    return RunConfig(name="tiny job", model=copy.deepcopy(tiny_config),
                     stages=[StageSpec(name="align", epochs=epochs)],
                     data=DataSpec(kind="llava", options={"json_path": str(data)}), training=TrainingSpec(**settings))


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_background_run_completes(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(_config(tiny_config, llava_data))
    registry.start(run_id)
    row = registry.wait(run_id, timeout=180)
    assert row["status"] == "completed", registry.log_tail(run_id)
    assert (registry.run_dir(run_id) / "model" / "integrator.safetensors").is_file()
    assert [r["id"] for r in RunRegistry(tmp_path / "runs").list()] == [run_id]  # a new registry sees it too
    registry.delete(run_id)
    assert registry.list() == [] and not registry.run_dir(run_id).exists()


def test_kill_9_is_reported_and_resume_finishes(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(_config(tiny_config, llava_data, epochs=200, save_every=2))
    pid = registry.start(run_id)
    run_dir = registry.run_dir(run_id)
    assert _wait_for(lambda: latest_checkpoint(run_dir) is not None), registry.log_tail(run_id)
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: registry.get(run_id)["status"] == "died", 30)
    row = RunRegistry(tmp_path / "runs").get(run_id)  # as the app would see it after a restart
    assert row["status"] == "died" and "SIGKILL" in (registry.get(run_id)["reason"] or "")
    cfg = registry.config(run_id)
    cfg.stages[0].epochs = 2  # shorter, same trainable set
    from workbench.config import save_run_config

    save_run_config(cfg, run_dir / "run.yaml")
    registry.resume(run_id)
    row = registry.wait(run_id, timeout=180)
    assert row["status"] == "completed", registry.log_tail(run_id)
    assert "resume" in (run_dir / "metrics.jsonl").read_text()


def test_cancel_is_graceful(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(_config(tiny_config, llava_data, epochs=200))
    registry.start(run_id)
    run_dir = registry.run_dir(run_id)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and '"train"' in (run_dir / "metrics.jsonl").read_text())
    with pytest.raises(ConfigError, match="cancel it before deleting"):
        registry.delete(run_id)
    row = registry.cancel(run_id, wait=60)
    assert row["status"] == "cancelled", registry.log_tail(run_id)
    assert latest_checkpoint(run_dir) is not None
    with pytest.raises(ConfigError, match="No run"):
        registry.get("nope")


def _torchrun(run_dir, on_started=None, timeout=300):
    """`torchrun --nproc_per_node 2 -m workbench.worker RUN_DIR` over gloo on loopback, as a multi-GPU run is
    launched; fails the test on a hang (the whole process group is killed), returns (code, stdout, stderr)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "workbench.worker",
                             str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        if on_started is not None:
            on_started()
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: take the whole process group down, not just the launcher
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-process run hung:\n" + stdout[-2000:] + stderr[-2000:])
    return proc.returncode, stdout, stderr


def _why(run_dir, stdout: str, stderr: str) -> str:
    """What a failed 2-process run says: the exit record and each rank's own traceback (the launcher's summary
    comes last and would otherwise hide them)."""
    exit_file = run_dir / "exit.json"
    record = exit_file.read_text() if exit_file.is_file() else "no exit record"
    first = stderr.find("Traceback")
    return f"{record}\n{stdout[-1500:]}\n{stderr[first:first + 6000] if first >= 0 else stderr[-3000:]}"


def test_two_cpu_processes_train_together_with_gloo(tiny_config, llava_data, tmp_path):
    """DDP over gloo on loopback, launched the way accelerate/torchrun launch a multi-GPU run.

    Some rows point at a truncated image (header fine, pixels cut): at batch size 1 a rank then has a
    batch with nothing usable while the other trains, which must not desynchronise the processes. The
    learning rate follows one cosine over the run's updates (accelerate's prepared scheduler would step once
    per process and reach zero halfway), and both processes leave the process group before exiting.
    """
    from PIL import Image

    truncated = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    rows = json.loads(llava_data.read_text())
    rows += [{**rows[0], "id": f"bad{i}", "image": truncated.name} for i in range(8)]
    llava_data.write_text(json.dumps(rows))

    from workbench.config import save_run_config
    from workbench.training.metrics import read_metrics

    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    save_run_config(_config(tiny_config, llava_data, epochs=1, batch_size=1), run_dir / "run.yaml")
    code, stdout, stderr = _torchrun(run_dir)
    assert code == 0, _why(run_dir, stdout, stderr)
    assert json.loads((run_dir / "exit.json").read_text())["status"] == "completed"
    stage = read_metrics(run_dir / "metrics.jsonl", "stage")
    assert len(stage) == 1  # one log, written by the main process only
    assert stage[0]["batches"] == 8  # 16 rows split over 2 processes, batch 1
    assert read_metrics(run_dir / "metrics.jsonl", "end")[0]["skipped"]["unreadable image"] >= 1
    assert (run_dir / "model" / "integrator.safetensors").is_file()
    last = read_metrics(run_dir / "metrics.jsonl", "train")[-1]  # the cosine at this many of the run's updates
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * last["step"] / stage[0]["updates"]))
    assert last["lr"] == pytest.approx(expected), (last, stage[0]["updates"])


def test_two_processes_stop_together_on_a_time_budget_in_a_text_only_run(tiny_config, llava_data, tmp_path):
    """The budget is decided on one clock for both processes; a text-only run never calls the integrator,
    which DDP must accept (unused parameters)."""
    from workbench.config import save_run_config
    from workbench.training.metrics import read_metrics

    run_dir = tmp_path / "budget"
    run_dir.mkdir()
    config = _config(tiny_config, llava_data, epochs=500, batch_size=1)
    config.text_only = True
    config.stages[0].llm, config.stages[0].max_minutes = "full", 0.1
    save_run_config(config, run_dir / "run.yaml")
    code, stdout, stderr = _torchrun(run_dir)
    assert code == 0, _why(run_dir, stdout, stderr)
    assert json.loads((run_dir / "exit.json").read_text())["status"] == "completed"
    assert len(read_metrics(run_dir / "metrics.jsonl", "time_budget")) == 1
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] <= 0.05 * 1e-3, lrs  # annealed to ~0 by the deadline


def test_two_processes_cancel_together(tiny_config, llava_data, tmp_path):
    from workbench.config import save_run_config
    from workbench.training.metrics import read_metrics

    run_dir = tmp_path / "cancel"
    run_dir.mkdir()
    save_run_config(_config(tiny_config, llava_data, epochs=500, batch_size=1), run_dir / "run.yaml")

    def cancel_once_training():
        metrics = run_dir / "metrics.jsonl"
        assert _wait_for(lambda: metrics.is_file() and read_metrics(metrics, "train"), 180)
        (run_dir / "CANCEL").touch()

    code, stdout, stderr = _torchrun(run_dir, on_started=cancel_once_training)
    assert code == 0, _why(run_dir, stdout, stderr)
    assert json.loads((run_dir / "exit.json").read_text())["status"] == "cancelled"
    assert latest_checkpoint(run_dir) is not None
