"""Samples, load reports and the bad-row policy that every dataset loader shares.

Real data has bad rows (missing files, corrupt images, a question without its `<image>`). A loader
turns each raw row into a `Sample`, `check_sample` names what is wrong with it, and `build_dataset`
either stops at the first bad row (on_error="raise") or skips it and counts the reason in a
`DataReport`, so a run says up front how much data it really trains on and why the rest was dropped.
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..images import MAX_IMAGE_PIXELS
from .prompting import with_image_placeholders

IMAGE_TOKEN = "<image>"
ON_ERROR = ("skip", "raise")
MAX_EXAMPLES = 3

# Skip reasons (a loader may add its own, e.g. "no name").
MALFORMED = "malformed row"
NO_ANSWER = "no answer"
EMPTY_ANSWER = "empty answer"
PLACEHOLDER_MISMATCH = "placeholder mismatch"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
OUTSIDE_FOLDER = "outside the dataset folder"


@dataclass
class Sample:
    """One training conversation: role/content messages with one `<image>` per entry of `images`."""

    messages: list[dict[str, str]]
    images: list = field(default_factory=list)
    """Paths or PIL images, in placeholder order; pixels are decoded at batch time."""
    meta: dict[str, Any] = field(default_factory=dict)
    """id, answer, question_type, source row… for evaluation and error messages."""


def image_path_inside(folder: str | Path, name: str, allow_absolute_paths: bool = False) -> str:
    """`name` resolved against the dataset's image folder; a path that leaves it (`..`, an absolute path, a
    symlink pointing out) is a bad row, so a data file cannot make the workbench read other files of the
    machine. `allow_absolute_paths` is the loaders' explicit opt-out for data that lists files elsewhere."""
    if allow_absolute_paths:
        return str(Path(folder) / name)
    root = Path(folder).resolve()
    target = (root / name).resolve()  # follows symlinks, so a link inside the folder that points out is caught
    if Path(name).is_absolute() or not target.is_relative_to(root):
        raise BadRow(OUTSIDE_FOLDER, f"{name} (allow_absolute_paths: true lets a loader read it)")
    return str(target)


