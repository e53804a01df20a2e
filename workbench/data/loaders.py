"""One entry point for every dataset kind, so configs and front ends name data the same way."""
from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .captions import load_captions
from .easyvqa import load_easy_vqa
from .emoji import load_emoji_captions
from .hf import load_hf_dataset
from .llava import load_llava_json
from .samples import SampleDataset
from .table import load_image_table

DATASETS: Registry = Registry("dataset")

DATASETS.register("easy-vqa", offline=True, embedded=True,
                  description="easy-VQA: 64×64 shapes, yes/no, colour and shape questions (embedded)")(load_easy_vqa)
DATASETS.register("emoji-captions", offline=True, embedded=True,
                  description="Twemoji pictures captioned with their names (embedded)")(load_emoji_captions)
DATASETS.register("llava", offline=True, embedded=False,
                  description="Your own conversations in LLaVA JSON/JSONL with an image folder")(load_llava_json)
DATASETS.register("captions", offline=True, embedded=False,
                  description="Your own images with captions.csv or captions.jsonl")(load_captions)
DATASETS.register("image-table", offline=True, embedded=False,
                  description="Your own images with a CSV of image,question,answer rows")(load_image_table)
DATASETS.register("hf", offline=False, embedded=False,
                  description="A Hugging Face hub dataset or a save_to_disk folder (needs `datasets`)")(load_hf_dataset)


def load_dataset_spec(kind: str, **kwargs: Any) -> SampleDataset:
    """Load dataset `kind` with its own keyword arguments; unknown kinds or arguments say what is valid."""
    loader = DATASETS.get(kind)
    signature = inspect.signature(loader)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        params = ", ".join(signature.parameters)
        raise ConfigError(f"Dataset '{kind}': {e}. It takes: {params}") from None
    return loader(**kwargs)
