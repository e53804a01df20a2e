"""GPU check: the CUDA path end to end in one script, for the day a GPU is lent.

1. two-stage training (align the MLP projector on captions, then instruction-tune the whole LLM) of a
   0.5B-class LLM (Qwen2.5-0.5B's architecture, random weights) behind a CLIP ViT-L/14-336-sized encoder
   (random weights), bf16 autocast with fp32 trained weights: samples/s, model FLOPs utilisation, peak memory
   against the trainer's own estimate;
2. the instruct stage with LoRA, and with QLoRA (4-bit) when bitsandbytes is installed: peak memory of each;
3. batched generation tokens/s; one attention trace with a rollout map;
4. the run queue: two background runs launched together on the device, never both training.

`--quick --device cpu` runs every line of it on tiny stand-ins in about a minute (it is in the test suite);
a full run on a GPU prints the table, rewrites its section of bench/RESULTS.md and ends with RESULT lines.
Weights are random: throughput and memory do not depend on their values, and nothing is downloaded.

Run: .venv/bin/python bench/gpu_check.py [--quick] [--device cuda|cpu] [--steps N] [--batch-size N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MFU_TARGET = 0.35
MEMORY_TOLERANCE = 0.15
# Dense bf16 peak of common GPUs (FLOP/s), for utilisation; an unknown device reports none.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}

FULL = {  # the published architectures the stand-ins copy
    "llm": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "vocab_size": 151936, "tie_word_embeddings": True},
    "encoder": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336,
                "hidden_act": "quick_gelu", "projection_dim": 768, "layer_norm_eps": 1e-5},
}
TINY = {
    "llm": {**FULL["llm"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2},
    "encoder": {**FULL["encoder"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "patch_size": 16, "image_size": 64},
}


def stand_ins(root: Path, sizes: dict) -> tuple[Path, Path]:
    """Local directories with the architectures' config.json (and the embedded tokenizer for the LLM)."""
    from transformers import AutoTokenizer

    from workbench.assets import converted_llm_dir

    tokenizer = AutoTokenizer.from_pretrained(converted_llm_dir())
    llm, encoder = root / "llm", root / "encoder"
    llm.mkdir(parents=True), encoder.mkdir(parents=True)
    config = {**sizes["llm"], "vocab_size": max(sizes["llm"]["vocab_size"], len(tokenizer)),
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    (llm / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(llm)
    (encoder / "config.json").write_text(json.dumps(sizes["encoder"]))
    return llm, encoder


def run_config(llm: Path, encoder: Path, device: str, steps: int, batch_size: int, peft: str = "none",
               quantize: str | None = None, stages: tuple[str, ...] = ("align", "instruct")):
    from workbench.config import EncoderSpec, IntegratorSpec, LLMSpec, ModelConfig, PeftSpec, RunConfig, TrainingSpec
    from workbench.paradigms import resolve_stages

    model = ModelConfig(encoder=EncoderSpec(name="clip", model=str(encoder), weights="random", layer=-2),
                        integrator=IntegratorSpec(name="mlp"),
                        llm=LLMSpec(name=str(llm), weights="random", device=device),
                        peft=PeftSpec(method=peft, options={"quantize": quantize} if quantize else {}))
    run = RunConfig(name="gpu-check", model=model, paradigm="two-stage",
                    training=TrainingSpec(batch_size=batch_size, log_every=max(1, steps // 4), warmup_ratio=0.1,
                                          cache_features=False, save_every_minutes=0, eval_samples=16,
                                          precision="auto"))
    chosen = [s for s in resolve_stages(run) if s.name in stages]
    for s in chosen:
        s.max_steps, s.max_minutes = steps, None
        if s.llm == "full" and peft != "none":
            s.llm = "peft"
    run.stages = chosen
    return run


def train(run, run_dir: Path) -> dict:
    """One in-process training run; per stage: samples/s (after the first window), peak and estimated memory."""
    import torch

    from workbench.training.metrics import read_metrics
    from workbench.training.trainer import Trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(run, run_dir)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    if result["status"] != "completed":
        raise SystemExit(f"training ended {result['status']}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    stages = {}
    for index, stage in enumerate(run.stages):
        train_rows = [r for r in rows if r["kind"] == "train" and r["stage"] == index]
        estimate = [r for r in rows if r["kind"] == "memory"][index]
        steady = train_rows[1:] or train_rows
        stages[stage.name] = {"samples_per_s": C.median([r["samples_per_s"] for r in steady]),
                              "peak_mb": max(r["memory_mb"] for r in train_rows),
                              "estimate_mb": estimate["total"] / 2**20,
                              "llm": stage.llm}
    return {"model": trainer.model, "stages": stages, "wall_s": wall}


def flops_per_sample(model, dataset, llm_trained: bool) -> float:
    """Forward 2·N per token through the LLM, backward 2·N more for activations and 2·N for trained weights;
    the frozen encoder's forward 2·N per patch. Embedding tables and attention's quadratic term left out."""
    llm = [p for n, p in model.llm.named_parameters() if "embed" not in n and "lm_head" not in n]
    n_llm = sum(p.numel() for p in llm)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    lengths = [len(model.encode_conversation(s.messages, len(s.images)).input_ids)
               + len(s.images) * (model.num_visual_tokens - 1) for s in list(dataset)[:64]]
    tokens = sum(lengths) / len(lengths)
    patches = model.encoder.num_tokens
    return tokens * (4 + (2 if llm_trained else 0)) * n_llm + 2 * n_encoder * patches


def generation_rate(model, image: Path, batch: int, new_tokens: int) -> float:
    conversations = [[{"role": "user", "content": "<image>\nDescribe the image."}]] * batch
    model.generate(conversations[:1], [[image]], max_new_tokens=2)  # warm-up
    seconds, texts = C.timed(lambda: model.generate(conversations, [[image]] * batch, max_new_tokens=new_tokens,
                                                    min_new_tokens=new_tokens))
    return batch * new_tokens / seconds


def attention_trace(model, image: Path) -> dict:
    from workbench.attention import image_map, trace_attention

    seconds, trace = C.timed(lambda: trace_attention(model, [{"role": "user", "content": "<image>\nWhat is it?"}],
                                                     [image], answer="a shape"))
    grid = image_map(trace, token=-1, method="rollout")
    return {"seconds": seconds, "grid": list(grid.shape), "total": float(grid.sum())}


def queue_check(llm: Path, encoder: Path, device: str, root: Path) -> dict:
    """Two background runs launched together: the second waits ('queued') until the first ends."""
    from workbench.jobs import ACTIVE, RunRegistry

    registry = RunRegistry(root / "runs")
    ids = []
    for steps in (40, 2):
        run = run_config(llm, encoder, device, steps, 2, stages=("align",))
        run.training.log_every = 1
        ids.append(registry.create(run))
    for run_id in ids:
        registry.start(run_id)
    most, deadline = 0, time.time() + 900
    while time.time() < deadline:
        rows = [registry.get(i) for i in ids]
        most = max(most, sum(r["status"] == "running" for r in rows))
        if all(r["status"] not in ACTIVE for r in rows):
            break
        time.sleep(0.2)
    statuses = [registry.get(i)["status"] for i in ids]
    return {"statuses": statuses, "most_running_at_once": most,
            "ok": most == 1 and statuses == ["completed", "completed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins, a few steps (about a minute on a CPU)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (default 40, quick 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16, quick 2")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    C.setup_environment()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (4 if args.quick else 40)
    batch_size = args.batch_size or (2 if args.quick else 16)
    sizes = TINY if args.quick else FULL
    image = C.REPO / "examples" / "images" / "red_circle.png"
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ["WORKBENCH_RUNS"] = str(root / "runs")
    try:
        llm, encoder = stand_ins(root, sizes)
        two_stage = train(run_config(llm, encoder, device, steps, batch_size), root / "two-stage")
        model = two_stage.pop("model")
        from workbench.data.easyvqa import load_easy_vqa

        per_sample = flops_per_sample(model, load_easy_vqa("train", limit=64, seed=0), llm_trained=True)
        instruct = two_stage["stages"]["instruct"]
        name = torch.cuda.get_device_name() if device == "cuda" else C.cpu_model()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device == "cuda" else None
        mfu = per_sample * instruct["samples_per_s"] / peak if peak else None
        tokens_per_s = generation_rate(model, image, batch=8 if not args.quick else 2,
                                       new_tokens=64 if not args.quick else 4)
        trace = attention_trace(model, image)
        del model
        lora = train(run_config(llm, encoder, device, steps, batch_size, peft="lora", stages=("instruct",)),
                     root / "lora")
        lora.pop("model")
        qlora = None
        if device == "cuda" and _has("bitsandbytes"):
            qlora = train(run_config(llm, encoder, device, steps, batch_size, peft="lora", quantize="4bit",
                                     stages=("instruct",)), root / "qlora")
            qlora.pop("model")
        queue = queue_check(llm, encoder, device, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    estimate = instruct["estimate_mb"]
    # On a CPU the peak is the process's resident size (libraries included), not comparable to the estimate.
    memory_error = abs(instruct["peak_mb"] - estimate) / estimate if estimate and device == "cuda" else None
    rows = [[f"two-stage {stage}", f"{s['samples_per_s']:.1f}", f"{s['peak_mb']:.0f}",
             f"{s['estimate_mb']:.0f}" if s["estimate_mb"] else "—"] for stage, s in two_stage["stages"].items()]
    for label, r in (("instruct LoRA", lora), ("instruct QLoRA 4-bit", qlora)):
        if r is not None:
            s = r["stages"]["instruct"]
            rows.append([label, f"{s['samples_per_s']:.1f}", f"{s['peak_mb']:.0f}",
                         f"{s['estimate_mb']:.0f}" if s["estimate_mb"] else "—"])
    headers = ["run", "samples/s", "peak memory (MB)", "estimated (MB)"]
    print(C.text_table(headers, rows))
    print(f"device: {name}; MFU (instruct, full LLM): {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}; "
          f"generation: {tokens_per_s:.1f} tokens/s; attention trace: {trace['seconds']:.2f} s, grid {trace['grid']}; "
          f"queue: {queue['statuses']}, at most {queue['most_running_at_once']} running at once"
          + ("" if qlora is not None else "; QLoRA skipped (needs CUDA + bitsandbytes)"))
    numbers = {"device": name, "two_stage": two_stage, "lora": lora, "qlora": qlora, "mfu": mfu,
               "generation_tokens_per_s": tokens_per_s, "attention": trace, "queue": queue}
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2, default=str))
    if not args.quick and device == "cuda":
        body = "\n".join([
            "## gpu_check — the CUDA path: two-stage bf16 training, LoRA/QLoRA memory, generation, queue", "",
            "Qwen2.5-0.5B's architecture and a CLIP ViT-L/14-336-sized encoder with random weights, MLP projector; "
            f"{steps} optimizer steps per stage at batch {batch_size}, `precision: auto`.", "",
            f"- machine: {name}; {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- command: `.venv/bin/python bench/gpu_check.py`", "",
            C.markdown_table(headers, rows), "",
            f"MFU of the full-LLM instruct stage: {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}; "
            f"generation {tokens_per_s:.1f} tokens/s (batch 8); attention trace {trace['seconds']:.2f} s; "
            f"queue: at most {queue['most_running_at_once']} run training at once.",
        ])
        C.write_results_section("gpu_check", body)
    print(C.result_line("gpu_check_queue", str(queue["most_running_at_once"]), "==1", queue["ok"]))
    if memory_error is not None:
        print(C.result_line("gpu_check_memory_estimate_error", f"{memory_error:.2f}", f"<={MEMORY_TOLERANCE}",
                            memory_error <= MEMORY_TOLERANCE))
    print(C.result_line("gpu_check_mfu", f"{mfu:.3f}" if mfu is not None else "n/a", f">={MFU_TARGET}",
                        mfu is not None and mfu >= MFU_TARGET))
    return 0 if queue["ok"] else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
