"""Shared prefix: training samples/s of the direct recipe with and without running the batch's common leading
tokens once per step, side by side, for integrators with few and with many visual tokens.

Four runs per integrator, each `workbench train examples/configs/direct_lora_easyvqa.yaml --integrator NAME` in
its own process for the same number of optimizer steps on the same data (features cached beforehand for all
rows, the text-state cache on in all): `training.share_prefix: false`, the recipe as it is (true) twice, false
again, so that a machine whose speed drifts favours neither. A run's samples/s is the median over its logged
windows after the first; a setting's is the mean of its two runs; the RESULT is the smallest ratio over the
integrators.

Run: .venv/bin/python bench/shared_prefix.py [--quick] [--only avg_pool,mlp]
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

CONFIG = "examples/configs/direct_lora_easyvqa.yaml"
INTEGRATORS = ["avg_pool", "mlp", "qformer"]
TARGET = 1.10


def config_with(integrator: str, share: bool, steps: int) -> dict:
    from workbench.config import apply_overrides

    config = R.with_budget(R.read_yaml(C.REPO / CONFIG), None)
    config = apply_overrides(config, [f"training.share_prefix={'true' if share else 'false'}"])
    config["model"]["integrator"] = {"name": integrator}
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
    parser.add_argument("--only", default=",".join(INTEGRATORS), help="comma-separated integrators")
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps
    integrators = [n for n in args.only.split(",") if n]
    C.setup_environment()
    results: dict[str, dict[bool, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = R.fresh_home(tmp, share_features=tmp / "features")
        R.train(config_with(integrators[0], True, 2), tmp, env, "warm-features")  # fill the feature cache
        load = C.OtherLoad()
        for name in integrators:
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for rep, share in enumerate((False, True, True, False)):  # ABBA: a drifting machine favours neither
                run = R.train(config_with(name, share, steps), tmp, env, f"{name}-{share}-{rep}")
                rows = R.metrics(Path(run["run_dir"]))
                runs[share].append({"sps": samples_per_s(rows), "peak": R.peak_mb(rows),
                                    "note": next((r for r in rows if r["kind"] == "shared_prefix"), {})})
                print(f"  {name} share_prefix={share}: {runs[share][-1]['sps']:.1f} samples/s "
                      f"{runs[share][-1]['note']}", flush=True)
            results[name] = {share: {"sps": sum(r["sps"] for r in rs) / len(rs), "peak": max(r["peak"] for r in rs),
                                     "note": rs[0]["note"]} for share, rs in runs.items()}
        load.stop()
    headers = ["integrator", "samples/s without", "samples/s with", "speed-up", "peak MB without", "peak MB with",
               "trainer's check"]

    def check(note: dict) -> str:
        if not note:
            return "not logged"
        return "loss diff {:.1e}".format(note["check_diff"]) if note.get("used") else f"off: {note.get('reason')}"

    table, ratios = [], []
    for name, r in results.items():
        ratio = r[True]["sps"] / r[False]["sps"]
        ratios.append(ratio)
        table.append([name, f"{r[False]['sps']:.1f}", f"{r[True]['sps']:.1f}", f"{ratio:.2f}x",
                      f"{r[False]['peak']:.0f}", f"{r[True]['peak']:.0f}", check(r[True]["note"])])
    print(C.text_table(headers, table))
    if not args.quick:
        C.write_results_section("shared_prefix", "\n".join([
            "## shared_prefix — the direct recipe with and without running the batch's common start once",
            "",
            f"`workbench train {CONFIG} --integrator NAME` per run in its own process, {steps} optimizer steps of 16, "
            "encoder features cached beforehand for every row, the text-state cache on in both rows; `without` "
            "sets `training.share_prefix: false`. Runs in the order without, with, with, without per integrator; a "
            "run's samples/s is the median over its logged 10-step windows after the first, a setting's the mean "
            "of its two runs.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/shared_prefix.py{'' if args.only == ','.join(INTEGRATORS) else ' --only ' + args.only}`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, table),
        ]))
    worst = min(ratios)
    print(C.result_line("shared_prefix_speedup", f"{worst:.2f}", f">={TARGET}", worst >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
