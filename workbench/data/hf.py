"""Datasets from the Hugging Face hub or saved with `Dataset.save_to_disk`, via the optional `datasets` library.

The library is imported only here, when asked for, so the workbench runs without it. Hub names go
through the same offline check as models: no route to the hub → one clear OfflineError, not minutes
of retries. Rows become VQA samples (question + answer columns), captioning samples (a caption
column) or conversations (a LLaVA-style `conversations` / `messages` column); images stay in memory.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, OfflineError
from ..hub import is_offline, offline_message
from .captions import CAPTION_PROMPTS
from .prompting import normalize_messages
from .loaders import DATASETS
from .samples import (MALFORMED, MISSING_IMAGE, UNREADABLE_IMAGE, BadRow, Sample, SampleDataset, build_dataset,
                      vqa_sample)

_CONVERSATION_COLUMNS = ("conversations", "messages")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("Loading hub or saved datasets needs the datasets library: pip install datasets") from None
    return datasets


def _open(datasets, name_or_path: str, split: str):
    path = Path(name_or_path)
    if path.exists():
        saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
        obj = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    else:
        if is_offline():
            raise OfflineError(offline_message(name_or_path, "Dataset"))
        obj = datasets.load_dataset(name_or_path, split=split)
    if isinstance(obj, dict):  # a DatasetDict: pick the split
        if split not in obj:
            raise ConfigError(f"Dataset {name_or_path} has no split {split!r}; splits: {', '.join(obj)}")
        obj = obj[split]
    return obj


def _image(value: Any) -> Any:
    """A PIL image (decoded column), {"bytes", "path"} (undecoded) or a path, as something a Sample holds."""
    if value is None:
        raise BadRow(MISSING_IMAGE, "empty image cell")
    if isinstance(value, dict):
        if value.get("bytes"):
            from PIL import Image

            try:
                return Image.open(io.BytesIO(value["bytes"]))
            except Exception as e:
                raise BadRow(UNREADABLE_IMAGE, type(e).__name__) from None
        value = value.get("path")
        if not value:
            raise BadRow(MISSING_IMAGE, "image cell has neither bytes nor path")
    return value


@DATASETS.register("hf", offline=False, embedded=False,
                   description="A Hugging Face hub dataset or a save_to_disk folder (needs `datasets`)")
def load_hf_dataset(name_or_path: str, split: str = "train", image_column: str | None = "image",
                    question_column: str | None = None, answer_column: str | None = None,
                    caption_column: str | None = None, limit: int | None = None, on_error: str = "skip",
                    seed: int = 0, prompts: Sequence[str] | None = None) -> SampleDataset:
    """A hub dataset name or a `save_to_disk` folder as Samples (a seeded random `limit` rows if given)."""
    datasets = _import_datasets()
    table = _open(datasets, str(name_or_path), split)
    columns = list(table.column_names)
    conversation = next((c for c in _CONVERSATION_COLUMNS if c in columns), None)
    if caption_column:
        mode = "caption"
    elif question_column and answer_column:
        mode = "vqa"
    elif conversation and not (question_column or answer_column):
        mode = "conversation"
    else:
        raise ConfigError(
            f"Say which columns to use: caption_column, or question_column and answer_column "
            f"(or give the data a conversations column). Columns in {name_or_path}: {', '.join(columns)}")
    wanted = [c for c in (image_column, question_column, answer_column, caption_column) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ConfigError(f"Dataset {name_or_path} has no column {', '.join(missing)}; columns: {', '.join(columns)}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be ≥ 0, got {limit}")
    if limit is not None and limit < len(table):
        table = table.select(sorted(random.Random(seed).sample(range(len(table)), limit)))
    prompts = list(CAPTION_PROMPTS if prompts is None else prompts)
    rng = random.Random(seed)

    def to_sample(item: tuple[int, dict]) -> Sample:
        index, row = item
        prompt = rng.choice(prompts)
        cell = row.get(image_column) if image_column else None
        cells = [] if not image_column else cell if isinstance(cell, list) else [cell]
        images = [_image(c) for c in cells]
        meta = {"id": row.get("id", index), "row": index, "source": str(name_or_path)}
        if mode == "conversation":
            try:
                messages = normalize_messages(row[conversation])
            except (ConfigError, TypeError) as e:
                raise BadRow(MALFORMED, str(e)) from None
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            return Sample(messages, images, {**meta, **({"answer": answers[-1]} if answers else {})})
        if mode == "caption":
            question, answer = prompt, row.get(caption_column)
        else:
            question, answer = row.get(question_column), row.get(answer_column)
        if not isinstance(question, str) or not isinstance(answer, (str, int, float, type(None))):
            raise BadRow(MALFORMED, "question and answer must be text")
        answer = "" if answer is None else str(answer).strip()
        extra = {"caption": answer} if mode == "caption" else {"question": question}
        return vqa_sample(question, answer, images, {**meta, **extra, "answer": answer})

    rows = ((str(i), (i, row)) for i, row in enumerate(table))
    return build_dataset(f"hf {name_or_path}/{split}", rows, to_sample, on_error=on_error)
