"""bench/gpu_check.py runs every line of the GPU check on tiny stand-ins on the CPU, so the script works before a
GPU ever sees it: two-stage training, LoRA, generation, an attention trace and the run queue."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_quick_on_the_cpu(tmp_path):
    out = tmp_path / "numbers.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert set(numbers["two_stage"]["stages"]) == {"align", "instruct"}
    assert all(s["samples_per_s"] > 0 for s in numbers["two_stage"]["stages"].values())
    assert numbers["lora"]["stages"]["instruct"]["samples_per_s"] > 0
    assert numbers["generation_tokens_per_s"] > 0
    assert numbers["attention"]["total"] == __import__("pytest").approx(1.0, abs=1e-3)
    assert numbers["queue"]["statuses"] == ["completed", "completed"] and numbers["queue"]["most_running_at_once"] == 1
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT gpu_check_mfu n/a")  # no GPU: utilisation is not claimed