@dataclass
class DataReport:
    """What loading a dataset kept and what it skipped, by reason, with example row ids to look at."""

    name: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    used: int | None = None
    """Samples left after a limit/subset/split; None when all kept rows are used."""

    def add_skip(self, reason: str, row_id: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(str(row_id))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.name}: kept {self.kept:,} of {self.total:,} rows"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            text += f", skipped {self.num_skipped:,} ({reasons})"
        else:
            text += ", skipped 0"
        if self.used is not None and self.used != self.kept:
            text += f"; using {self.used:,}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SampleDataset(Dataset):
    """A list of Samples plus the report of how they were loaded; indexing returns the Sample itself."""

    def __init__(self, samples: list[Sample], report: DataReport | None = None):
        self.samples = list(samples)
        self.report = report or DataReport("samples", total=len(self.samples), kept=len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"SampleDataset({len(self)} samples; {self.report.summary()})"

    def _derived(self, samples: list[Sample]) -> SampleDataset:
        return SampleDataset(samples, dataclasses.replace(self.report, skipped=dict(self.report.skipped),
                                                          examples={k: list(v) for k, v in self.report.examples.items()},
                                                          used=len(samples)))

    def subset(self, n: int | None, seed: int = 0) -> SampleDataset:
        """A seeded random `n` samples (kept in their original order); all of them if n is None or ≥ len."""
        if n is None or n >= len(self):
            return self._derived(self.samples)
        if n < 0:
            raise ConfigError(f"A subset size must be ≥ 0, got {n}")
        picked = sorted(random.Random(seed).sample(range(len(self)), n))
        return self._derived([self.samples[i] for i in picked])

    def split(self, fraction: float, seed: int = 0) -> tuple[SampleDataset, SampleDataset]:
        """(rest, held_out) with `fraction` of the samples held out, e.g. `train, val = ds.split(0.1)`."""
        if not 0 < fraction < 1:
            raise ConfigError(f"A split fraction must be between 0 and 1, got {fraction}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        k = round(len(order) * fraction)
        if len(order) >= 2:
            k = min(max(k, 1), len(order) - 1)  # never leave either side empty when it can be avoided
        held, rest = sorted(order[:k]), sorted(order[k:])
        return self._derived([self.samples[i] for i in rest]), self._derived([self.samples[i] for i in held])


class BadRow(Exception):
    """Raised by a loader's row converter: the row cannot become a Sample, for `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def diagnose(sample: Sample, image_token: str = IMAGE_TOKEN, open_images: bool = True,
             _cache: dict | None = None) -> tuple[str, str] | None:
    """(reason, detail) for the first problem with `sample`, or None. Text checks first: they are free."""
    messages = sample.messages
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return MALFORMED, "messages must be a non-empty list of {role, content} text"
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        return NO_ANSWER, "no assistant turn"
    if any(not a.strip() for a in answers):
        return EMPTY_ANSWER, "an assistant turn is blank"
    found = sum(m["content"].count(image_token) for m in messages)
    if found != len(sample.images):
        return PLACEHOLDER_MISMATCH, f"{found} '{image_token}' placeholder(s) for {len(sample.images)} image(s)"
    for image in sample.images:
        problem = _image_problem(image, open_images, _cache)
        if problem:
            return problem
    return None


def check_sample(sample: Sample, image_token: str = IMAGE_TOKEN, open_images: bool = True) -> str | None:
    """The reason `sample` should be skipped, or None. Opens image headers only (cheap), not pixels."""
    problem = diagnose(sample, image_token, open_images)
    return problem[0] if problem else None


def _image_problem(image: Any, open_images: bool, cache: dict | None) -> tuple[str, str] | None:
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, bytes):
        return _header_problem(io.BytesIO(image), "<bytes>") if open_images else None
    if not isinstance(image, (str, os.PathLike)):
        return UNREADABLE_IMAGE, f"an image must be a path or a PIL image, got {type(image).__name__}"
    key = (os.fspath(image), open_images)
    if cache is not None and key in cache:
        return cache[key]
    path = Path(image)
    if not path.is_file():
        problem = (MISSING_IMAGE, str(path))
    else:
        problem = _header_problem(path, str(path)) if open_images else None
    if cache is not None:
        cache[key] = problem
    return problem


def _header_problem(source, name: str) -> tuple[str, str] | None:
    """Read the header only: catches empty, non-image and truncated-header files, and bombs, in ~0.1 ms."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return IMAGE_TOO_LARGE, name
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError…: the header cannot be read
        return UNREADABLE_IMAGE, f"{name} ({type(e).__name__})"
    if w <= 0 or h <= 0:
        return UNREADABLE_IMAGE, f"{name} has no pixels"
    if w * h > MAX_IMAGE_PIXELS:
        return IMAGE_TOO_LARGE, f"{name} is {w}×{h}"
    return None


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


def build_dataset(name: str, rows: Iterable[tuple[str, Any]], to_sample: Callable[[Any], Sample],
                  on_error: str = "skip", trusted: bool = False, image_token: str = IMAGE_TOKEN) -> SampleDataset:
    """Convert (row_id, raw) rows with `to_sample`, check each, and apply the bad-row policy.

    `trusted` (embedded data) skips opening image headers; files must still exist.
    """
    check_on_error(on_error)
    report = DataReport(name)
    samples: list[Sample] = []
    cache: dict = {}
    for row_id, raw in rows:
        report.total += 1
        try:
            sample = to_sample(raw)
            problem = diagnose(sample, image_token, open_images=not trusted, _cache=cache)
        except BadRow as e:
            problem = (e.reason, e.detail)
        if problem is None:
            samples.append(sample)
            continue
        reason, detail = problem
        if on_error == "raise":
            raise ConfigError(f"{name}: bad row {row_id}: {reason}" + (f" ({detail})" if detail else "")
                              + "; fix the row or load with on_error='skip' to skip bad rows")
        report.add_skip(reason, row_id)
    report.kept = len(samples)
    return SampleDataset(samples, report)


def vqa_sample(question: str, answer: str, images: list, meta: dict[str, Any],
               image_token: str = IMAGE_TOKEN) -> Sample:
    """Single-turn sample; puts one placeholder per image in front of a question that has none."""
    question = with_image_placeholders(question, len(images), image_token)
    return Sample([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], images, meta)
