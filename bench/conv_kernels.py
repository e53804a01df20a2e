"""Convolutional abstractors on the CPU: PyTorch's own depthwise and 1×1 convolutions against the workbench's
(depthwise in fp32 on a channels-last map, 1×1 as a linear layer), side by side in one process.

Two measurements:
1. One depthwise 3×3 convolution, forward + backward, at the LDP's shape (batch 16, 576 channels, 7×7), in each
   layout (channels-first, channels-last) and precision (fp32, bf16 autocast), timed in rotation.
2. Whole training steps (forward, backward, AdamW) of the direct recipe's model
   (`examples/configs/direct_lora_easyvqa.yaml`, its LoRA and text-state cache) with the LDP and the
   C-Abstractor, on the same real easy-VQA batches of 16 (encoder features computed beforehand), with steps
   alternating between `nn.Conv2d`'s kernels and the workbench's, in fp32 (CPUs without native bf16) and in
   bf16 autocast (what `precision: auto` picks where the CPU has it). The average-pooling integrator, which
   has no convolution, is timed beside them as the floor the abstractors' steps approach.

Run: .venv/bin/python bench/conv_kernels.py [--quick] [--only ldp,c_abstractor]
Prints the tables and `RESULT conv_kernels_step_speedup <smallest plain ÷ workbench s/step> target >=1.10` last.
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
from shared_prefix import CONFIG, build  # noqa: E402

INTEGRATORS = ["ldp", "c_abstractor"]
TARGET = 1.10


@contextlib.contextmanager
def plain_kernels(on: bool):
    """While `on`, the workbench's convolution modules run `nn.Conv2d.forward` (PyTorch's own kernels)."""
    from torch import nn

    from workbench.integrators import convolutional

    classes = (convolutional._DepthwiseConv2d, convolutional._PointwiseConv2d)
    saved = [cls.__dict__["forward"] for cls in classes]
    if on:
        for cls in classes:
            cls.forward = nn.Conv2d.forward
    try:
        yield
    finally:
        for cls, forward in zip(classes, saved):
            cls.forward = forward


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def depthwise_call_ms(precisions: list[str], reps: int) -> list[list[object]]:
    """Median ms of one depthwise 3×3 forward + backward per (layout, precision), timed in rotation."""
    import torch
    from torch import nn

    conv = nn.Conv2d(576, 576, 3, padding=1, groups=576, bias=False)
    settings = [(layout, p) for layout in ("channels-first", "channels-last") for p in precisions]
    inputs = {"channels-first": torch.randn(16, 576, 7, 7)}
    inputs["channels-last"] = inputs["channels-first"].contiguous(memory_format=torch.channels_last)
    times: dict[tuple[str, str], list[float]] = {s: [] for s in settings}
    for rep in range(reps + 1):
        for layout, precision in settings[rep % len(settings):] + settings[:rep % len(settings)]:
            x = inputs[layout].clone().requires_grad_()
            start = time.perf_counter()
            with autocast(precision):
                y = conv(x)
            y.float().sum().backward()
            if rep:
                times[(layout, precision)].append(time.perf_counter() - start)
            conv.weight.grad = None
    return [[layout, precision, f"{1000 * statistics.median(times[(layout, precision)]):.2f}"]
            for layout, precision in settings]


def time_steps(model, cache, optimizer, batches, precision: str, steps: int, convolutions: bool) -> dict[str, list[float]]:
    """s/step with PyTorch's and with the workbench's convolutions, alternating over the same batches."""
    times: dict[str, list[float]] = {"plain": [], "workbench": []}
    for i in range(steps + 2):
        for setting in ("plain", "workbench") if i % 2 == 0 else ("workbench", "plain"):
            batch = batches[i % len(batches)]
            with plain_kernels(setting == "plain" and convolutions):
                t0 = time.perf_counter()
                with autocast(precision):
                    loss = model(**batch, answer_logits_only=True, text_states=cache).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if i >= 2:  # the first two rounds fill the text-state cache and warm the kernels
                    times[setting].append(time.perf_counter() - t0)
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

    precisions = ["fp32"] + (["bf16"] if training_precision("auto", "cpu") == "bf16" else [])
    load = C.OtherLoad()
    call_headers = ["layout", "precision", "ms per forward + backward"]
    calls = depthwise_call_ms(precisions, 5 if args.quick else 20)
    print(C.text_table(call_headers, calls), flush=True)

    headers = ["integrator", "precision", "s/step, nn.Conv2d", "s/step, workbench", "speed-up"]
    table, ratios = [], []
    for name in [n for n in args.only.split(",") if n] + ["avg_pool"]:
        model, cache, optimizer, batches = build(name)
        for precision in precisions:
            times = time_steps(model, cache, optimizer, batches, precision, steps, convolutions=name != "avg_pool")
            plain, ours = statistics.median(times["plain"]), statistics.median(times["workbench"])
            if name != "avg_pool":
                ratios.append(plain / ours)
            table.append([name, precision, f"{plain:.3f}", f"{ours:.3f}",
                          f"{plain / ours:.2f}x" if name != "avg_pool" else "(no convolution)"])
            print(f"  {table[-1]}", flush=True)
        del model, cache, optimizer, batches
    load.stop()
    print(C.text_table(headers, table))
    if not args.quick:
        only = "" if args.only == ",".join(INTEGRATORS) else f" --only {args.only}"
        C.write_results_section("conv_kernels", "\n".join([
            "## conv_kernels — convolutional abstractors' training steps with PyTorch's and the workbench's convolutions",
            "",
            "One depthwise 3×3 convolution (batch 16, 576 channels, 7×7, as in the LDP), forward + backward, in each "
            "layout and precision, medians of rotating calls:",
            "",
            C.markdown_table(call_headers, calls),
            "",
            f"Training steps of `{CONFIG}`'s model per integrator (its LoRA and text-state cache), in one process, on "
            f"8 real easy-VQA batches of 16 with encoder features computed beforehand; {steps} steps per setting, "
            "alternating between `nn.Conv2d`'s kernels and the workbench's (`_DepthwiseConv2d`: fp32 channels-last "
            "on the CPU; `_PointwiseConv2d`: a 1×1 convolution as a linear layer). A step is forward, backward and "
            "the AdamW update; medians. `avg_pool` has no convolution: both of its columns are the same code, the "
            "floor the abstractors approach.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/conv_kernels.py{only}`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, table),
        ]))
    worst = min(ratios)
    print(C.result_line("conv_kernels_step_speedup", f"{worst:.2f}", f">={TARGET}", worst >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
