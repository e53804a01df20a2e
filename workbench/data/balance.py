"""Answer balancing: sampling weights that take away what the question alone gives away.

VQA sets are biased: in easy-VQA a plain claim ("is there a red shape?") is false 88% of the time, so a model
that reads only the question scores 83% on yes/no and has little reason to look. Sampling every answer equally
often *within a question template* removes that shortcut during training (as VQA v2 balanced its pairs): the
text prior then scores 50%, and the loss can only fall by using the image.

A question's template is its text with the dataset's short answers masked: "is there a red shape?" and "is
there a blue shape?" share "is there a _ shape?". Weights are (count of template and answer) ** -strength:
0 leaves the data as it is, 1 balances answers fully within each template; in between tempers the bias.
Free-form answers (captions, long replies) form groups of one and are left alone.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import torch

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
MAX_ANSWER_WORDS = 3
"""Answers up to this many words count as the dataset's answer vocabulary (masked in templates)."""


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def question_and_answer(messages: Sequence[dict], image_token: str = "<image>") -> tuple[str, str] | None:
    """The last user question before the last assistant answer; None when the conversation has no answer."""
    answer_at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)
    if answer_at is None:
        return None
    question = next((messages[i]["content"] for i in range(answer_at - 1, -1, -1) if messages[i]["role"] == "user"),
                    "")
    return question.replace(image_token, " "), messages[answer_at]["content"]


def answer_groups(samples: Sequence, image_token: str = "<image>") -> list[tuple[str, str] | None]:
    """(template, answer) per sample: the question with short-answer words masked, and its normalised answer."""
    pairs = [question_and_answer(s.messages, image_token) for s in samples]
    answers = [" ".join(_words(p[1])) if p else "" for p in pairs]
    vocabulary = {w for a in answers if 0 < len(a.split()) <= MAX_ANSWER_WORDS for w in a.split()}
    groups: list[tuple[str, str] | None] = []
    for pair, answer in zip(pairs, answers):
        if pair is None or not answer or len(answer.split()) > MAX_ANSWER_WORDS:
            groups.append(None)
            continue
        template = " ".join("_" if w in vocabulary else w for w in _words(pair[0]))
        groups.append((template, answer))
    return groups


def balance_weights(samples: Sequence, strength: float = 1.0, image_token: str = "<image>") -> torch.Tensor:
    """One sampling weight per sample (mean 1): rarer answers within a template are drawn more often."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"balance strength must be between 0 and 1, got {strength}")
    groups = answer_groups(samples, image_token)
    counts = Counter(g for g in groups if g is not None)
    weights = torch.tensor([1.0 if g is None else counts[g] ** -strength for g in groups], dtype=torch.float64)
    return weights * (len(weights) / weights.sum()) if len(weights) else weights


def balance_report(samples: Sequence, weights: torch.Tensor, image_token: str = "<image>") -> dict:
    """How much the text alone can tell before and after weighting: the accuracy of always answering a
    template's most frequent answer (the text prior), over all samples with a short answer."""
    groups = answer_groups(samples, image_token)
    before: dict[str, Counter] = {}
    after: dict[str, Counter] = {}
    for g, w in zip(groups, weights.tolist()):
        if g is None:
            continue
        before.setdefault(g[0], Counter())[g[1]] += 1
        after.setdefault(g[0], Counter())[g[1]] += w

    def prior(table: dict[str, Counter]) -> float:
        total = sum(sum(c.values()) for c in table.values())
        return sum(max(c.values()) for c in table.values()) / total if total else float("nan")

    return {"templates": len(before), "text_prior_before": prior(before), "text_prior_after": prior(after)}
