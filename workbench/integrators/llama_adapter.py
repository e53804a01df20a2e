"""LLaMA-Adapter's zero-initialised attention (Zhang et al., 2023), multimodal V1 variant, through hooks.

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
- `visual_grid: g` (g >= 1) instead hands the image over as g×g extra prompt tokens: the patch grid average-pooled
  to g×g cells (g=1: the global feature), each projected by the same LayerNorm + linear plus a learned
  embedding of its cell. They are attended beside the learned prompts with keys of their own, so a text
  token's query can *match* them: "is there a red shape?" can ask whether the image is red. Added to every
  prompt (the V1 way), the image feature shifts all prompt keys equally and the prompt softmax cancels it:
  the image then reaches each token as one fixed vector, enough to name the colour, but the comparison with
  a word of the question must be built by the frozen layers above (measured on easy-VQA: yes/no stayed at
  the text prior). Rows with several images average them cell by cell; rows without an image attend only
  to the learned prompts.
- `fusion_rank: r` (r >= 1) adds a low-rank bilinear term to the top `fusion_layers` adapted layers (all when
  unset): out(tanh(text(h_t)) ⊙ tanh(image(v))), a Hadamard-product fusion of each token's hidden state with
  the global image feature (MLB, Kim et al., 2017), `out` initialised at zero. Attention over a
  feature-carrying prompt can only *add* the image to a token; questions that compare a word with the
  image ("is there a red shape?") need the product of the two, which this term offers directly, with a
  linear path to the output from the first step. It depends only on the token and its row's image, so
  cached decoding sees the same values. `fusion: mlp` uses out(GELU(text(h_t) + image(p))) instead, p being the
  projected feature the prompts carry (trained by the naming questions too): a hidden layer over the sum can
  pick out conjunctions such as "asks about red, is negated, image is red", which a product cannot.
- `input_norm`: "layer" (V1) or "batch" (per-channel standardisation over the training images, which
  separates the colours of CNN features that a per-token LayerNorm leaves almost identical).
- No tokens in the sequence: `num_tokens` is 0 and each `<image>` placeholder is simply removed (the
  splice accepts zero-length visual spans), as LLaMA-Adapter feeds the image only through the prompts.
  `media_marker=true` instead puts one learned marker token per image where the placeholder was.

With `record_attention`, `last_attention` holds per adapted layer the query→prompt attention
(B, heads, T, prompt_length) under f"prompt_{layer}" and the per-head gates (heads,) under f"gate_{layer}".
"""
from __future__ import annotations

import torch
from torch import nn

from . import INTEGRATORS
from .base import FeatureStandardizer, IntegratorContext, input_norm_layer
from .llm_layers import HookSet, InLLMIntegrator, apply_rope, llm_shape, marker_token, merge_heads


@INTEGRATORS.register("llama_adapter", family="zero-init attention prompts",
                      follows="LLaMA-Adapter (Zhang et al., 2023)", paradigms=["single-stage", "direct"],
                      placement="in_llm",
                      description="Zero-gated adaption prompts in the top LLM layers, with the projected global "
                                  "image feature added to every prompt")
