"""Twemoji pictures with their English names: an embedded, offline captioning corpus (~4k pairs).

File names are the emoji's hex codepoints joined by '-' (1f600.png, 1f1e6-1f1e8.png); names come
from the `emoji` package. Twemoji drops the FE0F variation selector from some names where Unicode
keeps it (and the other way round), so lookups ignore FE0F. Images are RGBA; `load_image`
composites them on white at batch time. Artwork: CC-BY 4.0, Twitter/Twemoji.
"""
from __future__ import annotations

import functools
import random
import unicodedata
from pathlib import Path
from typing import Sequence

from ..assets import asset_path
from ..errors import ConfigError
from .captions import CAPTION_PROMPTS
from .loaders import DATASETS
from .samples import BadRow, Sample, SampleDataset, build_dataset, vqa_sample

NO_NAME = "no name"
_FE0F = "\ufe0f"


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    """Emoji (FE0F removed) → English name, e.g. "😀" → "grinning face"."""
    try:
        import emoji
    except ImportError:
        raise ConfigError("Emoji captions need the emoji package: pip install emoji") from None
    out: dict[str, str] = {}
    for char, data in emoji.EMOJI_DATA.items():
        name = data.get("en", "").strip(":").replace("_", " ").strip()
        if name:
            out.setdefault(char.replace(_FE0F, ""), name)
    return out


def emoji_name(stem: str) -> tuple[str, str] | None:
    """(emoji, name) for a Twemoji file stem like "1f600" or "1f1e6-1f1e8", or None if it has no name."""
    try:
        char = "".join(chr(int(h, 16)) for h in stem.split("-"))
    except ValueError:
        return None
    name = _names().get(char.replace(_FE0F, ""))
    if name is None and len(char) == 1:  # single codepoints the emoji list lacks (regional indicator letters)
        name = unicodedata.name(char, "").lower() or None
    elif name and _is_flag(char) and not name.lower().startswith("flag"):
        name = f"flag of {name}"  # the emoji list names flags by the place only ("Gambia")
    return (char, name) if name else None


def _is_flag(char: str) -> bool:
    """Two regional indicators (🇬🇲) or a black flag with tag characters (England, Scotland, Wales)."""
    if len(char) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in char):
        return True
    return char.startswith("\U0001F3F4") and len(char) > 2 and all(0xE0020 <= ord(c) <= 0xE007F for c in char[1:])


@DATASETS.register("emoji-captions", offline=True, embedded=True,
                   description="Twemoji pictures captioned with their names (embedded)")
def load_emoji_captions(limit: int | None = None, seed: int = 0, prompts: Sequence[str] | None = None,
                        root: str | Path | None = None) -> SampleDataset:
    """Each Twemoji PNG as user "<image>\\n{caption instruction}" → assistant "{emoji name}"."""
    folder = Path(root) if root is not None else asset_path("emoji-captions")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise ConfigError(f"No emoji PNGs in {folder}")
    prompts = list(CAPTION_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ConfigError("prompts must be a non-empty list of caption instructions")
    rng = random.Random(seed)

    def to_sample(path: Path) -> Sample:
        prompt = rng.choice(prompts)
        found = emoji_name(path.stem)
        if found is None:
            raise BadRow(NO_NAME, path.name)
        char, name = found
        return vqa_sample(prompt, name, [str(path)], {"id": path.stem, "emoji": char, "name": name, "caption": name,
                                                      "answer": name, "prompt": prompt, "source": "emoji-captions"})

    dataset = build_dataset("emoji-captions", ((p.stem, p) for p in files), to_sample, trusted=True)
    return dataset.subset(limit, seed) if limit is not None else dataset
