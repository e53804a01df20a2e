"""CPU training step: sdpa's default (flash) attention kernel vs the math kernel `training_attention` picks.

Two measurements in one run, side by side:
1. One attention call, forward + backward, at SmolLM2-135M's shape (batch 16, 9 heads, head dim 64, causal,
   bf16) for sequence lengths around the `llm.SHORT_SEQUENCE` threshold, each kernel timed alternately.
2. Whole training steps (forward, backward, AdamW) of the single-stage recipe's model as the trainer runs them
   (visual tokens entering at the top 8 layers, the text-state cache warm, the run's autocast), on the same
   easy-VQA batches, alternating the kernel between repetitions.

Run: .venv/bin/python bench/cpu_attention_kernel.py [--steps 8] [--reps 3]
Prints the tables and `RESULT cpu_attention_step_speedup <default ÷ math s/step> target >1.0` last.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RECIPE = "examples/configs/single_stage_easyvqa.yaml"


def attention_call_ms(lengths: list[int], reps: int) -> list[list[object]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for length in lengths:
        q, k, v = (torch.randn(16, 9, length, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        times: dict[str, list[float]] = {"flash": [], "math": []}
        for rep in range(reps + 1):
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
                with sdpa_kernel([backend]):
                    start = time.perf_counter()
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                    if rep:  # the first round warms both kernels up
                        times[name].append((time.perf_counter() - start) / 3 * 1000)
        flash, math = C.median(times["flash"]), C.median(times["math"])
        rows.append([length, f"{flash:.1f}", f"{math:.1f}", f"{flash / math:.2f}"])
    return rows


def recipe_steps(steps: int, reps: int) -> dict[str, list[float]]:
    """Seconds per training step of the single-stage recipe's model with each kernel (alternating reps)."""
    import torch

    import workbench.model as model_module
    from workbench.config import load_run_config
    from workbench.data.loaders import load_dataset_spec
    from workbench.llm import autocast, training_precision
    from workbench.model import VisionLanguageModel
    from workbench.training.text_state_cache import TextStateCache, frozen_text_layers

    torch.manual_seed(0)
    run = load_run_config(C.REPO / RECIPE)
    model = VisionLanguageModel.from_config(run.model)
    model.set_trainable(integrator=True)
    model.train()
    data = load_dataset_spec(run.data.kind, **{**run.data.options, "limit": steps * 16})
    batches = []
    for start in range(0, steps * 16, 16):  # features computed once, as the trainer's feature cache gives them
        samples = [data[i] for i in range(start, start + 16)]
        batch = model.prepare_batch([s.messages for s in samples], [s.images for s in samples])
        with torch.no_grad():
            batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
        batches.append(batch)
    cut, _ = frozen_text_layers(model)
    cache = TextStateCache(model, cut)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    precision = "bf16" if training_precision("auto", model.device) == "bf16" else "fp32"
    chosen = model_module.training_attention

    def run_steps(kernel) -> float:
        model_module.training_attention = kernel
        try:
            start = time.perf_counter()
            for batch in batches:
                with autocast(model.device, precision):
                    loss = model(**batch, answer_logits_only=True, text_states=cache).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            return (time.perf_counter() - start) / len(batches)
        finally:
            model_module.training_attention = chosen

    run_steps(chosen)  # warm-up: fills the text-state cache and the allocator
    default = lambda device, length: contextlib.nullcontext()  # noqa: E731 - sdpa's own choice
    results: dict[str, list[float]] = {"sdpa default": [], "training_attention": []}
    for _ in range(reps):
        results["sdpa default"].append(run_steps(default))
        results["training_attention"].append(run_steps(chosen))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per repetition")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    C.setup_environment()
    load = C.OtherLoad()
    calls = attention_call_ms([32, 64, 96, 128, 160, 192, 256, 512], args.reps)
    steps = recipe_steps(args.steps, args.reps)
    load.stop()
    print(f"machine: {C.machine_line()}")
    print("one attention call, forward + backward (ms), batch 16 × 9 heads × head dim 64, bf16, causal:")
    print(C.text_table(["tokens", "flash", "math", "flash ÷ math"], calls))
    default, chosen = C.median(steps["sdpa default"]), C.median(steps["training_attention"])
    print(f"\n{RECIPE} training step (s, median of {args.reps} × {args.steps} steps, batch 16):")
    print(C.text_table(["kernel", "s/step", "all reps"],
                       [[name, f"{C.median(v):.3f}", " ".join(f"{x:.3f}" for x in v)] for name, v in steps.items()]))
    print(load.note())
    speedup = default / chosen
    print(C.result_line("cpu_attention_step_speedup", f"{speedup:.2f}", ">1.0", speedup > 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
