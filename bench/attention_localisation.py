"""Attention localisation on easy-VQA: does the map put its mass on the shape the model is asked about?

easy-VQA images hold one shape on a plain background, so the shape's pixels are found from the image itself
(pixels far from the corner colour). For each trained model (the rows `bench/integrators.py --keep DIR`
saved) and each of N test questions about colour or shape, the model answers, `workbench.attention`
traces the answer, and for each view the score is

    localisation = Σ_patches map · coverage  /  mean(coverage)

where coverage is the fraction of a grid patch's pixels that belong to the shape. A uniform map scores
exactly 1.0 (no better than chance); a map entirely on shape-only patches scores 1 / (shape's area share).

Views: attention (mean over heads, all layers — from the entry layer up when visual tokens enter above the
embeddings), attention in the last layer, attention rollout, gradient-weighted relevancy, |gradient · input| per
encoder patch (read after the integrator's LayerNorm, see workbench/attention.py).

Run: .venv/bin/python bench/attention_localisation.py [--quick] [--models DIR] [--questions N]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_MODELS = C.REPO / "artifacts" / "integrator-models"
VIEWS = {"attention (all layers)": ("attention", None), "attention (last layer)": ("attention", [-1]),
         "rollout": ("rollout", None), "relevancy": ("relevancy", None), "gradient × input": ("gradient", None)}
TARGET = 1.0


def shape_coverage(image, grid: tuple[int, int], threshold: float = 60.0):
    """(h, w) fraction of each grid patch's pixels that belong to the shape (far from the corner colour)."""
    import numpy as np
    import torch

    a = np.asarray(image.convert("RGB")).astype(np.float32)
    background = np.median(np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]), axis=0)
    mask = torch.from_numpy((np.linalg.norm(a - background, axis=-1) > threshold).astype(np.float32))
    return torch.nn.functional.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]


def localisation(amap, coverage) -> float:
    return float((amap * coverage).sum() / coverage.mean().clamp_min(1e-9))


def score_model(model_dir: Path, questions, views) -> dict:
    from workbench.attention import image_map, trace_attention
    from workbench.errors import WorkbenchError
    from workbench.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(model_dir)
    scores: dict[str, list[float]] = {v: [] for v in views}
    unavailable: dict[str, str] = {}
    correct = 0
    t0 = time.time()
    for sample in questions:
        image = sample.images[0]
        trace = trace_attention(model, sample.messages[:1], [image], max_new_tokens=4, relevancy=True)
        correct += trace.answer.strip().lower() == sample.meta["answer"]
        coverage = shape_coverage(trace.images[0], trace.grid)
        for view, (method, layers) in views.items():
            try:
                scores[view].append(localisation(image_map(trace, 0, method, "mean", layers), coverage))
            except WorkbenchError as e:
                unavailable[view] = str(e)
    return {"scores": {v: (sum(s) / len(s) if s else None) for v, s in scores.items()},
            "unavailable": unavailable, "accuracy": correct / max(1, len(questions)), "seconds": time.time() - t0,
            "integrator": model.config.integrator.name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 questions, first 2 models")
    parser.add_argument("--models", default=str(DEFAULT_MODELS), help="folder of saved models, one per integrator")
    parser.add_argument("--questions", type=int, default=40, help="colour/shape test questions per model")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--about", default="trained by `bench/integrators.py --keep DIR` (same recipe and budget)",
                        help="where the models come from, for RESULTS.md (a --models path of this machine means "
                             "nothing to a reader)")
    args = parser.parse_args()
    C.setup_environment()
    from workbench.data.easyvqa import load_easy_vqa

    folders = sorted(d for d in Path(args.models).iterdir() if (d / "config.yaml").is_file()) \
        if Path(args.models).is_dir() else []
    folders = [d for d in folders if d.name != "text-only"]
    if not folders:
        print(f"no trained models under {args.models}: run bench/integrators.py --keep {args.models} first")
        return 1
    n = 5 if args.quick else args.questions
    if args.quick:
        folders = folders[:2]
    test = load_easy_vqa("test")
    questions = [s for s in test if s.meta["question_type"] in ("color", "shape")]
    questions = [questions[i] for i in range(0, len(questions), max(1, len(questions) // n))][:n]
    load = C.OtherLoad()
    results = {}
    for folder in folders:
        results[folder.name] = score_model(folder, questions, VIEWS)
        r = results[folder.name]
        shown = ", ".join(f"{v} {s:.2f}" for v, s in r["scores"].items() if s is not None)
        print(f"  {folder.name:<14} {shown}  (accuracy on these {n}: {r['accuracy']:.2f}, {r['seconds']:.0f} s)",
              flush=True)
    load.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    headers = ["integrator", *VIEWS, "accuracy on these questions"]
    rows = [[name, *[("n/a" if r["scores"][v] is None else f"{r['scores'][v]:.2f}") for v in VIEWS],
             f"{r['accuracy']:.2f}"] for name, r in results.items()]
    print(C.text_table(headers, rows))
    name = max(results, key=lambda n: results[n]["accuracy"])  # the model that answers best: it should look best
    reference = results[name]
    best_view, best = max(((v, s) for v, s in reference["scores"].items() if s is not None), key=lambda x: x[1])
    if not args.quick:
        notes = sorted({f"- {name}: {v}: {msg}" for name, r in results.items() for v, msg in r["unavailable"].items()})
        body = "\n".join([
            "## attention_localisation — do the attention views land on the shape?",
            "",
            f"For each model ({args.about}) and "
            f"{n} easy-VQA test questions about colour or shape: the model answers, `workbench.attention` traces "
            "the first answer token, and each view's map over the 7×7 grid is scored as Σ map·coverage / "
            "mean(coverage), coverage = share of a patch's pixels on the shape (found from the image: pixels far "
            "from the background colour). **1.0 = no better than a uniform map**; higher = on the shape.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/attention_localisation.py --models DIR --questions {n}`",
            f"- {load.note()}",
            "",
            C.markdown_table(headers, rows),
            "",
            *(["Views that do not exist for a family:", *notes] if notes else []),
        ])
        C.write_results_section("attention_localisation", body)
    print(C.result_line(f"attention_localisation_{name.replace('-', '_')}_best_view", f"{best:.2f}",
                        f">{TARGET} ({best_view})", best > TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
