"""Image + caption pairs (captions.csv or captions.jsonl) as captioning conversations.

The simplest data people have is pictures with a sentence each. Each pair becomes user
"<image>\\n{instruction}" → assistant caption, the instruction drawn (seeded) from a few phrasings so
the model learns to caption rather than to answer one fixed string.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import ConfigError
from .loaders import DATASETS
from .samples import MALFORMED, BadRow, Sample, SampleDataset, build_dataset, image_path_inside, vqa_sample

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What does the image show?",
    "Give a one-line description of the picture.",
)
CAPTION_FILES = ("captions.csv", "captions.jsonl")


def _find_file(folder_or_file: str | Path) -> Path:
    path = Path(folder_or_file)
    if path.is_dir():
        for name in CAPTION_FILES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"No {' or '.join(CAPTION_FILES)} in {path}")
    if not path.is_file():
        raise ConfigError(f"Caption file or folder not found: {path}")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"Captions must be a .csv (columns image,caption) or .jsonl file, got {path.name}")
    return path


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(f"{path} needs columns image,caption; missing {', '.join(sorted(missing))}")
            for i, row in enumerate(reader):
                yield str(i), row
        return
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                yield str(i), json.loads(line)
            except json.JSONDecodeError:
                yield str(i), None


@DATASETS.register("captions", offline=True, embedded=False,
                   description="Your own images with captions.csv or captions.jsonl")
def load_captions(folder_or_file: str | Path, on_error: str = "skip", prompts: Sequence[str] | None = None,
                  seed: int = 0, allow_absolute_paths: bool = False) -> SampleDataset:
    """Caption pairs from a folder holding captions.csv/.jsonl or from the file; images relative to it and
    inside its folder unless `allow_absolute_paths` is set."""
    path = _find_file(folder_or_file)
    prompts = list(CAPTION_PROMPTS if prompts is None else prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of caption instructions")
    rng = random.Random(seed)

    def to_sample(item: tuple[str, Any]) -> Sample:
        row_id, row = item
        prompt = rng.choice(prompts)  # drawn for every row, so one bad row does not shift the others
        if not isinstance(row, dict):
            raise BadRow(MALFORMED, "expected an object with image and caption")
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip() or not isinstance(caption, (str, type(None))):
            raise BadRow(MALFORMED, "image must be a path and caption text")
        caption = (caption or "").strip()
        return vqa_sample(prompt, caption, [image_path_inside(path.parent, image.strip(), allow_absolute_paths)],
                          {"id": row.get("id", row_id), "row": int(row_id), "caption": caption, "answer": caption,
                           "prompt": prompt, "source": str(path)})

    rows = ((row_id, (row_id, row)) for row_id, row in _read_rows(path))
    return build_dataset(f"captions {path.name}", rows, to_sample, on_error=on_error)
