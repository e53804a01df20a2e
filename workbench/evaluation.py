"""One evaluation entry point: `evaluate(model or saved folder, data)` asks the data's questions and scores the answers
with the task's own metric, so the command line, the app, the notebooks, the trainer's best-model choice and the
benchmarks all measure the same way and cannot drift apart.

Tasks, picked from the samples' `meta` unless named:
- `vqa` (short answers): normalised exact match, or a first word that is the whole answer; overall and per
  `meta['question_type']`. Headline: accuracy.
- `captions` (samples with `meta['caption']` or `meta['captions']`): corpus BLEU-4 and CIDEr-D against those
  references (see caption_metrics). Headline: CIDEr-D, the metric captioning work selects models by; whether a
  caption's first word matches says nothing about the caption.
- `multiple_choice` (samples with `meta['choices']`): the option a prediction names, by letter or by text, against
  `meta['answer']` (the option's text or letter). Headline: accuracy.
"""
from __future__ import annotations

import contextlib
import os
import re
import string
import time
from collections import Counter, defaultdict
from typing import Any, Sequence

from .errors import ConfigError

HEADLINE = {"vqa": "accuracy", "captions": "cider", "multiple_choice": "accuracy"}
"""Each task and the one number that selects models for it (`result['score']`)."""
ANSWER_TOKENS = {"vqa": 6, "captions": 24, "multiple_choice": 8}
"""Default new tokens per task: short answers stop early; captions need a sentence."""
EXAMPLES = 8

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces; the first line only (models ramble)."""
    text = (text.strip().splitlines() or [""])[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(prediction: str, answer: str) -> bool:
    p, a = normalize_answer(prediction), normalize_answer(answer)
    return p == a or p.split()[:1] == a.split()


def chosen_option(prediction: str, options: Sequence[str]) -> int | None:
    """The option a prediction names: by its text first (so "a circle" is the circle, not option A), else by its
    letter ("B", "(b) …", "B. …"); None when it names none."""
    for i, option in enumerate(options):
        if answer_matches(prediction, option):
            return i
    words = prediction.strip().lower().translate(_PUNCT).split()
    letter = ord(words[0]) - ord("a") if words and len(words[0]) == 1 else -1
    return letter if 0 <= letter < len(options) else None


def choice_matches(prediction: str, options: Sequence[str], answer: str) -> bool:
    """Whether the option the prediction names is the answer (given as the option's text or its letter)."""
    picked = chosen_option(prediction, options)
    if picked is None:
        return False
    key = answer.strip().lower().strip("().")
    if len(key) == 1 and 0 <= ord(key) - ord("a") < len(options):
        return picked == ord(key) - ord("a")
    return normalize_answer(options[picked]) == normalize_answer(answer)


def without_images(messages: list[dict], image_token: str = "<image>") -> list[dict]:
    """The conversation with its image placeholders removed: the text-only baseline sees only this."""
    return [{**m, "content": m["content"].replace(image_token + "\n", "").replace(image_token, "").strip()}
            for m in messages]


def sample_task(sample) -> str:
    meta = sample.meta or {}
    if meta.get("choices"):
        return "multiple_choice"
    return "captions" if meta.get("caption") or meta.get("captions") else "vqa"


def infer_task(samples) -> str:
    """The task of most samples: a mixed set (questions with a few caption rows) is judged as its majority."""
    counts = Counter(sample_task(s) for s in samples)
    return counts.most_common(1)[0][0] if counts else "vqa"


def evaluate(model_or_dir, data, task: str | None = None, *, limit: int | None = None, text_only: bool = False,
             batch_size: int = 32, max_new_tokens: int | None = None, options: dict | None = None,
             precision: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Greedy answers to `data`'s last assistant turns, scored with the task's metric.

    `model_or_dir`: a VisionLanguageModel, or a saved model folder (loaded onto `device`). `data`: a dataset of
    Samples, a DataSpec, or a loader kind with its `options`. `task`: vqa, captions or multiple_choice (None:
    picked from the samples). `limit`: a seeded random `limit` samples, the same every time. `text_only` asks
    without the images: the floor that shows how much the image buys. `precision` (auto, fp32, bf16, fp16)
    evaluates under that autocast; None keeps the caller's (the trainer evaluates in its own).

    Returns a dict: `task`, `metric` and `score` (the headline: what best-model selection and early stopping
    compare), the task's metrics (`accuracy`, or `bleu4` and `cider`), `by_type` (the headline per
    `meta['question_type']`), `count`, `examples`, `text_only`, and efficiency: `seconds`, `samples_per_s`,
    `total_params`, `trainable_params`, `trainable_pct`, `visual_tokens`, `device`.
    """
    model = _model(model_or_dir, device)
    dataset = _dataset(data, options)
    if limit is not None and hasattr(dataset, "subset"):
        dataset = dataset.subset(limit, seed=0)
    samples = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    task = task or infer_task(samples)
    if task not in HEADLINE:
        raise ConfigError(f"Unknown evaluation task {task!r}; tasks: {', '.join(HEADLINE)}")
    started = time.perf_counter()
    predictions = _answers(model, samples, text_only, batch_size, max_new_tokens or ANSWER_TOKENS[task], precision)
    seconds = time.perf_counter() - started
    result = {"task": task, "metric": HEADLINE[task], **_SCORERS[task](samples, predictions)}
    total = next(r for r in model.parameter_report() if r["component"] == "total")
    result.update(score=result[HEADLINE[task]], count=len(samples), text_only=text_only, seconds=seconds,
                  samples_per_s=len(samples) / max(seconds, 1e-9), total_params=total["total"],
                  trainable_params=total["trainable"], trainable_pct=total["trainable_pct"],
                  visual_tokens=0 if text_only else model.num_visual_tokens, device=str(model.device))
    return result


def _model(model_or_dir, device):
    if not isinstance(model_or_dir, (str, os.PathLike)):
        return model_or_dir
    from .model import VisionLanguageModel

    return VisionLanguageModel.from_pretrained(model_or_dir, device=device)


def _dataset(data, options):
    from .config import DataSpec

    if isinstance(data, str):
        data = DataSpec(kind=data, options=dict(options or {}))
    if isinstance(data, DataSpec):
        from .data.loaders import load_dataset_spec

        return load_dataset_spec(data.kind, **data.options)
    return data


def _prompt(sample) -> list[dict]:
    """The conversation up to its last assistant turn: the turn the model is asked to give."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    return sample.messages[:last]


def _truth(sample) -> str:
    return sample.meta.get("answer") or next(m["content"] for m in reversed(sample.messages)
                                             if m["role"] == "assistant")


def _answers(model, samples, text_only, batch_size, max_new_tokens, precision) -> list[str]:
    from .llm import autocast

    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with autocast(model.device, precision) if precision else contextlib.nullcontext():
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size]
                prompts = [_prompt(s) for s in batch]
                images = [list(s.images) for s in batch]
                if text_only:
                    prompts = [without_images(p, model.config.image_token) for p in prompts]
                    images = [[] for _ in batch]
                answers += model.generate(prompts, images, max_new_tokens=max_new_tokens)
    finally:
        model.train(was_training)
    return answers


