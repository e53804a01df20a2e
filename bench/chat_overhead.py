"""Chat overhead: what the workbench's image path costs on top of the plain LLM it wraps (CPU, default model).

Side by side in one run, on the same LLM object, greedy, exactly N new tokens each (min = max, so EOS
cannot end either early):
  workbench  `VisionLanguageModel.generate(messages, [image path])`: image load, preprocess, encoder,
             integrator, splice, then `llm.generate(inputs_embeds=…)`;
  plain      `llm.generate(input_ids=…)` on a text-only prompt from the same chat template and the same
             total length (the `<image>` slot filled with num_visual_tokens filler tokens).
TTFT is timed from the call to the first new token (a streamer's timestamp), so for the workbench it is
the whole user-visible latency from image path to first token (prompt formatting included; the plain
side gets its ids pre-tokenized, which only makes the comparison stricter). Targets (issue): tokens/s ratio >= 0.95
and TTFT ratio <= 1.3. A full run also rewrites this benchmark's section of bench/RESULTS.md.

    .venv/bin/python bench/chat_overhead.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "chat_overhead"
IMAGE = C.REPO / "examples" / "images" / "red_circle.png"
MESSAGES = [{"role": "user", "content": "<image>\nWhat color is the shape?"}]
FILLER = ("Here is a short description of a picture that shows one simple coloured shape on a plain "
          "background, drawn in the centre with clean edges and nothing else around it. ")
TOKENS_TARGET, TTFT_TARGET = 0.95, 1.3
REFERENCE_STEP = "(reference) plain LLM prefill, text ids"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (24 tokens, 2 reps); RESULTS.md is left alone")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--tokens", type=int, help="new tokens per generation (default 64, quick 24)")
    p.add_argument("--reps", type=int, help="interleaved repetitions after warm-up (default 7, quick 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own default, the machine's cores)")
    p.add_argument("--ttft-reps", type=int, help="extra interleaved 1-token runs for TTFT (default 10, quick 3)")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (24 if args.quick else 64)
    args.reps = args.reps or (2 if args.quick else 7)
    args.ttft_reps = args.ttft_reps if args.ttft_reps is not None else (3 if args.quick else 10)
    args.warmup = 1 if args.quick else 2
    return args


def text_only_prompt(model):
    """The multimodal prompt's ids with the image sentinel replaced by filler text of the visual tokens' length."""
    import torch
    from workbench.data.prompting import IMAGE_TOKEN_INDEX

    ids = model.encode_conversation(MESSAGES, 1, add_generation_prompt=True).input_ids
    slot = ids.index(IMAGE_TOKEN_INDEX)
    filler = model.tokenizer(FILLER, add_special_tokens=False).input_ids
    filler = (filler * (model.num_visual_tokens // len(filler) + 1))[: model.num_visual_tokens]
    text = ids[:slot] + filler + ids[slot + 1:]
    assert len(text) == len(ids) - 1 + model.num_visual_tokens and IMAGE_TOKEN_INDEX not in text
    return torch.tensor([text])


def summarize(t0: float, t1: float, token_times: list[float], expected: int) -> dict:
    n = len(token_times)
    assert n == expected, f"generated {n} tokens, expected {expected}"
    total, ttft = t1 - t0, token_times[0] - t0
    return {"tokens": n, "total_s": total, "ttft_s": ttft, "tok_s": n / total,
            "decode_tok_s": (n - 1) / (total - ttft) if n > 1 else None}


def make_runs(model, ids, n: int) -> dict:
    """The two timed callables, sharing one GenerationConfig (the workbench's own, plus min_new_tokens=n)."""
    import torch

    gen = model._generation_kwargs(n, 0.0, 1.0, min_new_tokens=n)
    mask = torch.ones_like(ids)

    def workbench():
        clock = C.make_token_clock()
        t0 = C.now()
        model.generate(MESSAGES, [str(IMAGE)], max_new_tokens=n, temperature=0.0, streamer=clock, min_new_tokens=n)
        return summarize(t0, C.now(), clock.times, n)

    def plain():
        clock = C.make_token_clock()
        t0 = C.now()
        model.llm.generate(input_ids=ids, attention_mask=mask, streamer=clock, **gen)
        return summarize(t0, C.now(), clock.times, n)

    return {"workbench": workbench, "plain": plain}


def ttft_breakdown(model, ids, reps: int) -> dict[str, float]:
    """Median seconds of each step on the way to the workbench's first token, plus the plain LLM's prefill."""
    import torch
    from workbench.images import load_image

    def once() -> dict[str, float]:
        t: dict[str, float] = {}
        with torch.inference_mode():
            t["image load"], image = C.timed(lambda: load_image(str(IMAGE)))
            t["preprocess"], pixels = C.timed(lambda: model.encoder.preprocess([image]))
            t["prompt tokenize"], batch = C.timed(lambda: model.collate(
                [model.encode_conversation(MESSAGES, 1, add_generation_prompt=True)]))
            t["encoder forward"], feats = C.timed(lambda: model.encode_images(pixels))
            t["integrator"], visual = C.timed(lambda: model.visual_tokens(feats))
            t["splice"], inputs = C.timed(lambda: model.splice(batch["input_ids"], batch["attention_mask"], visual,
                                                               padding_side="left"))
            t["LLM prefill (embeds)"], _ = C.timed(lambda: model.llm(  # as generate() runs it
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, logits_to_keep=1))
            t[REFERENCE_STEP], _ = C.timed(lambda: model.llm(
                input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1))
        return t

    once()  # warm-up
    runs = [once() for _ in range(reps)]
    return {k: C.median([r[k] for r in runs]) for k in runs[0]}


def measure(model, ids, args) -> dict:
    """Interleaved full-length runs (tokens/s, TTFT) plus interleaved 1-token runs (more TTFT samples)."""
    raw = C.interleave(make_runs(model, ids, args.tokens), args.reps, args.warmup)
    firsts = C.interleave(make_runs(model, ids, 1), args.ttft_reps, warmup=0) if args.ttft_reps else {k: [] for k in raw}
    med, best = {}, {}
    for side, rs in raw.items():
        ttfts = [r["ttft_s"] for r in rs + firsts[side]]
        med[side] = {k: C.median([r[k] for r in rs]) for k in ("tok_s", "decode_tok_s", "total_s")}
        med[side]["ttft_s"] = C.median(ttfts)
        best[side] = {"tok_s": max(r["tok_s"] for r in rs), "ttft_s": min(ttfts)}
    w, p = med["workbench"], med["plain"]
    ratios = {"tok_s": w["tok_s"] / p["tok_s"], "decode_tok_s": w["decode_tok_s"] / p["decode_tok_s"],
              "ttft": w["ttft_s"] / p["ttft_s"], "total": w["total_s"] / p["total_s"],
              "best_tok_s": best["workbench"]["tok_s"] / best["plain"]["tok_s"],
              "best_ttft": best["workbench"]["ttft_s"] / best["plain"]["ttft_s"]}
    passed = {"tok_s": ratios["tok_s"] >= TOKENS_TARGET, "ttft": ratios["ttft"] <= TTFT_TARGET}
    passed["all"] = passed["tok_s"] and passed["ttft"]
    return {"median": med, "best": best, "ratios": ratios, "pass": passed, "runs": raw, "ttft_runs": firsts}


def tables(res: dict, breakdown: dict[str, float], ttft_samples: int):
    """(headers, rows) of the comparison and of the TTFT breakdown, shared by terminal and RESULTS.md."""
    w, p, r = res["median"]["workbench"], res["median"]["plain"], res["ratios"]
    main_rows = [
        ["tokens/s (new / total)", f"{w['tok_s']:.2f}", f"{p['tok_s']:.2f}", f"{r['tok_s']:.3f}", f">={TOKENS_TARGET}"],
        ["decode tokens/s (n-1)/(total-TTFT)", f"{w['decode_tok_s']:.2f}", f"{p['decode_tok_s']:.2f}",
         f"{r['decode_tok_s']:.3f}", ""],
        [f"TTFT ms ({ttft_samples} samples)", f"{w['ttft_s'] * 1e3:.1f}", f"{p['ttft_s'] * 1e3:.1f}", f"{r['ttft']:.3f}",
         f"<={TTFT_TARGET}"],
        ["total ms", f"{w['total_s'] * 1e3:.1f}", f"{p['total_s'] * 1e3:.1f}", f"{r['total']:.3f}", ""],
        ["best-of (noise check): tokens/s, TTFT ms", f"{res['best']['workbench']['tok_s']:.2f}, "
         f"{res['best']['workbench']['ttft_s'] * 1e3:.1f}", f"{res['best']['plain']['tok_s']:.2f}, "
         f"{res['best']['plain']['ttft_s'] * 1e3:.1f}", f"{r['best_tok_s']:.3f}, {r['best_ttft']:.3f}", ""]]
    steps = {k: v for k, v in breakdown.items() if k != REFERENCE_STEP}
    rest = w["ttft_s"] - sum(steps.values())
    pct = lambda v: f"{100 * v / w['ttft_s']:.0f}%"
    step_rows = [[k, f"{v * 1e3:.1f}", pct(v)] for k, v in steps.items()]
    step_rows += [["rest of generate() (TTFT - steps)", f"{rest * 1e3:.1f}", pct(rest)],
                  [REFERENCE_STEP, f"{breakdown[REFERENCE_STEP] * 1e3:.1f}", ""]]
    return ((["metric (median)", "workbench", "plain", "ratio", "target"], main_rows),
            (["workbench TTFT step (median)", "ms", "% of TTFT"], step_rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    C.setup_environment()
    import torch
    from workbench.config import ModelConfig
    from workbench.model import VisionLanguageModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the integrator is freshly initialised; fix it so answers repeat run to run
    model = VisionLanguageModel.from_config(ModelConfig(), device="cpu")
    ids = text_only_prompt(model)
    machine = C.machine()
    settings = {"prompt_tokens": ids.shape[1], "visual_tokens": model.num_visual_tokens, "new_tokens": args.tokens,
                "warmup": args.warmup, "reps": args.reps, "ttft_reps": args.ttft_reps,
                "image": str(IMAGE.relative_to(C.REPO))}
    print(f"{NAME}: {C.machine_line(machine)}")
    print(f"prompt {ids.shape[1]} tokens (text + {model.num_visual_tokens} visual), {args.tokens} new tokens, greedy; "
          f"{args.warmup} warm-up + {args.reps} interleaved reps, + {args.ttft_reps} interleaved 1-token reps for TTFT")

    load = C.OtherLoad()
    res = measure(model, ids, args)
    breakdown = ttft_breakdown(model, ids, max(5, args.reps))
    load.stop()
    (h1, r1), (h2, r2) = tables(res, breakdown, args.reps + args.ttft_reps)
    print(f"\n{C.text_table(h1, r1)}\n\n{C.text_table(h2, r2)}\n\n{load.note()}")

    ratios, passed = res["ratios"], res["pass"]
    mark = lambda ok: "PASS" if ok else "MISS"
    exe = os.path.relpath(sys.executable, C.REPO) if sys.executable.startswith(str(C.REPO)) else sys.executable
    command = " ".join([exe, "bench/chat_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": NAME, "date": date, "command": command, "machine": machine, "settings": settings,
            "targets": {"tok_s": f">={TOKENS_TARGET}", "ttft": f"<={TTFT_TARGET}"}, **res,
            "ttft_breakdown_s": breakdown, "other_load": load.share}, indent=2))
    if not args.quick:
        C.write_results_section(NAME, f"""## chat_overhead — workbench chat vs plain transformers on the same LLM

Default embedded model (mobilenet_v2 + mlp + smollm2-135m-instruct) on CPU. Workbench: `generate` on
`<image>` + "What color is the shape?" about `{settings['image']}`, TTFT from image path to first token.
Plain: `llm.generate(input_ids=…)` on a same-length text-only prompt ({ids.shape[1]} tokens, the image slot
filled with {model.num_visual_tokens} filler tokens). Greedy, {args.tokens} new tokens forced; {args.warmup} warm-up +
{args.reps} interleaved reps, TTFT also from {args.ttft_reps} interleaved 1-token reps; medians.

- machine: {C.machine_line(machine)}
- date: {date}
- command: `{command}`
- {load.note()}

{C.markdown_table(h1, r1)}

{C.markdown_table(h2, r2)}

Verdict: **{mark(passed['all'])}** — tokens/s ratio {ratios['tok_s']:.3f} (target >={TOKENS_TARGET}: \
{mark(passed['tok_s'])}), TTFT ratio {ratios['ttft']:.3f} (target <={TTFT_TARGET}: {mark(passed['ttft'])}).
""")
    print(f"TTFT ratio {ratios['ttft']:.3f} target <={TTFT_TARGET} {mark(passed['ttft'])}")
    print(C.result_line(NAME, f"{ratios['tok_s']:.3f}", f">={TOKENS_TARGET}", passed["all"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
