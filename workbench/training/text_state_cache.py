"""Text-state cache: the hidden states of the LLM's bottom frozen layers, computed once per text, reused.

When the image reaches the LLM only inside its upper layers (adapters and prompts such as LLaMA-Adapter's,
or visual tokens entering at `model.visual_entry_layer`) and everything trainable sits in those upper layers too (the integrator's
modules, LoRA restricted with `layers_to_transform`), the bottom layers see only text and never change:
their output for a given token sequence is the same at every step and epoch. This cache keeps it, keyed by
the token ids, so a training step runs (forward and backward) only the layers that learn. Backward already
stops at the lowest trainable layer by itself; the cache removes the bottom layers' forward too. On
easy-VQA (a few hundred distinct question-answer texts) nearly every step hits the cache.

It is an exact rewrite, not an approximation: on the first batch the trainer compares the cached path's
loss with the ordinary forward's and turns the cache off (saying why) if they differ. It turns itself off
up front when any bottom layer could depend on the image or change: visual tokens entering with the
embeddings, virtual tokens, a trainable embedding, a hook or a trainable parameter in the layer, or dropout.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from ..data.prompting import IMAGE_TOKEN_INDEX
from ..integrators.llm_layers import decoder_layers
from ..llm import config_dropout
from ..peft_modules import base_llm, virtual_tokens

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class _Stop(Exception):
    """Raised by the capture hook: the layers above the cut are not needed for the cached states."""


def frozen_text_layers(model) -> tuple[int, str]:
    """(number of bottom decoder layers whose output depends only on the text and never changes, why not more)."""
    llm = base_llm(model.llm)
    entry = getattr(model, "entry_layer", 0)
    if model.num_visual_tokens and not entry:
        return 0, "visual tokens enter with the embeddings (model.visual_entry_layer: 0)"
    if virtual_tokens(model.llm):
        return 0, "PEFT virtual tokens are part of the sequence"
    if any(p.requires_grad for p in llm.get_input_embeddings().parameters()):
        return 0, "the input embeddings train"
    dropout = config_dropout(llm)
    if dropout:
        return 0, f"the LLM uses dropout ({dropout})"
    try:
        layers = decoder_layers(llm, "text-state cache")
    except Exception as e:  # not a Llama-like decoder
        return 0, f"the LLM's decoder layers were not found ({e})"
    cut, why = len(layers), "every layer is frozen and text-only"
    if model.num_visual_tokens:
        cut, why = entry, f"visual tokens enter at layer {entry}"
    for name, p in llm.named_parameters():
        m = _LAYER.search("." + name)
        if p.requires_grad and m and int(m.group(1)) < cut:
            cut, why = int(m.group(1)), f"layer {m.group(1)} trains ({name})"
    for i, layer in enumerate(layers[:cut]):
        if any(mod._forward_hooks or mod._forward_pre_hooks for mod in layer.modules()):
            cut, why = i, f"layer {i} is hooked (an integrator works inside it)"
            break
    return cut, why


class TextStateCache:
    """Hidden states entering layer `cut`, per token sequence (fp32 on the LLM's device, up to `max_mb`)."""

    def __init__(self, model, cut: int, max_mb: float = 2048.0):
        self.cut = cut
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0
        self.layers = decoder_layers(base_llm(model.llm), "text-state cache")
        self.inner = self._owner(base_llm(model.llm), self.layers)

    @staticmethod
    def _owner(llm: nn.Module, layers: nn.ModuleList) -> nn.Module:
        for module in llm.modules():
            if getattr(module, "layers", None) is layers:
                return module
        raise ValueError("the decoder that holds the layers was not found")

    def lookup(self, model, rows: list[torch.Tensor]) -> torch.Tensor:
        """(B, width, H) states entering layer `cut` for the given id rows (right-padded with zeros)."""
        keys = [tuple(r.tolist()) for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed = self._compute(model, [rows[i] for i in missing]) if missing else []
        fresh = dict(zip((keys[i] for i in missing), computed))
        for key, state in fresh.items():
            size = state.numel() * state.element_size()
            if self.bytes + size <= self.max_bytes:
                self.states[key] = state
                self.bytes += size
        found = [self.states.get(k, fresh.get(k)) for k in keys]
        width = max(s.shape[0] for s in found)
        out = found[0].new_zeros(len(found), width, found[0].shape[1])
        for b, s in enumerate(found):
            out[b, : s.shape[0]] = s
        return out

    @torch.no_grad()
    def _compute(self, model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the LLM up to layer `cut` (a pre-hook there captures its input and stops the forward)."""
        width = max(r.shape[0] for r in rows)
        device = model.device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            ids[b, : r.shape[0]] = r.to(device)
            mask[b, : r.shape[0]] = 1
        slots = ids == IMAGE_TOKEN_INDEX  # visual tokens entering above the cut: zeros below it (visual_entry.py)
        embeds = base_llm(model.llm).get_input_embeddings()(ids.clamp(min=0)).masked_fill(slots.unsqueeze(-1), 0.0)
        captured = {}

        def capture(module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop()

        handle = self.layers[self.cut].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.inner(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        h = captured["h"].float()
        return [h[b, : r.shape[0]].clone() for b, r in enumerate(rows)]

    @contextmanager
    def upper_layers(self):
        """The decoder runs only layers cut.. while inside (the same modules, hooks and adapters)."""
        full = self.inner.layers
        self.inner.layers = nn.ModuleList(list(full)[self.cut:])
        try:
            yield
        finally:
            self.inner.layers = full

    def summary(self) -> dict:
        total = self.hits + self.misses
        return {"cut": self.cut, "entries": len(self.states), "mb": round(self.bytes / 2**20, 1),
                "hit_rate": round(self.hits / total, 4) if total else None}
