"""A folder of images with a CSV of questions (or captions) → LLaVA-format data.

What people usually have is not LLaVA JSON but a folder of pictures and a spreadsheet. Each CSV row is one
single-turn conversation about one image:

    image,question,answer[,question_type][,split][,id]
    images/corn.png,What crop is this?,corn,name,train
    images/corn.png,,An ear of yellow corn.,caption,train     ← no question: a captioning row

`image` is relative to the CSV's folder. A row without a question becomes a caption request
("Describe the image briefly.") answered by `answer`. `question_type` and `split` (any other columns too)
are kept in each sample's meta, so `evaluation.evaluate` reports accuracy per question type. Bad rows (missing or
unreadable image, empty answer, a malformed row) are skipped and counted, as every loader does;
`table_to_llava` then writes only the good rows, with the report saying what was dropped.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .llava import save_llava_json
from .loaders import DATASETS
from .samples import (EMPTY_ANSWER, MALFORMED, BadRow, DataReport, Sample, SampleDataset, build_dataset,
                      image_path_inside, vqa_sample)

CAPTION_PROMPT = "Describe the image briefly."
REQUIRED = ("image", "answer")


@DATASETS.register("image-table", offline=True, embedded=False,
                   description="Your own images with a CSV of image,question,answer rows")
def load_image_table(csv_path: str | Path, split: str | None = None, on_error: str = "skip",
                     caption_prompt: str = CAPTION_PROMPT, allow_absolute_paths: bool = False) -> SampleDataset:
    """Samples from an image,question,answer CSV (images relative to it, inside its folder unless
    `allow_absolute_paths` is set); only rows of `split` when given."""
    path = Path(csv_path)
    if not path.is_file():
        raise ConfigError(f"CSV file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ConfigError(f"{path} needs columns image,answer (and question for VQA rows); "
                              f"missing {', '.join(missing)}. Columns found: {', '.join(columns) or 'none'}")
        if split is not None and "split" not in columns:
            raise ConfigError(f"{path} has no split column, so split={split!r} cannot be picked")
        raw = list(enumerate(reader, start=2))  # line numbers as a spreadsheet shows them (header = line 1)

    def to_sample(item: tuple[int, dict[str, Any]]) -> Sample:
        line, row = item
        if None in row or any(v is None for v in row.values()):
            raise BadRow(MALFORMED, f"line {line} has a different number of fields than the header")
        image = (row.get("image") or "").strip()
        if not image:
            raise BadRow(MALFORMED, f"line {line} has no image")
        answer = (row.get("answer") or "").strip()
        if not answer:
            raise BadRow(EMPTY_ANSWER, f"line {line}")
        question = (row.get("question") or "").strip() or caption_prompt
        meta = {k: v.strip() for k, v in row.items() if k not in ("image", "question", "answer") and v and v.strip()}
        meta.setdefault("id", f"line{line}")
        meta.update({"row": line, "answer": answer, "source": str(path)})
        return vqa_sample(question, answer, [image_path_inside(path.parent, image, allow_absolute_paths)], meta)

    rows = ((f"line {line}", (line, row)) for line, row in raw
            if split is None or (row.get("split") or "").strip() == split)
    return build_dataset(f"table {path.name}" + (f" [{split}]" if split else ""), rows, to_sample, on_error=on_error)


def table_to_llava(csv_path: str | Path, json_path: str | Path, split: str | None = None,
                   image_folder: str | Path | None = None) -> tuple[Path, DataReport]:
    """Convert a CSV (see the module docstring) to LLaVA JSON that `load_llava_json` reads with no bad rows.

    Bad rows are dropped and counted in the returned report. Images inside the JSON's folder are referenced
    where they are; others are copied next to it (see `save_llava_json`), so the output folder stands alone.
    """
    data = load_image_table(csv_path, split=split)
    out = save_llava_json(data, json_path, image_folder=image_folder)
    return out, data.report
