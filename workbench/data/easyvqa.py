"""easy-VQA, the embedded offline VQA set: 64×64 shape images, 13 one-word answers.

Read straight from its questions.json files: the `easy_vqa` package is never imported (its wheel
installs a top-level `test` package that shadows the standard library's). The data is embedded and
trusted, so images are not opened at load time and 38k rows load in a fraction of a second.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..assets import asset_path
from ..errors import ConfigError
from .loaders import DATASETS
from .samples import MALFORMED, BadRow, Sample, SampleDataset, build_dataset

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")
EASY_VQA_ANSWERS = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle",
                    "brown", "blue", "no")
"""The 13 answers in answers.txt order (a test checks them against the file)."""
SPLITS = ("train", "test")


def question_type(answer: str) -> str:
    """'yes/no', 'color' or 'shape', from the answer (easy-VQA's questions are typed by what they ask)."""
    a = answer.strip().lower()
    if a in YES_NO:
        return "yes/no"
    if a in COLORS:
        return "color"
    if a in SHAPES:
        return "shape"
    return "other"


def _split_dir(split: str, root: str | Path | None) -> Path:
    if split not in SPLITS:
        raise ConfigError(f"easy-VQA split must be one of {', '.join(SPLITS)}, got {split!r}")
    base = Path(root) if root is not None else asset_path("easy-vqa")
    folder = base if (base / "questions.json").is_file() else base / split
    if not (folder / "questions.json").is_file():
        raise ConfigError(f"No easy-VQA questions.json under {base} (expected {base / split / 'questions.json'})")
    return folder


@DATASETS.register("easy-vqa", offline=True, embedded=True,
                   description="easy-VQA: 64×64 shapes, yes/no, colour and shape questions (embedded)")
def load_easy_vqa(split: str = "train", limit: int | None = None, seed: int = 0,
                  root: str | Path | None = None) -> SampleDataset:
    """easy-VQA questions as single-turn samples: "<image>\\n{question}" → "{answer}"."""
    folder = _split_dir(split, root)
    rows = json.loads((folder / "questions.json").read_text())
    images = str(folder / "images")

    def to_sample(item: tuple[int, list]) -> Sample:
        index, row = item
        if not (isinstance(row, list) and len(row) == 3):
            raise BadRow(MALFORMED, "expected [question, answer, image_id]")
        question, answer, image_id = row
        return Sample(
            [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
            [f"{images}/{image_id}.png"],
            {"id": f"{split}-{index}", "row": index, "image_id": image_id, "question": question, "answer": answer,
             "question_type": question_type(answer), "source": "easy-vqa"},
        )

    dataset = build_dataset(f"easy-vqa/{split}", ((f"{split}-{i}", (i, r)) for i, r in enumerate(rows)),
                            to_sample, on_error="skip", trusted=True)
    return dataset.subset(limit, seed) if limit is not None else dataset