class LLaMAAdapter(InLLMIntegrator):
    _needs = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

    def __init__(self, context: IntegratorContext, prompt_length: int = 10, num_layers: int = 8,
                 media_marker: bool = False, visual_grid: int = 0, input_norm: bool | str = "layer",
                 fusion_rank: int = 0, fusion_layers: int | None = None, fusion: str = "bilinear"):
        super().__init__(context)
        shape = llm_shape(context, self.registry_name)
        if prompt_length < 1 or num_layers < 1:
            raise ValueError("prompt_length and num_layers must be at least 1")
        if visual_grid < 0 or visual_grid > max(context.grid):
            raise ValueError(f"visual_grid must be between 0 (the image added to every prompt) and the encoder's "
                             f"grid side {max(context.grid)}, got {visual_grid}")
        if shape.num_heads % shape.num_kv_heads:
            raise ValueError(f"{shape.num_heads} attention heads are not a multiple of {shape.num_kv_heads} kv heads")
        self.shape = shape
        self.num_llm_layers = shape.num_layers
        n = min(num_layers, shape.num_layers)
        self.adapted_layers = list(range(shape.num_layers - n, shape.num_layers))
        H = context.llm_hidden
        self.prompts = nn.Parameter(torch.randn(n, prompt_length, H))
        self.gates = nn.Parameter(torch.zeros(n, shape.num_heads))
        self.visual_proj = nn.Sequential(input_norm_layer(input_norm, context.vision_dim),
                                         nn.Linear(context.vision_dim, H))
        self.visual_grid = visual_grid
        if fusion_rank < 0 or (fusion_layers is not None and not 1 <= fusion_layers <= n):
            raise ValueError(f"fusion_rank must be >= 0 and fusion_layers between 1 and the {n} adapted layers")
        self.fusion_slots = list(range(n - (fusion_layers or n), n)) if fusion_rank else []
        if fusion not in ("bilinear", "mlp"):
            raise ValueError(f"fusion must be bilinear or mlp, got {fusion!r}")
        self.fusion = fusion
        if fusion_rank and fusion == "mlp":  # the image side reads the projected feature the prompts carry
            self.fusion_image = nn.Linear(H, fusion_rank)
            # per-channel standardisation of the token states: question words and negation live in low-variance
            # directions that the LLM's few large channels would otherwise drown
            self.fusion_text_norm = nn.ModuleList(FeatureStandardizer(H) for _ in self.fusion_slots)
        elif fusion_rank:
            self.fusion_image = nn.Sequential(input_norm_layer(input_norm, context.vision_dim),
                                              nn.Linear(context.vision_dim, fusion_rank))
        if fusion_rank:
            self.fusion_text = nn.ModuleList(nn.Linear(H, fusion_rank, bias=False) for _ in self.fusion_slots)
            self.fusion_out = nn.ModuleList(nn.Linear(fusion_rank, H, bias=False) for _ in self.fusion_slots)
            for out in self.fusion_out:
                nn.init.zeros_(out.weight)
        if visual_grid:
            self.cell_embedding = nn.Parameter(torch.randn(visual_grid * visual_grid, H) * 0.02)
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

    def _per_row(self, per_image: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, ...) the mean over each row's images of a per-image tensor (zeros on text-only rows), and the
        (B,) mask of the rows that have an image."""
        rows = self.image_rows(batch)
        total = per_image.new_zeros(batch, *per_image.shape[1:]).index_add(0, rows, per_image)
        count = per_image.new_zeros(batch).index_add(0, rows, per_image.new_ones(rows.shape[0]))
        return total / count.clamp(min=1).view(-1, *[1] * (per_image.dim() - 1)), count > 0

    def _pooled(self) -> torch.Tensor:
        """(M, D_v) the global feature of each image: its CLS token, or the mean over its tokens."""
        features = self.features()
        return features[:, 0] if self.context.has_cls else features.mean(dim=1)

    def _with_images(self, batch: int, build):
        """`build()` once per LLM call when some row of the batch has an image, else None."""
        if not self.has_visual_context or self.image_rows(batch).numel() == 0:
            return None
        return self.derived((build.__name__, batch), build)

    def _row_visual(self, batch: int) -> torch.Tensor | None:
        """(B, H): each row's projected global image feature (zeros on text-only rows), once per LLM call."""
        def visual():
            return self._per_row(self.visual_proj(self._pooled()), batch)[0]

        return self._with_images(batch, visual)

    def _row_fusion(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """((B, r) the image side of the fusion per row, (B,) rows with an image): tanh(image(v)) for bilinear,
        image(projected v) for mlp; the hook masks text-only rows out."""
        def fusion():
            if self.fusion == "mlp":
                return self.fusion_image(self._row_visual(batch)), self._per_row(self._pooled()[:, :1], batch)[1]
            image, has_image = self._per_row(self.fusion_image(self._pooled()), batch)
            return torch.tanh(image), has_image

        return self._with_images(batch, fusion)

    def _row_tokens(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, g², H) projected grid cells per row and a (B,) mask of the rows that have an image."""
        def tokens():
            features = self.features()
            patches = features[:, 1:] if self.context.has_cls else features
            h, w = self.context.grid
            grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)
            g = self.visual_grid
            cells = nn.functional.adaptive_avg_pool2d(grid, (g, g)).flatten(2).transpose(1, 2)  # (M, g², D_v)
            return self._per_row(self.visual_proj(cells) + self.cell_embedding, batch)  # (M, g², H) → rows

        return self._with_images(batch, tokens)

    def _attention_hook(self, slot: int, layer: int, attn: nn.Module):
        s = self.shape
        scaling = getattr(attn, "scaling", s.head_dim ** -0.5)

        def hook(hidden: torch.Tensor, kwargs: dict, output: torch.Tensor):
            B, T, _ = hidden.shape
            prompt = self.prompts[slot].unsqueeze(0)  # (1, P, H): shared by all rows unless an image is added
            present = None  # (B, P + g²) which prompt tokens a row attends to, when some rows lack an image
            if self.visual_grid:
                tokens = self._row_tokens(B)
                if tokens is not None:
                    cells, has_image = tokens
                    prompt = torch.cat([prompt.expand(B, -1, -1), cells], dim=1)
                    present = torch.cat([has_image.new_ones(B, self.prompts.shape[1]),
                                         has_image[:, None].expand(-1, cells.shape[1])], dim=1)
            else:
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
            scores = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, h, T, P [+ g²])
            if present is not None:
                scores = scores.masked_fill(~present.to(scores.device)[:, None, None, :], float("-inf"))
            probs = scores.softmax(dim=-1)
            out = (probs @ v.float()) * gate[None, :, None, None]
            if self.record_attention:
                self.last_attention[f"prompt_{layer}"] = probs.detach()
                self.last_attention[f"gate_{layer}"] = gate.detach()
            y = merge_heads(out).to(output.dtype)
            delta = attn.o_proj(y) - attn.o_proj(y.new_zeros(1, 1, y.shape[-1]))  # o_proj's bias not added twice
            if slot in self.fusion_slots:
                image = self._row_fusion(B)
                if image is not None:
                    f = self.fusion_slots.index(slot)
                    image, has_image = image
                    if self.fusion == "mlp":  # GELU(text + image): conjunctions of question words and image
                        text = self.fusion_text[f](self.fusion_text_norm[f](self.to_modules(hidden)))
                        mixed = nn.functional.gelu(text + image[:, None, :])
                    else:
                        mixed = torch.tanh(self.fusion_text[f](self.to_modules(hidden))) * image[:, None, :]
                    mixed = mixed * has_image[:, None, None]
                    delta = delta + self.fusion_out[f](mixed).to(delta.dtype)
            return output + delta

        return hook
