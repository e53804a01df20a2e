"""Conversations → token ids with image slots and answer-only labels, through the LLM's own chat template.

Each `<image>` placeholder becomes one IMAGE_TOKEN_INDEX sentinel id (negative, so it can never be a
real token); the model later expands it into the integrator's visual tokens. Labels are the token
ids inside assistant turns and IGNORE_INDEX elsewhere, so training learns the answers only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import ConfigError

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

SHORT_ANSWER_SYSTEM_PROMPT = "Answer the question about the image in one word."
"""The system prompt of the short-answer recipes (easy-VQA): the instruct LLMs' own defaults invite sentences,
which the exact-match metric counts wrong. The example configs spell it out as their recipe value."""

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "model": "assistant"}

# For LLMs without a chat template (base models): plain "User:/Assistant:" turns, EOS after answers.
FALLBACK_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def normalize_messages(messages: Iterable[Any]) -> list[dict[str, str]]:
    """Accept {'role','content'} and LLaVA's {'from','value'} rows; return role/content dicts."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"Message {i} must be a mapping with role and content, got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLE_ALIASES:
            raise ConfigError(f"Message {i} has unknown role {role!r}; use user, assistant or system")
        if not isinstance(content, str):
            raise ConfigError(f"Message {i} content must be text, got {type(content).__name__}")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    if not out:
        raise ConfigError("A conversation needs at least one message")
    return out


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class PromptFormatter:
    """Renders conversations with the tokenizer's chat template and tokenizes them around image slots."""

    def __init__(self, tokenizer, image_token: str = "<image>", system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.system_prompt = system_prompt
        self.template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def count_images(self, messages: list[dict[str, str]]) -> int:
        return sum(m["content"].count(self.image_token) for m in messages)

    def encode(self, messages: Iterable[Any], add_generation_prompt: bool = False,
               num_images: int | None = None) -> EncodedConversation:
        """Token ids with sentinels; labels on assistant turns. `num_images` checks the placeholder count."""
        messages = normalize_messages(messages)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            # Replaces a template's default system prompt (SmolLM2's costs ~20 tokens on every sample).
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        found = self.count_images(messages)
        if num_images is not None and found != num_images:
            raise ConfigError(
                f"The conversation has {found} '{self.image_token}' placeholder(s) but {num_images} image(s) were "
                f"given; put one '{self.image_token}' where each image belongs"
            )
        full = self.render(messages, add_generation_prompt)
        spans = self._assistant_spans(messages, full)
        ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for start, end, is_answer in _partition(len(full), spans):
            for piece_ids in self._tokenize_with_images(full[start:end]):
                ids.extend(piece_ids)
                labels.extend(
                    t if (is_answer and t != IMAGE_TOKEN_INDEX) else IGNORE_INDEX for t in piece_ids
                )
            cursor = end
        assert cursor == len(full)
        return EncodedConversation(ids, labels, found, full)

    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn (its content and end-of-turn marker) in `full`."""
        spans = []
        search_from = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            after = self.render(messages[: i + 1], add_generation_prompt=False)
            if full.startswith(after) and after.startswith(before) and len(after) > len(before):
                start, end = len(before), len(after)
                # Templates end a turn with a newline after the EOS marker; keep the marker, drop the newline.
                while end > start and full[end - 1] in "\n ":
                    end -= 1
            else:  # template rewrites history (e.g. strips reasoning): fall back to finding the content
                start = full.find(m["content"], search_from)
                if start < 0:
                    raise ConfigError("Could not locate an assistant answer in the rendered chat template")
                end = start + len(m["content"])
                eos = self.tokenizer.eos_token
                if eos and full.startswith(eos, end):
                    end += len(eos)
            spans.append((start, end))
            search_from = end
        return spans

    def _tokenize_with_images(self, text: str) -> list[list[int]]:
        pieces = text.split(self.image_token)
        out: list[list[int]] = []
        for i, piece in enumerate(pieces):
            if i:
                out.append([IMAGE_TOKEN_INDEX])
            if piece:
                out.append(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return out


def _partition(length: int, spans: list[tuple[int, int]]):
    """Split [0, length) into (start, end, is_answer) pieces."""
    pos = 0
    for start, end in spans:
        if start > pos:
            yield pos, start, False
        yield start, end, True
        pos = end
    if pos < length:
        yield pos, length, False


def with_image_placeholders(text: str, num_images: int, image_token: str = "<image>") -> str:
    """Put the placeholders LLaVA-style in front of a question that has none (for chat front ends)."""
    if num_images and image_token not in text:
        return (image_token + "\n") * num_images + text
    return text
