"""Shared prefix: seconds per training step of the direct recipe with and without running the batch's common
leading tokens once, side by side in one process, for integrators with few and with many visual tokens.

Per integrator, the direct recipe's model (`examples/configs/direct_lora_easyvqa.yaml`, its LoRA, the
text-state cache) trains on the same real easy-VQA batches of 16 (encoder features computed beforehand);
steps alternate between the ordinary forward and the shared prefix, so a machine whose speed drifts favours
neither. A step is forward, backward and the AdamW update. Both precisions the trainer may pick on a CPU are
timed: fp32 (CPUs without native bf16, most laptops) and bf16 autocast (where the CPU has it; `auto` picks it).
The value is the median s/step without over with; the RESULT is the smallest ratio over every row measured.

Run: .venv/bin/python bench/shared_prefix.py [--quick] [--only avg_pool,mlp]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIG = "examples/configs/direct_lora_easyvqa.yaml"
INTEGRATORS = ["avg_pool", "mlp", "qformer"]
TARGET = 1.10


def build(integrator: str):
    """(model, text-state cache, optimizer, batches with cached features) of the recipe with `integrator`."""
    import torch

    from workbench.config import IntegratorSpec, load_run_config
    from workbench.data.loaders import load_dataset_spec
    from workbench.model import VisionLanguageModel
    from workbench.training.text_state_cache import TextStateCache, frozen_text_layers

    run = load_run_config(C.REPO / CONFIG)
    if integrator != run.model.integrator.name:
        run.model.integrator = IntegratorSpec(name=integrator)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(run.model).set_trainable(integrator=True, llm=False, peft=True).train()
    stage = run.stages[0]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model.integrator.parameters() if p.requires_grad], "lr": stage.lr},
        {"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": stage.lr_llm}])
    data = load_dataset_spec("easy-vqa", split="train")
    batches = []
    for start in range(0, 8 * 16, 16):
        samples = [data[i * 37 % len(data)] for i in range(start, start + 16)]
        batch = model.prepare_batch([s.messages for s in samples], [s.images for s in samples])
        with torch.no_grad():
            batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
        batches.append(batch)
    cut = frozen_text_layers(model)[0]
    return model, TextStateCache(model, cut) if cut else None, optimizer, batches


def time_steps(model, cache, optimizer, batches, precision: str, steps: int) -> dict[bool, list[float]]:
    """s/step of alternating ordinary and shared-prefix steps over the same batches."""
    import torch

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 2):
        for share in (False, True) if i % 2 == 0 else (True, False):
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            with autocast():
                loss = model(**batch, answer_logits_only=True, text_states=cache, share_prefix=share).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= 2:  # the first two rounds fill the text-state cache and warm the kernels
                times[share].append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 steps per setting")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=",".join(INTEGRATORS), help="comma-separated integrators")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    C.setup_environment()
    import torch

    from workbench.llm import training_precision
    from workbench.shared_prefix import shared_prefix_length

    precisions = ["fp32"] + (["bf16"] if training_precision("auto", "cpu") == "bf16" else [])
    headers = ["integrator", "precision", "s/step without", "s/step with", "speed-up", "visual tokens",
               "shared prefix (tokens)"]
    table, ratios = [], []
    load = C.OtherLoad()
    for name in [n for n in args.only.split(",") if n]:
        model, cache, optimizer, batches = build(name)
        prefix = shared_prefix_length(batches[0]["input_ids"], batches[0]["attention_mask"],
                                      batches[0]["input_ids"].shape[1])
        for precision in precisions:
            times = time_steps(model, cache, optimizer, batches, precision, steps)
            without, with_ = statistics.median(times[False]), statistics.median(times[True])
            ratios.append(without / with_)
            table.append([name, precision, f"{without:.3f}", f"{with_:.3f}", f"{without / with_:.2f}x",
                          model.num_visual_tokens, prefix])
            print(f"  {table[-1]}", flush=True)
        del model, cache, optimizer, batches
    load.stop()
    print(C.text_table(headers, table))
    if not args.quick:
        C.write_results_section("shared_prefix", "\n".join([
            "## shared_prefix — training steps with and without running the batch's common start once",
            "",
            f"The model of `{CONFIG}` per integrator (its LoRA and text-state cache), in one process, on 8 real "
            f"easy-VQA batches of 16 with encoder features computed beforehand; {steps} steps per setting, "
            "alternating between the ordinary forward and the shared prefix. A step is forward, backward and the "
            "AdamW update; the s/step values are medians. fp32 is what a CPU without native bf16 trains in; bf16 "
            "(autocast) is what `precision: auto` picks on a CPU with it.",
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
