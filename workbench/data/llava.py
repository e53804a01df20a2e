"""The LLaVA conversation format, the common way to bring your own image-chat data.

A JSON list (or JSONL) of rows {"id", "image": path or [paths] (optional), "conversations":
[{"from": "human"|"gpt"|"system", "value": ...}]}. Image paths are relative to `image_folder`
(default: the JSON file's folder). A row with an image but no `<image>` in its text is a bad row:
guessing where the image belongs would silently train on something else than the data says.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from ..atomic_files import write_text_atomic
from ..errors import ConfigError
from .prompting import normalize_messages
from .loaders import DATASETS
from .samples import MALFORMED, BadRow, Sample, SampleDataset, build_dataset, image_path_inside

_TO_LLAVA = {"user": "human", "assistant": "gpt", "system": "system"}


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(row id, row) pairs from a JSON list or JSONL; a JSONL line that is not JSON is a malformed row."""
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        whole, error = None, e
    else:
        error = None
    if isinstance(whole, dict) and "conversations" in whole:
        whole = [whole]  # a JSONL file with a single row
    if isinstance(whole, list):
        for i, row in enumerate(whole):
            yield _row_id(row, i), row
        return
    if whole is not None or (text.lstrip().startswith("[") and path.suffix.lower() != ".jsonl"):
        what = f"not valid JSON ({error})" if error else f"a JSON {type(whole).__name__}"
        raise ConfigError(f"{path} is {what}; the LLaVA format is a JSON list of rows or JSONL, one row a line")
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            yield f"line {i + 1}", _Malformed(f"line {i + 1} is not JSON")
            continue
        yield _row_id(row, i), row


class _Malformed:
    def __init__(self, detail: str):
        self.detail = detail


def _row_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
        return f"{index} (id {row['id']})"
    return str(index)


@DATASETS.register("llava", offline=True, embedded=False,
                   description="Your own conversations in LLaVA JSON/JSONL with an image folder")
def load_llava_json(json_path: str | Path, image_folder: str | Path | None = None,
                    on_error: str = "skip", allow_absolute_paths: bool = False) -> SampleDataset:
    """Load LLaVA-format rows; bad rows are skipped and counted, or raise with on_error="raise". Image paths
    must stay inside `image_folder` unless `allow_absolute_paths` is set."""
    path = Path(json_path)
    if not path.is_file():
        raise ConfigError(f"LLaVA data file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent

    def to_sample(item: tuple[int, Any]) -> Sample:
        index, row = item
        if isinstance(row, _Malformed):
            raise BadRow(MALFORMED, row.detail)
        if not isinstance(row, dict):
            raise BadRow(MALFORMED, f"a row must be an object, got {type(row).__name__}")
        conversations = row.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise BadRow(MALFORMED, "no conversations")
        try:
            messages = normalize_messages(conversations)
        except ConfigError as e:
            raise BadRow(MALFORMED, str(e)) from None
        image = row.get("image")
        names = [] if image in (None, "") else image if isinstance(image, list) else [image]
        if not all(isinstance(n, str) and n for n in names):
            raise BadRow(MALFORMED, "image must be a path or a list of paths")
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
        meta.update({"id": row.get("id", index), "row": index, "source": str(path)})
        if answers:
            meta.setdefault("answer", answers[-1])
        return Sample(messages, [image_path_inside(folder, n, allow_absolute_paths) for n in names], meta)

    rows = ((row_id, (i, row)) for i, (row_id, row) in enumerate(_read_rows(path)))
    return build_dataset(f"llava {path.name}", rows, to_sample, on_error=on_error)


def save_llava_json(samples: Iterable[Sample], json_path: str | Path,
                    image_folder: str | Path | None = None) -> Path:
    """Write samples as LLaVA JSON (JSONL if the name ends in .jsonl) that `load_llava_json` reads back.

    PIL images are saved as PNGs in `image_folder` (default: "images" next to the JSON); image files
    outside the JSON's folder are copied there too, so the folder is self-contained. Paths in the JSON
    are relative to its folder, so `load_llava_json(json_path)` needs no image_folder.
    """
    path = Path(json_path)
    root = path.parent
    images_dir = Path(image_folder) if image_folder is not None else root / "images"
    root.mkdir(parents=True, exist_ok=True)
    copied: dict[str, str] = {}
    rows = []
    for index, sample in enumerate(samples):
        names = []
        for k, image in enumerate(sample.images):
            names.append(_store_image(image, index, k, root, images_dir, copied))
        meta = {k: v for k, v in sample.meta.items() if k not in ("id", "row", "source") and _is_json(v)}
        row: dict[str, Any] = {"id": sample.meta.get("id", index)}
        if names:
            row["image"] = names[0] if len(names) == 1 else names
        row["conversations"] = [{"from": _TO_LLAVA[m["role"]], "value": m["content"]}
                                for m in normalize_messages(sample.messages)]
        if meta:
            row["meta"] = meta
        rows.append(row)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    return write_text_atomic(path, text)  # a reader never sees a half-written file


def _store_image(image: Any, index: int, k: int, root: Path, images_dir: Path, copied: dict[str, str]) -> str:
    images_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(image, Image.Image):
        target = images_dir / f"{index:06d}_{k}.png"
        image.save(target, format="PNG")
        return _relative(target, root)
    if not isinstance(image, (str, os.PathLike)):
        raise ConfigError(f"Sample {index}: cannot save an image of type {type(image).__name__}")
    source = Path(image).resolve()
    if source.is_relative_to(root.resolve()):
        return _relative(source, root)
    if str(source) not in copied:
        target = images_dir / f"{len(copied):06d}_{source.name}"
        shutil.copyfile(source, target)
        copied[str(source)] = _relative(target, root)
    return copied[str(source)]


def _relative(target: Path, root: Path) -> str:
    return Path(os.path.relpath(target.resolve(), root.resolve())).as_posix()


def _is_json(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
