"""Flamingo's gated cross-attention (Alayrac et al., 2022), inside a frozen LLM through hooks.

- A Perceiver-style resampler (lite): `num_latents` learned latents cross-attend to the image's encoder
  tokens (projected to `hidden_dim`, plus learned position embeddings) and pass an FFN, `resampler_depth`
  times. Keys are the image tokens only (Flamingo also lets latents attend to themselves), so the recorded
  latent→patch attention is a distribution over the patches.
- Before every `every`-th decoder layer (0, every, 2·every, …) a GATED XATTN-DENSE block:
      x = x + tanh(alpha_attn) · xattn(LN(x), visual)
      x = x + tanh(alpha_ffn)  · ffn(LN(x))
  with both alphas initialised at exactly 0, so the LLM is unchanged at initialisation. Text tokens of a
  row attend to all visual tokens of that row's image(s) (num_images × num_latents keys); rows without an
  image are left untouched.
- In the sequence each `<image>` becomes ONE learned media-marker token (Flamingo's <image> tag).

With `record_attention`, `last_attention` (an `AttentionRecord`) holds the resampler's latent→patch attention
per resampler layer in `latent_to_image` (num_images, heads, num_latents, N), and per block the text→visual
attention in `text_to_latent[layer]` (B, heads, T, V; zeros on rows without an image and for padded image
slots) and its attention gate tanh(alpha_attn) in `gates[layer]`.
"""
from __future__ import annotations

import torch
from torch import nn

from . import INTEGRATORS
from .base import IntegratorContext
from .convolutional import AvgPoolProjector, whole_image_token
from .llm_layers import HookSet, InLLMIntegrator, attention, llm_shape, marker_token, merge_heads, split_heads


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, inner: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, dim))


