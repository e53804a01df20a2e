"""Training throughput: the workbench's loop vs a minimal hand-written PyTorch loop, same model/batch/data.

Both train the integrator of the embedded default (MobileNetV2 + MLP + SmolLM2-135M, encoder and LLM
frozen) on the same easy-VQA samples in the same order, batch 16, AdamW. The hand loop is what a user
would write with the public API: prepare_batch → forward → backward → step. The workbench side is the
full `Trainer` (accelerate, schedule, clipping, metrics log, memory check, final save) with its own
engineering on: cached encoder features and the LM head only at answer positions. Runs alternate
after a warm-up (which also fills the feature cache, as any second epoch would find it).

Run: .venv/bin/python bench/train_throughput.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps a side, 1 rep (~2 min)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 8)
    reps = args.reps or (1 if args.quick else 3)
    C.setup_environment()

    import torch

    from workbench.config import ModelConfig, RunConfig, StageSpec, TrainingSpec
    from workbench.data.easyvqa import load_easy_vqa
    from workbench.data.prompting import SHORT_ANSWER_SYSTEM_PROMPT
    from workbench.model import VisionLanguageModel
    from workbench.training.trainer import Trainer

    torch.manual_seed(0)
    model_config = ModelConfig(system_prompt=SHORT_ANSWER_SYSTEM_PROMPT)
    model = VisionLanguageModel.from_config(copy.deepcopy(model_config))
    initial = copy.deepcopy(model.integrator.state_dict())
    bs = args.batch_size
    data = load_easy_vqa("train", limit=steps * bs, seed=0)
    order = list(range(len(data)))

    def reset():
        model.integrator.load_state_dict(initial)
        model.zero_grad(set_to_none=True)

    def hand_loop() -> dict:
        reset()
        model.set_trainable(integrator=True)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        t0 = C.now()
        for start in range(0, len(order), bs):
            samples = [data[i] for i in order[start:start + bs]]
            batch = model.prepare_batch([s.messages for s in samples], [s.images for s in samples])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = C.now() - t0
        return {"seconds": seconds, "samples_per_s": len(order) / seconds}

    def workbench_loop() -> dict:
        reset()
        run = RunConfig(model=copy.deepcopy(model_config), stages=[StageSpec(name="align", lr=1e-3, epochs=1)],
                        training=TrainingSpec(batch_size=bs, warmup_ratio=0.0, log_every=10 ** 6))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = C.now()
            result = Trainer(run, tmp, model=model, datasets={"align": data}).train()
            seconds = C.now() - t0
        assert result["status"] == "completed"
        return {"seconds": seconds, "samples_per_s": len(order) / seconds}

    load = C.OtherLoad()
    results = C.interleave({"workbench": workbench_loop, "hand": hand_loop}, reps=reps, warmup=1)
    load.stop()
    wb = C.median([r["samples_per_s"] for r in results["workbench"]])
    hand = C.median([r["samples_per_s"] for r in results["hand"]])
    ratio = wb / hand
    rows = [["samples/s (median)", f"{wb:.2f}", f"{hand:.2f}", f"{ratio:.3f}", f">={TARGET}"],
            ["seconds per run (median)", f"{C.median([r['seconds'] for r in results['workbench']]):.1f}",
             f"{C.median([r['seconds'] for r in results['hand']]):.1f}", "", ""]]
    headers = ["metric", "workbench Trainer", "hand loop", "ratio", "target"]
    print(C.text_table(headers, rows))
    print(load.note())
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratio": ratio, "load": load.share}, indent=2))
    if not args.quick:
        body = "\n".join([
            "## train_throughput — workbench Trainer vs a minimal hand-written loop",
            "",
            f"Embedded default (mobilenet_v2 + mlp + smollm2-135m-instruct), integrator trained, batch {bs}, "
            f"{steps} steps ({steps * bs} easy-VQA samples) per run, 1 warm-up + {reps} alternating reps, medians. "
            "The Trainer's time includes its start-up, memory check, metrics log and final save; it uses its "
            "feature cache (warm after the warm-up run) and computes the LM head only at answer positions.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/train_throughput.py{' --steps ' + str(args.steps) if args.steps else ''}`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, rows),
        ])
        C.write_results_section("train_throughput", body)
    print(C.result_line("train_throughput", f"{ratio:.3f}", f">={TARGET}", ratio >= TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
