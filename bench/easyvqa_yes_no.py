"""Do yes/no answers use the image? A trained model against easy-VQA's text prior, question by question.

easy-VQA's yes/no questions (74% of the test set) follow a text prior: a plain claim ("is there a red shape?")
is usually false ("no"), a negated one ("is there not a red shape?") usually true ("yes"). A model that answers
from the question alone scores ~83% on them. This benchmark trains `examples/configs/fast_easyvqa.yaml` for a
few minutes (or reads a saved model), answers the yes/no test questions, and splits its accuracy into the
questions where the prior is right and where it is wrong. Only the second column shows seeing: the target is
better than chance (> 50%) where the prior is wrong.

Run: .venv/bin/python bench/easyvqa_yes_no.py [--quick] [--minutes 5] [--model SAVED_MODEL_DIR [--about TEXT]]
     [--limit 1200]
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _runs as R  # noqa: E402

CONFIG = "examples/configs/fast_easyvqa.yaml"
TARGET = 0.5
NEGATION = re.compile(r"\b(not|no)\b")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def prior_answer(question: str) -> str:
    """What the question alone suggests: negated claims are usually true, plain ones usually false."""
    return "yes" if NEGATION.search(question.lower()) else "no"


def analyse(model_dir: Path, limit: int) -> dict:
    """Accuracy on the yes/no test questions, split by whether the text prior gets each one right."""
    import torch

    from workbench.data.easyvqa import load_easy_vqa
    from workbench.evaluation import answer_matches
    from workbench.llm import autocast
    from workbench.model import VisionLanguageModel

    data = load_easy_vqa("test")
    samples = [s for s in (data[i] for i in range(len(data))) if s.meta["question_type"] == "yes/no"]
    samples = samples[:limit] if limit else samples
    model = VisionLanguageModel.from_pretrained(model_dir)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    t0 = time.time()
    with torch.inference_mode(), autocast(model.device, "auto"):
        for start in range(0, len(samples), 64):
            batch = samples[start:start + 64]
            prompts = [[m for m in s.messages if m["role"] != "assistant"] for s in batch]
            answers = model.generate(prompts, [list(s.images) for s in batch], max_new_tokens=3)
            for s, answer in zip(batch, answers):
                question, truth = s.meta["question"], s.meta["answer"]
                ok = int(answer_matches(answer, truth))
                prior_right = prior_answer(question) == truth
                about = "colour" if any(c in question.lower() for c in COLOURS) else "shape"
                negated = "negated" if NEGATION.search(question.lower()) else "plain"
                for key in ("all", "prior right" if prior_right else "prior wrong", f"{negated} {about} claim"):
                    counts[key][0] += ok
                    counts[key][1] += 1
                counts["text prior itself"][0] += int(prior_right)
                counts["text prior itself"][1] += 1
    return {"rows": {k: {"accuracy": c[0] / c[1], "count": c[1]} for k, c in counts.items()},
            "eval_s": time.time() - t0, "questions": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1-minute training, 300 questions")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget when no --model is given")
    parser.add_argument("--model", help="analyse this saved model instead of training one")
    parser.add_argument("--about", help="how --model was trained, for bench/RESULTS.md (instead of its path)")
    parser.add_argument("--limit", type=int, default=1200, help="yes/no test questions (0: all 7,136)")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.limit = 1.0, 300
    C.setup_environment()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, trained = Path(args.model), args.about or f"saved model `{args.model}`"
        else:
            config = R.with_budget(R.read_yaml(C.REPO / CONFIG), args.minutes)
            run = R.train(config, Path(tmp), R.fresh_home(Path(tmp)), "yes-no")
            model_dir, trained = Path(run["run_dir"]) / "model", f"`{CONFIG}` trained {args.minutes:g} min"
        result = analyse(model_dir, args.limit)
    rows = result["rows"]
    order = ["all", "text prior itself", "prior right", "prior wrong"] + sorted(
        k for k in rows if k.endswith("claim"))
    table = [[k, f"{100 * rows[k]['accuracy']:.1f}", str(rows[k]["count"])] for k in order if k in rows]
    headers = ["yes/no questions", "accuracy %", "questions"]
    print(C.text_table(headers, table))
    wrong = rows.get("prior wrong", {"accuracy": 0.0})["accuracy"]
    if not args.quick:
        C.write_results_section("easyvqa_yes_no", "\n".join([
            "## easyvqa_yes_no — do yes/no answers use the image, or the text prior?",
            "",
            f"{trained}; its answers to {result['questions']} easy-VQA yes/no test questions, split by whether the "
            "text prior (plain claim → no, negated claim → yes) is right. Seeing shows only where the prior is wrong.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/easyvqa_yes_no.py{' --model …' if args.model else ''}`",
            "",
            C.markdown_table(headers, table),
        ]))
    print(C.result_line("easyvqa_yes_no_where_prior_wrong", f"{wrong:.3f}", f">{TARGET}", wrong > TARGET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