def _by_type(samples, values) -> dict[str, float]:
    groups = defaultdict(list)
    for s, v in zip(samples, values):
        if s.meta.get("question_type"):
            groups[s.meta["question_type"]].append(float(v))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _accuracy(samples, predictions, hits) -> dict:
    examples = [{"question": _prompt(s)[-1]["content"], "answer": _truth(s), "prediction": p, "correct": ok}
                for s, p, ok in list(zip(samples, predictions, hits))[:EXAMPLES]]
    return {"accuracy": sum(hits) / max(1, len(hits)), "by_type": _by_type(samples, hits), "examples": examples}


def _score_vqa(samples, predictions) -> dict:
    return _accuracy(samples, predictions, [answer_matches(p, _truth(s)) for s, p in zip(samples, predictions)])


def _score_choices(samples, predictions) -> dict:
    return _accuracy(samples, predictions, [choice_matches(p, s.meta.get("choices") or [], _truth(s))
                                            for s, p in zip(samples, predictions)])


def _score_captions(samples, predictions) -> dict:
    from .caption_metrics import bleu4, cider_d_scores

    references = [list(s.meta.get("captions") or [s.meta.get("caption") or _truth(s)]) for s in samples]
    per_sample = cider_d_scores(predictions, references)
    examples = [{"question": _prompt(s)[-1]["content"], "references": r, "prediction": p}
                for s, r, p in list(zip(samples, references, predictions))[:EXAMPLES]]
    return {"bleu4": bleu4(predictions, references), "cider": sum(per_sample) / max(1, len(per_sample)),
            "by_type": _by_type(samples, per_sample), "examples": examples}


_SCORERS = {"vqa": _score_vqa, "captions": _score_captions, "multiple_choice": _score_choices}
