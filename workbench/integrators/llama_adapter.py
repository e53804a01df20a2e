"""LLaMA-Adapter's zero-initialised attention (Zhang et al., 2023), multimodal V1 variant, through hooks.

The name means the paper's design. Experiments that changed how the image reaches the prompts (visual grid
tokens, a bilinear or MLP token × image fusion term, batch-standardised inputs) did not pay on easy-VQA
(bench/RESULTS.md, easyvqa_time_to_accuracy: the variants tried against the yes/no text prior) and were
removed; the plain design, given more steps, answered those questions. A change that earns its place becomes
its own named integrator.

- `prompt_length` learnable adaption prompts in each of the top `num_layers` decoder layers (all layers
  when the LLM has fewer).
- The global image feature (the CLS token when the encoder keeps one, else the mean over its tokens;
  the mean over a row's images when it has several) is projected to the LLM width (LayerNorm + linear) and
  added to every adapted layer's prompt for that row; text-only rows use the bare prompts.
- In each adapted layer, a forward hook on the self-attention takes the layer's input hidden states and
  recomputes its queries with the layer's own (frozen, or LoRA-adapted) q_proj and RoPE; the prompt's
  keys/values come from the layer's own k_proj / v_proj, without RoPE, repeated over the query heads for
  GQA (num_key_value_heads). The query→prompt attention is softmaxed on its own, scaled per head by a
  gate initialised at exactly zero, sent through the layer's o_proj (its bias cancelled) and added to the
  attention output. With all gates at zero the LLM is unchanged.
- No tokens in the sequence: `num_tokens` is 0 and each `<image>` placeholder is simply removed (the
  splice accepts zero-length visual spans), as LLaMA-Adapter feeds the image only through the prompts.
  `media_marker=true` instead puts one learned marker token per image where the placeholder was.

With `record_attention`, `last_attention` holds per adapted layer the query→prompt attention
(B, heads, T, prompt_length) in `text_to_prompt[layer]`, the per-head gates (heads,) in `gates[layer]` and the
prompts themselves, image feature added, (B or 1, prompt_length, H) in `visual_prompts[layer]` (the logit lens).
"""
from __future__ import annotations

import torch
from torch import nn

from . import INTEGRATORS
from .base import IntegratorContext
from .llm_layers import HookSet, InLLMIntegrator, apply_rope, llm_shape, marker_token, merge_heads


@INTEGRATORS.register("llama_adapter", family="zero-init attention prompts",
                      follows="LLaMA-Adapter (Zhang et al., 2023)", paradigms=["single-stage", "direct"],
                      placement="in_llm",
                      description="Zero-gated adaption prompts in the top LLM layers, with the projected global "
                                  "image feature added to every prompt")
