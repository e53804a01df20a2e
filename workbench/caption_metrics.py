"""Caption metrics written out in full (no Java or network-fetched tokenizers): corpus BLEU-4 and CIDEr-D.

BLEU-4 follows Papineni et al. (2002): clipped n-gram precisions over the whole corpus, geometric mean,
brevity penalty against the closest reference length. CIDEr-D follows Vedantam et al. (2015): TF-IDF
n-gram vectors (n = 1…4, document frequencies from the references), clipped counts, a Gaussian length
penalty (sigma 6) and a ×10 scale, averaged over n.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]; each prediction has one or more references."""
    matched, total = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        p = tokenize(pred)
        rs = [tokenize(r) for r in refs]
        pred_len += len(p)
        ref_len += min((abs(len(r) - len(p)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, 5):
            counts = _ngrams(p, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(0, len(p) - n + 1)
    if min(matched) == 0 or pred_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (0 … ~10): the mean of `cider_d_scores`."""
    scores = cider_d_scores(predictions, references, sigma)
    return sum(scores) / len(scores) if scores else 0.0


def cider_d_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> list[float]:
    """CIDEr-D of each prediction; document frequencies come from all the references, so a score depends on the
    whole set (an n-gram every image's references share weighs nothing)."""
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    num_docs = len(refs_tok)
    if num_docs == 0:
        return []
    df = [Counter() for _ in range(4)]
    for refs in refs_tok:
        for n in range(4):
            seen = set()
            for r in refs:
                seen |= set(_ngrams(r, n + 1))
            df[n].update(seen)
    log_docs = math.log(float(num_docs))

    def vector(tokens: list[str], n: int) -> tuple[dict, float]:
        counts = _ngrams(tokens, n + 1)
        vec = {g: c * (log_docs - math.log(max(1.0, df[n][g]))) for g, c in counts.items()}
        return vec, math.sqrt(sum(v * v for v in vec.values()))

    scores = []
    for pred, refs in zip(predictions, refs_tok):
        p = tokenize(pred)
        per_n = []
        for n in range(4):
            pv, pnorm = vector(p, n)
            total = 0.0
            for r in refs:
                rv, rnorm = vector(r, n)
                dot = sum(min(pv[g], rv[g]) * rv[g] for g in pv if g in rv)  # CIDEr-D clips to the reference
                if pnorm and rnorm:
                    total += dot / (pnorm * rnorm) * math.exp(-((len(p) - len(r)) ** 2) / (2 * sigma ** 2))
            per_n.append(total / max(1, len(refs)))
        scores.append(10.0 * sum(per_n) / 4)
    return scores
