"""Captions derived from a question-answering dataset's own rows, for an alignment stage when no caption data
describes what the task is about (two-stage tuning on a VQA set with nothing else at hand).

Each image's question–answer pairs become descriptions of it, in the task's own words: "what color is the shape?
red. is there a circle? yes." Stage 1 then aligns the integrator, with the LLM frozen, to what the task asks of
the image, instead of to unrelated captions (emoji names say nothing about colour or position). Nothing here
knows a dataset's templates: any kind whose samples are single-image question → answer turns works.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from ..errors import ConfigError
from .balance import question_and_answer
from .captions import CAPTION_PROMPTS
from .loaders import DATASETS, load_dataset_spec
from .samples import IMAGE_TOKEN, DataReport, Sample, SampleDataset, vqa_sample

KIND = "task-captions"


@DATASETS.register(KIND, offline=True, embedded=False,
                   description="Captions made of a VQA dataset's own question-answer pairs per image (for stage 1)")
def load_task_captions(source: dict[str, Any] | None = None, pairs_per_caption: int = 4, limit: int | None = None,
                       seed: int = 0, prompts: Sequence[str] | None = None) -> SampleDataset:
    """One caption sample per image and every `pairs_per_caption` of its question–answer pairs (shuffled, so
    each image's pairs are all used): user "<image>\\n{caption instruction}" → assistant "q? a. q? a.".

    `source` names the question–answer data as a run's `data` does: {"kind": ..., "options": {...}} (offline
    when its kind is). Multi-image or multi-turn samples are skipped and counted in the report."""
    if not isinstance(source, dict) or not isinstance(source.get("kind"), str):
        raise ConfigError(f"{KIND} needs source, the question-answer data to derive captions from, named as a run's "
                          'data is: e.g. {"kind": "easy-vqa", "options": {"split": "train"}}')
    if source["kind"] == KIND:
        raise ConfigError(f"{KIND} cannot derive captions from {KIND}")
    if pairs_per_caption < 1:
        raise ConfigError(f"pairs_per_caption must be at least 1, not {pairs_per_caption}")
    prompts = list(CAPTION_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ConfigError("prompts must be a non-empty list of caption instructions")
    options = source.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{KIND}: source options must be a mapping, not {type(options).__name__}")
    qa = load_dataset_spec(source["kind"], **options)

    by_image: dict[str, list[tuple[str, str]]] = {}
    image_of: dict[str, Any] = {}
    report = DataReport(f"{KIND} from {qa.report.name}")
    for sample in qa:
        report.total += 1
        pair = _question_answer(sample)
        if pair is None:
            report.add_skip("not one image, one question, one answer", sample.meta.get("id", report.total))
            continue
        key = str(sample.images[0]) if not hasattr(sample.images[0], "tobytes") else f"pil-{id(sample.images[0])}"
        image_of.setdefault(key, sample.images[0])
        by_image.setdefault(key, []).append(pair)
    rng = random.Random(seed)
    samples = []
    for key, pairs in by_image.items():
        rng.shuffle(pairs)
        for start in range(0, len(pairs), pairs_per_caption):
            caption = " ".join(f"{q} {a}." for q, a in pairs[start:start + pairs_per_caption])
            samples.append(vqa_sample(rng.choice(prompts), caption, [image_of[key]],
                                      {"id": f"{key}#{start // pairs_per_caption}", "caption": caption,
                                       "answer": caption, "source": KIND}))
    if not samples:
        raise ConfigError(f"{KIND}: {qa.report.name} has no single-image question-answer samples to describe")
    report.kept = report.total - report.num_skipped  # question-answer rows described
    report.used = len(samples)  # the captions made of them
    dataset = SampleDataset(samples, report)
    return dataset.subset(limit, seed) if limit is not None else dataset


def _question_answer(sample: Sample) -> tuple[str, str] | None:
    """(question without its placeholder, ending in '?' or '.'), answer) of a one-image, one-turn sample."""
    turns = [m for m in sample.messages if m.get("role") != "system"]
    if len(sample.images) != 1 or len(turns) != 2 or [m["role"] for m in turns] != ["user", "assistant"]:
        return None
    question, answer = question_and_answer(turns, IMAGE_TOKEN)
    question, answer = question.strip(), answer.strip().rstrip(".")
    if not question or not answer:
        return None
    return (question if question[-1] in "?.!" else question + "?"), answer