class LLaMAAdapter(InLLMIntegrator):
    """LLaMA-Adapter's zero-gated adaption prompts (see the module docstring).

    Options:
        prompt_length: learnable prompt tokens per adapted layer (at least 1)
        num_layers: adapted layers, counted from the top of the LLM (at least 1)
        media_marker: one learned marker token per image in the sequence (else none)
    """

    _needs = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

    def __init__(self, context: IntegratorContext, prompt_length: int = 10, num_layers: int = 8,
                 media_marker: bool = False):
        super().__init__(context)
        shape = llm_shape(context, self.registry_name)
        if prompt_length < 1 or num_layers < 1:
            raise ValueError("prompt_length and num_layers must be at least 1")
        if shape.num_heads % shape.num_kv_heads:
            raise ValueError(f"{shape.num_heads} attention heads are not a multiple of {shape.num_kv_heads} kv heads")
        self.shape = shape
        self.num_llm_layers = shape.num_layers
        n = min(num_layers, shape.num_layers)
        self.adapted_layers = list(range(shape.num_layers - n, shape.num_layers))
        H = context.llm_hidden
        self.prompts = nn.Parameter(torch.randn(n, prompt_length, H))
        self.gates = nn.Parameter(torch.zeros(n, shape.num_heads))
        self.visual_proj = nn.Sequential(nn.LayerNorm(context.vision_dim), nn.Linear(context.vision_dim, H))
        self.media_marker = media_marker
        if media_marker:
            self.marker = marker_token(context)

    @property
    def num_tokens(self) -> int:
        return 1 if self.media_marker else 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.media_marker:
            return self.marker.expand(features.shape[0], 1, -1)
        return self.prompts.new_zeros(features.shape[0], 0, self.context.llm_hidden)

    def llm_layers(self) -> list[int]:
        return list(self.adapted_layers)

    def _install(self, layers: nn.ModuleList, hooks: HookSet) -> None:
        self.__dict__["_queries"] = {}
        for slot, i in enumerate(self.adapted_layers):
            hooks.on_output(layers[i].self_attn.q_proj, self._query_hook(i, layers[i].self_attn.q_proj))
            hooks.on_output(layers[i].self_attn, self._attention_hook(slot, i, layers[i].self_attn))

    def _query_hook(self, layer: int, module: nn.Module):
        """Keep the layer's own query projection (with its LoRA) so the prompt attention need not redo it."""
        def hook(hidden: torch.Tensor, kwargs: dict, output: torch.Tensor):
            self._queries[layer] = (module, hidden, output)

        return hook

    def _layer_queries(self, layer: int, attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """q_proj(hidden): the one the attention just computed, when it came from the module the attention uses
        now (not one a PEFT wrapper has since replaced) on this very input; else computed anew."""
        module, seen, q = self.__dict__.get("_queries", {}).pop(layer, (None, None, None))
        return q if module is attn.q_proj and seen is hidden else attn.q_proj(hidden)

    def _row_visual(self, batch: int) -> torch.Tensor | None:
        """(B, H): each row's projected global image feature, the mean over its images (zeros on text-only
        rows), once per LLM call; None when no row has an image."""
        if not self.has_visual_context or self.image_rows(batch).numel() == 0:
            return None

        def visual():
            features = self.features()
            pooled = self.visual_proj(features[:, 0] if self.context.has_cls else features.mean(dim=1))  # (M, H)
            rows = self.image_rows(batch)
            total = pooled.new_zeros(batch, pooled.shape[1]).index_add(0, rows, pooled)
            count = pooled.new_zeros(batch).index_add(0, rows, pooled.new_ones(rows.shape[0]))
            return total / count.clamp(min=1)[:, None]

        return self.derived(("visual", batch), visual)

    def _attention_hook(self, slot: int, layer: int, attn: nn.Module):
        s = self.shape
        scaling = getattr(attn, "scaling", s.head_dim ** -0.5)

        def hook(hidden: torch.Tensor, kwargs: dict, output: torch.Tensor):
            B, T, _ = hidden.shape
            prompt = self.prompts[slot].unsqueeze(0)  # (1, P, H): shared by all rows unless an image is added
            visual = self._row_visual(B)
            if visual is not None:
                prompt = prompt + visual[:, None, :]
            prompt = prompt.to(device=hidden.device, dtype=hidden.dtype)
            b, P = prompt.shape[:2]
            q = self._layer_queries(layer, attn, hidden).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)
            if getattr(attn, "use_rope", True):  # e.g. SmolLM3's NoPE layers have none
                q = apply_rope(q, kwargs)
            k = attn.k_proj(prompt).view(b, P, s.num_kv_heads, s.head_dim).transpose(1, 2)
            v = attn.v_proj(prompt).view(b, P, s.num_kv_heads, s.head_dim).transpose(1, 2)
            groups = s.num_heads // s.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gate = self.gates[slot].to(q.device)
            scores = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, h, T, P)
            probs = scores.softmax(dim=-1)  # on its own, beside the layer's softmax over the sequence
            out = (probs @ v.float()) * gate[None, :, None, None]
            if self.record_attention:
                self.last_attention.text_to_prompt[layer] = probs.detach()
                self.last_attention.gates[layer] = gate.detach()
                self.last_attention.visual_prompts[layer] = prompt.detach()
            y = merge_heads(out).to(output.dtype)
            delta = attn.o_proj(y) - attn.o_proj(y.new_zeros(1, 1, y.shape[-1]))  # o_proj's bias not added twice
            return output + delta

        return hook
