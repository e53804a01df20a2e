"""Visual tokens that enter the LLM at a decoder layer above the embeddings (`model.visual_entry_layer`).

LLaVA-style prefix integrators put their tokens into the input embeddings, so every one of the LLM's layers
processes them and nothing of a training step can be skipped. With an entry layer k > 0, the image's slots in
the sequence hold zero vectors below layer k (the text around them sees a fixed, image-free placeholder), and
a pre-hook on layer k replaces those slots' hidden states with the visual tokens. The layers below k then see
only text: with a frozen LLM their states are the same at every step, and the trainer's text-state cache
(training/text_state_cache.py) skips them, as it does for the adapter recipes whose prompts sit in the top
layers. Positions stay those of the full sequence, so generation with a KV cache needs nothing special: the
hook acts on the pass that holds the whole prompt, and the decoding steps after it read the slots from the cache.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError
from .integrators.llm_layers import decoder_layers
from .peft_modules import base_llm

PROBE_TEXT = ("A short neutral sentence about the weather, a walk in the park and a cup of tea, "
              "used only to measure how large the hidden states of ordinary text are.")


def resolve_entry_layer(layer: int, num_layers: int) -> int:
    """The configured entry layer as an index: negative values count from the top (-8 = the top 8 layers)."""
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise ConfigError(f"model.visual_entry_layer is {layer}, but the LLM has {num_layers} decoder layers "
                          f"(use 0..{num_layers - 1}, or -{num_layers}..-1 counted from the top)")
    return index


def span_mask(spans: list[list[tuple[int, int]]], width: int, device) -> torch.Tensor:
    """(B, width) bool: True at the positions that hold visual tokens (from `MultimodalInputs.image_spans`)."""
    mask = torch.zeros(len(spans), width, dtype=torch.bool, device=device)
    for b, sample in enumerate(spans):
        for start, length in sample:
            mask[b, start:start + length] = True
    return mask


def with_placeholders(embeds: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """The LLM's input embeddings with the visual slots (`slots`, (B, L) bool) zeroed: what the layers below
    the entry layer see there."""
    return embeds if slots is None else embeds.masked_fill(slots.unsqueeze(-1), 0.0)


@contextmanager
def visual_entry(llm: nn.Module, layer: int, visual: torch.Tensor, slots: torch.Tensor | None) -> Iterator[None]:
    """While inside, the hidden states entering decoder `layer` take `visual` (B, L, H) at `slots` (B, L).

    Nothing is hooked for layer 0 (the ordinary splice) or a batch without images."""
    if layer == 0 or slots is None or not bool(slots.any()):
        yield
        return
    target = decoder_layers(base_llm(llm), "visual_entry_layer")[layer]
    width = visual.shape[1]
    where = slots.unsqueeze(-1)

    def enter(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] < width:  # a decoding step after the prompt: the slots are already in the KV cache
            return None
        prompt = torch.where(where, visual.to(hidden.dtype), hidden[:, :width])  # a longer pass: the prompt leads
        hidden = torch.cat([prompt, hidden[:, width:]], dim=1) if hidden.shape[1] > width else prompt
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # prepended: the tokens are in place before an in-LLM integrator's own module at this layer reads the sequence
    handle = target.register_forward_pre_hook(enter, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def hidden_norm_at(llm: nn.Module, tokenizer, layer: int) -> float | None:
    """Median L2 norm of ordinary text's hidden states entering decoder `layer`: the scale visual tokens that
    enter there should have (the first token is left out: it carries the attention sink's outsized norm)."""
    inner = base_llm(llm)
    weight = inner.get_input_embeddings().weight
    if weight.device.type == "meta":
        return None
    layers = decoder_layers(inner, "visual_entry_layer")
    ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]], device=weight.device)
    captured = {}

    class Stop(Exception):
        pass

    def capture(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise Stop()

    handle = layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        inner(input_ids=ids, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    norms = captured["h"][0, 1:].float().norm(dim=-1)
    return float(norms.median())
