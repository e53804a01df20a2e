"""UI responsiveness while training: how long the app's status refresh takes with a run going.

Starts a real background run of the embedded default (single-stage, MobileNetV2 + MLP + SmolLM2) through the
app's own `Workbench`, then, while it trains on the same 2 cores, calls the Train tab's refresh callback
(`Workbench.progress`: run status, metrics, curves figure, log tail — what the 2-second timer calls) and the
Runs tab's table callback repeatedly, timing each call. Side by side: the same calls with no run going.

Run: .venv/bin/python bench/ui_latency.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_S = 1.0


def load_app():
    import workbench.app

    return workbench.app


def time_calls(fn, n: int, pause: float) -> list[float]:
    out = []
    for _ in range(n):
        t0 = C.now()
        fn()
        out.append(C.now() - t0)
        time.sleep(pause)
    return out


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)]


def launch(wb, name: str, limit: int, minutes: float) -> str:
    """A single-stage run of the embedded default on easy-VQA, registered and started in the app's registry (as
    the Train tab's custom launch does, without going through its form inputs)."""
    from workbench import frontend
    from workbench.config import DataSpec, ModelConfig
    from workbench.data.prompting import SHORT_ANSWER_SYSTEM_PROMPT

    model = ModelConfig(system_prompt=SHORT_ANSWER_SYSTEM_PROMPT)
    data = DataSpec(kind="easy-vqa", options={"split": "train", "limit": limit})
    run = frontend.run_config(model, data, "single-stage", name, 16, 1e-3, 1, minutes or None, 0)
    run_id = wb.registry.create(run)
    wb.registry.start(run_id)
    return run_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 refreshes per side")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    n = 10 if args.quick else args.calls
    C.setup_environment()
    app = load_app()
    with tempfile.TemporaryDirectory() as tmp:
        wb = app.Workbench(Path(tmp) / "runs")
        idle_id = launch(wb, "idle reference", limit=64, minutes=0)
        wb.registry.wait(idle_id, timeout=600)
        idle = {"progress": time_calls(lambda: wb.progress(idle_id), n, 0.05),
                "runs table": time_calls(wb.runs_table, n, 0.05)}
        run_id = launch(wb, "busy", limit=4000, minutes=10)
        deadline = time.time() + 300
        while wb.progress(run_id)[0].find("step 0") != -1 or "running" not in wb.progress(run_id)[0]:
            if time.time() > deadline:
                raise SystemExit("the training run did not start training: " + wb.progress(run_id)[0])
            time.sleep(1)
        busy = {"progress": time_calls(lambda: wb.progress(run_id), n, 0.5),
                "runs table": time_calls(wb.runs_table, n, 0.5)}
        still = wb.registry.get(run_id)["status"]
        wb.registry.cancel(run_id, wait=60)
    headers = ["callback", "idle median (s)", "idle p95 (s)", "training median (s)", "training p95 (s)", "target"]
    rows = [[name, f"{statistics.median(idle[name]):.3f}", f"{p95(idle[name]):.3f}",
             f"{statistics.median(busy[name]):.3f}", f"{p95(busy[name]):.3f}", f"< {TARGET_S:g}"] for name in idle]
    print(C.text_table(headers, rows))
    worst = max(p95(v) for v in busy.values())
    if not args.quick:
        body = "\n".join([
            "## ui_latency — the app's status refresh while a run trains",
            "",
            f"`workbench/app.py`'s callbacks, called {n} times each: the Train tab's refresh (`Workbench.progress`: "
            "status, metrics, curves figure, log tail — what its 2-second timer calls) and the Runs table, first with no "
            "run going, then while a real single-stage run of the embedded default trains in the background on the same "
            f"2 cores (status during the measurement: {still}).",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- command: `.venv/bin/python bench/ui_latency.py`",
            "",
            C.markdown_table(headers, rows),
        ])
        C.write_results_section("ui_latency", body)
    print(C.result_line("ui_status_refresh_p95_while_training_s", f"{worst:.3f}", f"<{TARGET_S:g}", worst < TARGET_S))
    return 0


if __name__ == "__main__":
    sys.exit(main())
