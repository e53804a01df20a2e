"""Shared prefix: the tokens that every sample of a training batch starts with run once per step, not once per sample.

Every conversation of a batch starts with the same system prompt and chat-template tokens, up to the first
image or the first word of the question. Under causal attention a position sees only what precedes it, so
these positions have the same states in every row of the batch. When LoRA trains in the layers that run,
those states change from step to step and cannot be cached like the text-state cache's bottom layers; but
within one step they need computing only once. A step then runs the prefix as a batch of one, and the rest
of every row attends to its keys and values (expanded to the batch, so gradients from every row reach it).

It is an exact rewrite, and it applies only where it is one: visual tokens in the sequence (an integrator
inside the LLM makes even the prefix's states depend on the image), no PEFT virtual tokens, no dropout in
the LLM (a row-shared dropout mask would not be the same computation), an attention kernel that takes an
explicit mask, and no gradient checkpointing (it runs without a KV cache). The trainer also compares its
loss with the ordinary forward's on one batch before using it.
"""
from __future__ import annotations

import torch
from torch import nn

from .data.prompting import IMAGE_TOKEN_INDEX
from .llm import config_dropout
from .peft_modules import base_llm, virtual_tokens

MIN_PREFIX = 4
"""Shorter shared prefixes are not worth a second pass."""
MASKED_KERNELS = ("sdpa", "eager")
"""Attention implementations that take the explicit (B, 1, q, kv) mask the second pass needs."""


def why_not_shared(model) -> str | None:
    """None when `model`'s training forward can share the prefix, else the reason it cannot."""
    llm = base_llm(model.llm)
    if getattr(model.integrator, "placement", "prefix") != "prefix" or not model.num_visual_tokens:
        return "the image reaches the LLM inside its layers, so every position's state depends on it"
    if virtual_tokens(model.llm):
        return "PEFT virtual tokens are part of the sequence"
    if getattr(model, "gradient_checkpointing", False):
        return "gradient checkpointing runs without a KV cache"
    kernel = getattr(llm.config, "_attn_implementation", None) or "eager"
    if kernel not in MASKED_KERNELS:
        return f"the attention kernel ({kernel}) takes no explicit mask"
    if config_dropout(llm) or any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.llm.modules()):
        return "the LLM uses dropout (LoRA's too): one mask for every row would not be the same computation"
    return None


def why_not_by_setting(setting: bool | str, precision: str) -> str | None:
    """None when `training.share_prefix` asks for it at this mixed precision ("no", "bf16", "fp16"), else why
    not: auto shares in fp32 only, since under a CPU's bf16 autocast it did not pay (bench/shared_prefix.py)."""
    if setting is False:
        return "training.share_prefix is false"
    if setting == "auto" and precision != "no":
        return f"{precision} autocast (auto shares it in fp32 only; training.share_prefix: true forces it)"
    return None


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: int) -> int:
    """The number of leading tokens that every row of a right-padded batch has in common, before any image
    placeholder and at most `limit` (the first position whose logits are needed); 0 when sharing would not pay."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)
    same &= input_ids[0] != IMAGE_TOKEN_INDEX
    differs = (~same).nonzero()
    prefix = int(differs[0]) if len(differs) else input_ids.shape[1]
    prefix = min(prefix, limit, int(attention_mask.sum(dim=1).min()) - 1)
    return prefix if prefix >= MIN_PREFIX else 0


def prefix_cache(llm: nn.Module, prefix_embeds: torch.Tensor, batch: int):
    """Run the prefix (1, P, H) once; its keys and values in every layer that ran, expanded to `batch` rows."""
    from transformers import DynamicCache

    config = base_llm(llm).config
    cache = DynamicCache(config=config.get_text_config() if hasattr(config, "get_text_config") else config)
    mask = torch.ones(1, prefix_embeds.shape[1], dtype=torch.long, device=prefix_embeds.device)
    llm(inputs_embeds=prefix_embeds, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
    return cache


def rest_attention_mask(attention_mask: torch.Tensor, prefix: int, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    """(B, 1, L - prefix, L) mask for the rest of each row: the whole prefix, then causal over the row's own
    tokens (padding left out); boolean for sdpa, additive for eager attention."""
    B, L = attention_mask.shape
    query = torch.arange(prefix, L, device=attention_mask.device)
    key = torch.arange(L, device=attention_mask.device)
    allowed = (key[None, :] <= query[:, None]) & attention_mask.bool()[:, None, :]
    allowed = allowed.unsqueeze(1)
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def rest_positions(attention_mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, L - prefix) position ids of the rest of each row: they continue the prefix's."""
    B, L = attention_mask.shape
    return torch.arange(prefix, L, device=attention_mask.device).expand(B, -1)


def run_prefix(llm: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: int,
               logits_to_keep: torch.Tensor) -> dict:
    """Run the first `prefix` positions of row 0 once; the keyword arguments that make the LLM run the rest of
    every row (`embeds[:, prefix:]`) as the ordinary forward would: the prefix's keys and values, positions,
    the attention mask, and the answer positions shifted to the rest."""
    kernel = getattr(base_llm(llm).config, "_attn_implementation", None) or "eager"
    return {"past_key_values": prefix_cache(llm, embeds[:1, :prefix], embeds.shape[0]), "use_cache": True,
            "position_ids": rest_positions(attention_mask, prefix),
            "attention_mask": rest_attention_mask(attention_mask, prefix, embeds.dtype, kernel),
            "logits_to_keep": logits_to_keep - prefix}
