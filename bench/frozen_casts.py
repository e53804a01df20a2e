"""Frozen linear weights held in bf16 under bf16 autocast: seconds per training step with autocast casting
them at every call, with them cast once for the stage, and with that plus the shared prefix, side by side.

Per integrator, the direct recipe's model (`examples/configs/direct_lora_easyvqa.yaml`, its LoRA, the
text-state cache) trains on the same real easy-VQA batches of 16 (encoder features computed beforehand) under
bf16 autocast, as `precision: auto` trains on a CPU with native bf16. Steps rotate between the three settings
(casting and restoring between them, outside the timed step), so a machine whose speed drifts favours none.
A step is forward, backward and the AdamW update. The RESULT is the smallest speed-up of the cast weights over
autocast's own casts (median s/step).

Run: .venv/bin/python bench/frozen_casts.py [--quick] [--only avg_pool,mlp]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from shared_prefix import CONFIG, INTEGRATORS, build  # noqa: E402

TARGET = 1.10
SETTINGS = ["autocast's casts", "cast once", "cast once + shared prefix"]


def time_steps(model, cache, optimizer, batches, steps: int) -> dict[str, list[float]]:
    """s/step of each setting, rotating through them over the same batches."""
    import torch

    from workbench.training.frozen_casts import FrozenLinearCasts

    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for i in range(steps + 2):
        order = SETTINGS[i % 3:] + SETTINGS[:i % 3]
        for setting in order:
            casts = FrozenLinearCasts(model.llm, torch.bfloat16) if setting != SETTINGS[0] else None
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch, answer_logits_only=True, text_states=cache,
                             share_prefix=setting == SETTINGS[2]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= 2:  # the first two rounds fill the text-state cache and warm the kernels
                times[setting].append(time.perf_counter() - t0)
            if casts is not None:
                casts.restore()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps per setting")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(INTEGRATORS), help="comma-separated integrators")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    C.setup_environment()
    from workbench.llm import training_precision

    if training_precision("auto", "cpu") != "bf16":
        print("This CPU has no native bf16: training runs in fp32 here and casts nothing.")
        print(C.result_line("frozen_casts_speedup", "n/a", f">={TARGET}", False))
        return 0
    headers = ["integrator", *[f"s/step, {s}" for s in SETTINGS], "speed-up, cast once",
               "speed-up, + shared prefix", "weights cast"]
    table, ratios = [], []
    load = C.OtherLoad()
    for name in [n for n in args.only.split(",") if n]:
        model, cache, optimizer, batches = build(name)
        import torch

        from workbench.training.frozen_casts import FrozenLinearCasts

        counted = FrozenLinearCasts(model.llm, torch.bfloat16)
        cast_count = counted.count
        counted.restore()
        times = time_steps(model, cache, optimizer, batches, steps)
        medians = [statistics.median(times[s]) for s in SETTINGS]
        ratios.append(medians[0] / medians[1])
        table.append([name, *[f"{m:.3f}" for m in medians], f"{medians[0] / medians[1]:.2f}x",
                      f"{medians[0] / medians[2]:.2f}x", cast_count])
        print(f"  {table[-1]}", flush=True)
        del model, cache, optimizer, batches
    load.stop()
    print(C.text_table(headers, table))
    if not args.quick:
        C.write_results_section("frozen_casts", "\n".join([
            "## frozen_casts — bf16 training steps with the frozen linear weights cast once, not at every call",
            "",
            f"The model of `{CONFIG}` per integrator (its LoRA and text-state cache), in one process, on 8 real "
            f"easy-VQA batches of 16 with encoder features computed beforehand, under bf16 autocast; {steps} steps "
            "per setting, rotating between autocast casting the frozen weights at every call, the frozen linear "
            "weights cast once (`workbench/training/frozen_casts.py`), and that plus the shared prefix. A step is "
            "forward, backward and the AdamW update; the s/step values are medians.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/frozen_casts.py{'' if args.only == ','.join(INTEGRATORS) else ' --only ' + args.only}`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, table),
        ]))
    worst = min(ratios)
    print(C.result_line("frozen_casts_speedup", f"{worst:.2f}", f">={TARGET}", worst >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
