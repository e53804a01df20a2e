"""Evaluation: VQA accuracy by normalised exact match, split by question type."""
from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces; the first line only (models ramble)."""
    text = (text.strip().splitlines() or [""])[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(prediction: str, answer: str) -> bool:
    p, a = normalize_answer(prediction), normalize_answer(answer)
    return p == a or p.split()[:1] == a.split()


def without_images(messages: list[dict], image_token: str = "<image>") -> list[dict]:
    """The conversation with its image placeholders removed: the text-only baseline sees only this."""
    return [{**m, "content": m["content"].replace(image_token + "\n", "").replace(image_token, "").strip()}
            for m in messages]


def evaluate_vqa(model, dataset, batch_size: int = 32, max_new_tokens: int = 6, limit: int | None = None,
                 text_only: bool = False) -> dict:
    """Accuracy overall and per `meta['question_type']`, with greedy answers from `model.generate`.

    `text_only` asks the same questions without the images (for a model trained text-only too): the
    floor that shows how much of the accuracy the image really buys.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    examples = []
    try:
        for start in range(0, n, batch_size):
            samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
            prompts = [[m for m in s.messages if m["role"] != "assistant"] for s in samples]
            images = [list(s.images) for s in samples]
            if text_only:
                prompts = [without_images(p, model.config.image_token) for p in prompts]
                images = [[] for _ in samples]
            answers = model.generate(prompts, images, max_new_tokens=max_new_tokens)
            for s, pred in zip(samples, answers):
                truth = s.meta.get("answer") or next(m["content"] for m in s.messages if m["role"] == "assistant")
                ok = answer_matches(pred, truth)
                for key in ("all", s.meta.get("question_type")):
                    if key:
                        total[key] += 1
                        correct[key] += ok
                if len(examples) < 8:
                    question = next(m["content"] for m in reversed(s.messages) if m["role"] == "user")
                    examples.append({"question": question,
                                     "answer": truth, "prediction": pred, "correct": ok})
    finally:
        model.train(was_training)
    result = {"accuracy": correct["all"] / max(1, total["all"]), "count": total["all"], "examples": examples,
              "text_only": text_only}
    result["by_type"] = {k: correct[k] / total[k] for k in sorted(total) if k != "all"}
    return result


def multiple_choice_accuracy(predictions: Sequence[str], choices: Sequence[Sequence[str]],
                             answers: Sequence[str]) -> float:
    """A prediction counts when the choice it names (by letter or text) is the answer."""
    correct = 0
    for pred, options, answer in zip(predictions, choices, answers):
        norm = normalize_answer(pred)
        picked = None
        for i, option in enumerate(options):
            letter = chr(ord("a") + i)
            if norm in (letter, f"{letter} {normalize_answer(option)}") or answer_matches(pred, option):
                picked = option
                break
        correct += picked is not None and normalize_answer(picked) == normalize_answer(answer)
    return correct / max(1, len(predictions))


def evaluate_captions(model, dataset, batch_size: int = 16, max_new_tokens: int = 24,
                      limit: int | None = None) -> dict:
    """BLEU-4 and CIDEr-D of generated captions against each sample's caption (or its answer turn)."""
    from .caption_metrics import bleu4, cider_d

    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    predictions, references = [], []
    try:
        for start in range(0, n, batch_size):
            samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
            prompts = [[m for m in s.messages if m["role"] != "assistant"] for s in samples]
            predictions += model.generate(prompts, [list(s.images) for s in samples], max_new_tokens=max_new_tokens)
            for s in samples:
                refs = s.meta.get("captions") or [s.meta.get("caption") or
                                                  next(m["content"] for m in s.messages if m["role"] == "assistant")]
                references.append(list(refs))
    finally:
        model.train(was_training)
    return {"bleu4": bleu4(predictions, references), "cider": cider_d(predictions, references), "count": n,
            "examples": [{"prediction": p, "references": r} for p, r in zip(predictions[:8], references[:8])]}
