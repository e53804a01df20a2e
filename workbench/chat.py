"""Multi-turn multimodal chat on a model: keeps history and images, streams answers.

Front ends (CLI, app, notebooks) hold a `ChatSession` and call `send`; they never touch the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .data.prompting import with_image_placeholders
from .errors import ConfigError
from .images import ImageSource, load_image


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def as_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


@dataclass
class ChatSession:
    model: object  # VisionLanguageModel
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list = field(default_factory=list)

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def send(self, text: str, images: list[ImageSource] | ImageSource | None = None, batcher=None) -> Iterator[str]:
        """Add a user turn (with its images, placeholders added in front if the text has none) and stream the answer.

        `batcher` (a `batching.GenerationBatcher`): answer in a batch with other users' concurrent requests (a
        server's chat); without one, this session's answer is generated alone. The turn enters the history only
        once its answer is complete, so a failed or abandoned answer leaves the conversation as it was."""
        if not text.strip():
            raise ConfigError("Say something: the message is empty")
        new = [] if images is None else images if isinstance(images, list) else [images]
        loaded = [load_image(im) for im in new]  # fails here, before the history changes
        token = self.model.config.image_token
        content = with_image_placeholders(text, len(loaded), token)
        if content.count(token) != len(loaded):
            raise ConfigError(f"The message has {content.count(token)} '{token}' placeholder(s) for {len(loaded)} image(s)")
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        turn = {"role": "user", "content": content}
        answer = []
        if batcher is not None and self.settings.repetition_penalty == 1.0:
            from .batching import GenerationJob, stream_answer

            job = GenerationJob(history + [turn], self.images + loaded, self.settings.max_new_tokens,
                                self.settings.temperature, self.settings.top_p, model=self.model)
            pieces = stream_answer(batcher, job)
        else:
            pieces = self.model.stream(history + [turn], self.images + loaded, **self.settings.as_kwargs())
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:
            if hasattr(pieces, "close"):
                pieces.close()  # a reader that stopped early cancels the batched answer
        self.messages += [turn, {"role": "assistant", "content": "".join(answer).strip()}]
        self.images += loaded

    def ask(self, text: str, images: list[ImageSource] | ImageSource | None = None) -> str:
        return "".join(self.send(text, images)).strip()


def load_chat_model(model: str | Path | None = None, config: str | Path | None = None, device: str | None = None):
    """A saved model directory, a config file, or (neither) the embedded default, untrained."""
    from .config import ModelConfig
    from .model import VisionLanguageModel

    if model:
        return VisionLanguageModel.from_pretrained(model, device=device)
    return VisionLanguageModel.from_config(config or ModelConfig(), device=device)
