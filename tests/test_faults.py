"""Faults, each in a real process: kill -9 mid-stage then resume gives the weights of an uninterrupted run; a kill
during a checkpoint write leaves the previous one loadable; an app restarted while a run trains still lists and
controls it; two runs launched at once on one device queue; bad configs are refused before a run exists."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_jobs import _config, _wait_for
from workbench.config import save_run_config
from workbench.errors import ConfigError
from workbench.jobs import RunRegistry
from workbench.training.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state
from workbench.training.metrics import read_metrics


def _weights(run_dir):
    return load_file(run_dir / "model" / "integrator.safetensors")


def test_kill_9_mid_stage_then_resume_equals_an_uninterrupted_run(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    config = _config(tiny_config, llava_data, epochs=25, save_every=5, log_every=20)  # 100 steps
    reference = registry.create(config)
    registry.start(reference)
    assert registry.wait(reference, timeout=300)["status"] == "completed", registry.log_tail(reference)

    run_id = registry.create(config)
    pid = registry.start(run_id)
    run_dir = registry.run_dir(run_id)
    assert _wait_for(lambda: latest_checkpoint(run_dir) is not None, 180), registry.log_tail(run_id)
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: registry.get(run_id)["status"] == "died", 30)
    killed_at = load_trainer_state(latest_checkpoint(run_dir))[0]["global_step"]
    assert 0 < killed_at < 100, "the kill must land mid-stage"
    registry.resume(run_id)
    assert registry.wait(run_id, timeout=300)["status"] == "completed", registry.log_tail(run_id)

    resumed = [r for r in read_metrics(run_dir / "metrics.jsonl", "resume")]
    assert resumed and resumed[-1]["step"] >= killed_at
    want, got = _weights(registry.run_dir(reference)), _weights(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    states = [h["status"] for h in registry.history(run_id)]
    assert states == ["created", "queued", "running", "died", "queued", "running", "completed"], states


def test_resume_without_a_checkpoint_starts_again(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(_config(tiny_config, llava_data))
    registry.resume(run_id)  # never started, so nothing was saved
    assert registry.wait(run_id, timeout=180)["status"] == "completed", registry.log_tail(run_id)
    resume = read_metrics(registry.run_dir(run_id) / "metrics.jsonl", "resume")
    assert resume[0]["checkpoint"] is None and "from the beginning" in resume[0]["message"]


_SLOW_SECOND_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import workbench.training.checkpoint as ckpt
    from workbench.config import load_run_config
    from workbench.training.trainer import Trainer

    real_save, calls = ckpt.torch.save, []

    def save(obj, path, *a, **k):  # the second checkpoint's state file: write half, then hang
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a pickle")
            Path(sys.argv[2]).touch()
            time.sleep(600)
        return real_save(obj, path, *a, **k)

    ckpt.torch.save = save
    run_dir = Path(sys.argv[1])
    Trainer(load_run_config(run_dir / "run.yaml"), run_dir).train()
""")


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tiny_config, llava_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_run_config(_config(tiny_config, llava_data, epochs=4, save_every=3), run_dir / "run.yaml")
    writing = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SECOND_SAVE, str(run_dir), str(writing)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(writing.exists, 180), proc.stdout.read() if proc.poll() is not None else "no second save"
    finally:
        proc.kill()
        proc.wait(30)
    partial = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".ckpt-")]
    assert partial, "the kill landed inside the write"
    (only,) = list_checkpoints(run_dir)
    info, state = load_trainer_state(only)
    assert info["global_step"] == 3 and "optimizer" in state

    registry = RunRegistry(tmp_path / "runs")  # the same run, resumed through the registry, finishes
    run_id = registry.create(_config(tiny_config, llava_data, epochs=4, save_every=3))
    target = registry.run_dir(run_id)
    (target / "checkpoints").mkdir()
    os.rename(only, target / "checkpoints" / only.name)
    os.rename(partial[0], target / "checkpoints" / partial[0].name)
    registry.resume(run_id)
    assert registry.wait(run_id, timeout=180)["status"] == "completed", registry.log_tail(run_id)
    assert read_metrics(target / "metrics.jsonl", "resume")[0]["step"] == 3
    assert not [p for p in (target / "checkpoints").iterdir() if p.name.startswith(".ckpt-")]


_LAUNCH_FROM_APP = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from test_app import CUSTOM, app_module, form
    wb = app_module.Workbench(sys.argv[2])
    run_id, _ = wb.launch(*CUSTOM, "llava", json.dumps({"json_path": sys.argv[4]}), "single-stage", "app run", 2, 1e-3,
                          400, 0, 0, False, "mobilenet_v2", "mlp", sys.argv[3], "none", *form(wb, "mlp"))
    print(run_id)
