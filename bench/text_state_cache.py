"""Text-state cache: training samples/s of the fast easy-VQA recipe with and without it, side by side.

Three rows, each `workbench train examples/configs/fast_easyvqa.yaml` in its own process for the same number of
optimizer steps on the same data (features cached beforehand for all rows, so only the LLM part differs):
- `lora-all-layers`: the recipe as it was before: LoRA (dropout 0.05) in all 30 SmolLM2 layers, so every step
  runs the whole LLM forward and backward;
- `lora-top-8, no cache`: LoRA only in the 8 layers the LLaMA-Adapter prompts sit in, without dropout
  (backward then stops at layer 22 by itself), `training.cache_text_states: false`;
- `lora-top-8 + cache` (the recipe now): the same, with the text-state cache, so the 22 frozen text-only layers
  below run once per distinct text instead of every step.
The value is samples/s of the recipe over the first row's, median over the logged windows after the first
(which fills the caches).

Run: .venv/bin/python bench/text_state_cache.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _runs as R  # noqa: E402

CONFIG = "examples/configs/fast_easyvqa.yaml"
TARGET = 2.0
ROWS = {
    "lora-all-layers": ["model.peft.options={}", "model.peft.dropout=0.05", "training.cache_text_states=false"],
    "lora-top-8, no cache": ["training.cache_text_states=false"],
    "lora-top-8 + cache": [],
}


def config_with(overrides: list[str], steps: int) -> dict:
    from workbench.config import apply_overrides

    config = R.with_budget(R.read_yaml(C.REPO / CONFIG), None)
    config = apply_overrides(config, overrides)
    for stage in config["stages"]:
        stage.update(max_steps=steps, max_minutes=None)
    config["training"]["log_every"] = 10
    return config


def samples_per_s(rows: list[dict]) -> float:
    windows = [r["samples_per_s"] for r in rows if r["kind"] == "train"][1:]
    return C.median(windows) if windows else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps per row")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps
    C.setup_environment()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = R.fresh_home(tmp, share_features=tmp / "features")
        R.train(config_with(ROWS["lora-top-8 + cache"], 2), tmp, env, "warm-features")  # fill the feature cache
        load = C.OtherLoad()
        for name, overrides in ROWS.items():
            run = R.train(config_with(overrides, steps), tmp, env, name.replace(" ", "").replace(",", "-"))
            rows = R.metrics(Path(run["run_dir"]))
            cache = next((r for r in reversed(rows) if r["kind"] == "text_state_cache"), {})
            results[name] = {"sps": samples_per_s(rows), "peak": R.peak_mb(rows), "wall": run["wall_s"],
                             "cache": cache}
            print(f"  {name}: {results[name]['sps']:.1f} samples/s, cache {cache}", flush=True)
        load.stop()
    base = results["lora-all-layers"]["sps"]
    headers = ["row", "samples/s (median)", "vs lora-all-layers", "peak memory (MB)", "text-state cache"]

    def cache_note(c: dict) -> str:
        if not c:
            return "off (training.cache_text_states: false)"
        if not c.get("cut"):
            return f"off: {c.get('reason', '')}"
        return f"{c['cut']} layers cached, {c['entries']} texts, {c['mb']} MB, hit rate {c['hit_rate']:.3f}"

    table = [[name, f"{r['sps']:.1f}", f"{r['sps'] / base:.2f}x", f"{r['peak']:.0f}", cache_note(r["cache"])]
             for name, r in results.items()]
    print(C.text_table(headers, table))
    ratio = results["lora-top-8 + cache"]["sps"] / base
    if not args.quick:
        C.write_results_section("text_state_cache", "\n".join([
            "## text_state_cache — the fast easy-VQA recipe with and without the text-state cache",
            "",
            f"`workbench train {CONFIG}` per row in its own process, {steps} optimizer steps of 16, encoder features "
            "cached beforehand for every row; samples/s is the median over the logged 10-step windows after the "
            "first. `lora-all-layers` is the recipe before (LoRA with dropout 0.05 in all 30 layers).",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- command: `.venv/bin/python bench/text_state_cache.py`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, table),
        ]))
    print(C.result_line("text_state_cache_speedup", f"{ratio:.2f}", f">={TARGET}", ratio >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
