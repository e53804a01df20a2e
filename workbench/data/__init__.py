"""Datasets (easy-VQA, LLaVA JSON, captions, emoji captions, HF datasets), prompt formatting and checks.

Every module of this folder is imported here, so each data kind's file registers itself in DATASETS."""
from ..registry import discover
from .loaders import DATASETS, load_dataset_spec
from .prompting import IMAGE_TOKEN_INDEX, EncodedConversation, PromptFormatter, normalize_messages
from .samples import DataReport, Sample, SampleDataset, check_sample

discover(__name__, __path__)

__all__ = ["DATASETS", "load_dataset_spec", "IMAGE_TOKEN_INDEX", "EncodedConversation", "PromptFormatter",
           "normalize_messages", "DataReport", "Sample", "SampleDataset", "check_sample"]