""")


def test_an_app_restarted_while_a_run_trains_still_lists_and_controls_it(tiny_llm_dir, llava_data, tmp_path):
    from test_app import app_module

    runs = tmp_path / "runs"
    tests_dir = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", _LAUNCH_FROM_APP, tests_dir, str(runs), str(tiny_llm_dir),
                          str(llava_data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = out.stdout.strip().splitlines()[-1]  # the app that launched it has exited

    app = app_module.Workbench(runs)  # a new app process's view
    assert run_id in app.run_ids()
    registry = app.registry
    assert _wait_for(lambda: registry.get(run_id)["status"] == "running" and
                     read_metrics(registry.run_dir(run_id) / "metrics.jsonl", "train"), 180), registry.log_tail(run_id)
    steps = len(read_metrics(registry.run_dir(run_id) / "metrics.jsonl", "train"))
    assert _wait_for(lambda: len(read_metrics(registry.run_dir(run_id) / "metrics.jsonl", "train")) > steps, 60)
    text, *_ = app.progress(run_id)
    assert "running" in text
    assert "cancel" in app.cancel(run_id)
    assert registry.wait(run_id, timeout=120)["status"] == "cancelled", registry.log_tail(run_id)
    assert latest_checkpoint(registry.run_dir(run_id)) is not None


def test_two_runs_launched_together_on_one_device_queue(tiny_config, llava_data, tmp_path):
    registry = RunRegistry(tmp_path / "runs")
    ids = [registry.create(_config(tiny_config, llava_data, epochs=15)) for _ in range(2)]
    for run_id in ids:
        registry.start(run_id)
    most_running = 0

    def both_ended():
        nonlocal most_running
        rows = [registry.get(run_id) for run_id in ids]
        most_running = max(most_running, sum(r["status"] == "running" for r in rows))
        return all(r["status"] not in ("queued", "running") for r in rows)

    assert _wait_for(both_ended, 300), [registry.log_tail(i) for i in ids]
    assert [registry.get(i)["status"] for i in ids] == ["completed", "completed"]
    assert most_running == 1  # never both training
    waited = [i for i in ids if "queued: waiting for the cpu" in (registry.run_dir(i) / "log.txt").read_text()]
    assert len(waited) == 1, [registry.log_tail(i) for i in ids]
    first = next(i for i in ids if i not in waited)
    ended = read_metrics(registry.run_dir(first) / "metrics.jsonl", "end")[0]["time"]
    started = read_metrics(registry.run_dir(waited[0]) / "metrics.jsonl", "stage")[0]["time"]
    assert started >= ended  # the queued run began training only after the other had finished


@pytest.mark.parametrize("override, message", [
    ({"llm": "no-such-llm"}, "Unknown LLM 'no-such-llm'"),
    ({"integrator": "no-such-integrator"}, "Unknown integrator 'no-such-integrator'"),
    ({"options": {"num_queries": 4}}, "Unknown option 'num_queries' for integrator 'mlp'"),
    ({"options": {"hidden_dim": "wide"}}, "Option 'hidden_dim' of integrator 'mlp' must be int"),
    ({"data": {"json_path": "/nowhere/data.json"}}, "json_path /nowhere/data.json does not exist"),
    ({"data": {"json_file": "x"}}, "Unknown option 'json_file' for dataset 'llava'"),
])
def test_a_bad_config_is_refused_before_a_run_exists(tiny_config, llava_data, tmp_path, override, message):
    config = _config(tiny_config, llava_data)
    config.model.llm.name = override.get("llm", config.model.llm.name)
    config.model.integrator.name = override.get("integrator", config.model.integrator.name)
    config.model.integrator.options = override.get("options", {})
    config.data.options = override.get("data", config.data.options)
    registry = RunRegistry(tmp_path / "runs")
    with pytest.raises(ConfigError, match=message):
        registry.create(config)
    assert registry.list() == [] and [p.name for p in registry.root.iterdir()] == ["runs.sqlite"]


def test_the_command_line_says_one_line_for_a_bad_config_and_survives_a_closed_pipe(tiny_config, llava_data,
                                                                                    tmp_path):
    config = _config(tiny_config, llava_data)
    config.model.llm.name = "no-such-llm"
    path = tmp_path / "bad.yaml"
    save_run_config(config, path)
    runs = tmp_path / "runs"
    for extra in ([], ["--background"]):
        out = subprocess.run([sys.executable, "-m", "workbench.cli", "train", str(path), "--runs", str(runs), *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0 and "Unknown LLM 'no-such-llm'" in out.stderr
    assert RunRegistry(runs).list() == []

    registry = RunRegistry(runs)
    run_id = registry.create(_config(tiny_config, llava_data))
    reader_left = subprocess.Popen([sys.executable, "-m", "workbench.cli", "runs", "show", run_id, "--runs", str(runs)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader_left.stdout.close()  # like `| head` that has read all it wants
    assert reader_left.wait(120) != 0
    stderr = reader_left.stderr.read()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr, stderr