class LatentResampler(nn.Module):
    """Learned latents cross-attending to one image's tokens: (M, N, D_v) → (M, num_latents, dim).

    With `whole_image` (average pooling to one token at the latents' width) that token comes first, beside
    the latents, as the prefix abstractors' `global_token`: queries learn where before what colour."""

    def __init__(self, vision_dim: int, num_input_tokens: int, dim: int, num_latents: int, heads: int,
                 ffn_mult: int, depth: int, whole_image: AvgPoolProjector | None = None):
        super().__init__()
        self.heads = heads
        self.whole_image = whole_image
        self.input = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim))
        self.position = nn.Parameter(torch.randn(num_input_tokens, dim) * 0.02)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "norm_q": nn.LayerNorm(dim), "norm_kv": nn.LayerNorm(dim),
                "q": nn.Linear(dim, dim, bias=False), "kv": nn.Linear(dim, 2 * dim, bias=False),
                "out": nn.Linear(dim, dim, bias=False), "ffn": _FeedForward(dim, ffn_mult * dim),
            }))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The latents, and each layer's latent→token attention (M, heads, num_latents, N)."""
        x = self.input(features) + self.position
        lat = self.latents.expand(features.shape[0], -1, -1)
        maps = []
        for layer in self.layers:
            kv = layer["norm_kv"](x)
            k, v = layer["kv"](kv).chunk(2, dim=-1)
            q = layer["q"](layer["norm_q"](lat))
            out, probs = attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads))
            maps.append(probs)
            lat = lat + layer["out"](merge_heads(out))
            lat = lat + layer["ffn"](lat)
        if self.whole_image is not None:
            lat = torch.cat([self.whole_image(features).to(lat.dtype), lat], dim=1)
            maps = [torch.cat([self._whole_image_row(m), m], dim=-2) for m in maps]
        return self.norm(lat), maps

    def _whole_image_row(self, maps: torch.Tensor) -> torch.Tensor:
        """The whole-image token's row of a latent→token map (M, heads, L, N): every patch alike, a CLS none."""
        row = self.whole_image.receptive_field().to(maps)  # (1, h·w)
        if row.shape[-1] < maps.shape[-1]:
            row = torch.cat([row.new_zeros(1, maps.shape[-1] - row.shape[-1]), row], dim=-1)
        return row.expand(*maps.shape[:-2], 1, -1)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: tanh-gated cross-attention then tanh-gated FFN, gates at 0."""

    def __init__(self, llm_hidden: int, dim: int, heads: int, ffn_mult: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(llm_hidden)
        self.q = nn.Linear(llm_hidden, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, llm_hidden, bias=False)
        self.ffn = _FeedForward(llm_hidden, ffn_mult * dim)
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor):
        """x (R, T, H), visual (R, V, dim), mask (R, V) → (delta (R, T, H), text→visual probs (R, h, T, V))."""
        k, v = self.kv(visual).chunk(2, dim=-1)
        q = self.q(self.norm(x))
        out, probs = attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads), mask)
        d_attn = torch.tanh(self.alpha_attn) * self.out(merge_heads(out))
        d_ffn = torch.tanh(self.alpha_ffn) * self.ffn(x + d_attn)
        return d_attn + d_ffn, probs


@INTEGRATORS.register("gated_xattn", family="gated cross-attention", follows="Flamingo (Alayrac et al., 2022)",
                      paradigms=["single-stage", "two-stage"], placement="in_llm",
                      description="Resampled visual latents read by tanh-gated (zero-init) cross-attention "
                                  "blocks before every k-th LLM layer; one media-marker token per image")
class GatedCrossAttention(InLLMIntegrator):
    """Flamingo's gated cross-attention blocks inside the LLM (see the module docstring).

    Options:
        num_latents: resampled latents per image the LLM reads (at least 1)
        every: a gated cross-attention block before every k-th LLM layer, counted from the layer where the image
            enters (`model.visual_entry_layer`; 0 = the first) (at least 1)
        hidden_dim: width of the resampler and the blocks; empty = min(LLM width, 256) (at least 1)
        num_heads: attention heads (at least 1)
        ffn_mult: feed-forward width as a multiple of hidden_dim (at least 1)
        resampler_depth: resampler layers before the LLM (at least 1)
        global_token: one more latent first, the whole image average-pooled (as the prefix abstractors'; on by default)
    """

    _needs = ()

    def __init__(self, context: IntegratorContext, num_latents: int = 16, every: int = 4, hidden_dim: int | None = None,
                 num_heads: int = 4, ffn_mult: int = 2, resampler_depth: int = 1, global_token: bool = True):
        super().__init__(context)
        shape = llm_shape(context, self.registry_name)
        if num_latents < 1 or every < 1 or num_heads < 1 or ffn_mult < 1 or resampler_depth < 1:
            raise ValueError("num_latents, every, num_heads, ffn_mult and resampler_depth must be at least 1")
        dim = hidden_dim or min(context.llm_hidden, 256)
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_llm_layers = shape.num_layers
        self.block_layers = list(range(context.entry_layer, shape.num_layers, every))
        whole_image = whole_image_token(context, True, width=dim) if global_token else None
        self.resampler = LatentResampler(context.vision_dim, context.num_input_tokens, dim, num_latents, num_heads,
                                         ffn_mult, resampler_depth, whole_image)
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttentionBlock(context.llm_hidden, dim, num_heads, ffn_mult)
                                     for i in self.block_layers})
        self.marker = marker_token(context)  # the <image> media token

    @property
    def num_tokens(self) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.marker.expand(features.shape[0], 1, -1)

    def llm_layers(self) -> list[int]:
        return list(self.block_layers)

    def _install(self, layers: nn.ModuleList, hooks: HookSet) -> None:
        for i in self.block_layers:
            hooks.on_input(layers[i], self._block_hook(i))

    def _visual(self, batch: int):
        """(rows, visual (R, n_max·num_latents, dim), mask) for the rows that have images, once per LLM call."""
        def build():
            groups = self.row_groups(batch)
            if groups is None:
                return None
            rows, index, valid = groups
            latents, maps = self.resampler(self.features())
            if self.record_attention:
                self.last_attention.latent_to_image.update((i, m.detach()) for i, m in enumerate(maps))
            R, n = index.shape
            L = latents.shape[1]
            visual = latents[index.clamp(min=0)].reshape(R, n * L, -1)
            mask = valid[:, :, None].expand(R, n, L).reshape(R, n * L)
            return rows, visual, mask

        return self.derived(("visual", batch), build)

    def _block_hook(self, layer: int):
        def hook(hidden: torch.Tensor, kwargs: dict):
            if not self.has_visual_context:
                return None
            ctx = self._visual(hidden.shape[0])
            if ctx is None:
                return None
            rows, visual, mask = ctx
            block = self.blocks[str(layer)]
            x = self.to_modules(hidden[rows.to(hidden.device)])
            delta, probs = block(x, visual, mask)
            if self.record_attention:
                full = probs.new_zeros(hidden.shape[0], *probs.shape[1:])
                full[rows] = probs.detach()
                self.last_attention.text_to_latent[layer] = full
                self.last_attention.gates[layer] = torch.tanh(block.alpha_attn.detach()).reshape(())
            return self.add_to_rows(hidden, rows, delta)

        return hook
