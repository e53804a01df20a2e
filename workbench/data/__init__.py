"""Datasets, prompt formatting and batching."""
from .prompting import IMAGE_TOKEN_INDEX, EncodedConversation, PromptFormatter, normalize_messages

__all__ = ["IMAGE_TOKEN_INDEX", "EncodedConversation", "PromptFormatter", "normalize_messages"]
