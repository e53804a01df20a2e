"""Attention abstractors: a fixed set of learned queries reads the image through cross-attention, so an
image costs the LLM the same few tokens whatever the encoder's patch count (BLIP-2's Q-Former,
Flamingo's Perceiver resampler).

Both keep fp32 master weights and write their attention probabilities into `last_attention` (an
`AttentionRecord`) when `record_attention` is on. Image-token positions are the encoder's token order: with a CLS token
(`context.has_cls`) position 0 is CLS and positions 1.. are the grid patches row by row; without one,
position p is grid patch p.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import INTEGRATORS
from .base import AttentionRecord, Integrator, IntegratorContext, InputNorm, TextScaleNorm, input_norm_layer
from .convolutional import whole_image_token, with_whole_image_row, with_whole_image_token


class _Attention(nn.Module):
    """Multi-head attention that can hand back its probabilities (B, heads, Q, K) for the attention views.

    Without probabilities it uses PyTorch's fused kernel; with them it computes softmax(QKᵀ/√d) explicitly
    (same result up to rounding). Recorded probabilities are taken before attention dropout.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, want_probs: bool = False):
        q, k, v = self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))
        p = self.dropout if self.training else 0.0
        probs = None
        if want_probs:
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
            out = F.dropout(probs, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        B, _, T, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(B, T, -1)), probs


def _feed_forward(dim: int, inner: int, dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.LayerNorm(dim), nn.Linear(dim, inner, bias=bias), nn.GELU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(inner, dim, bias=bias))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _check_attention_options(hidden_dim: int, num_heads: int, num_layers: int, count: int, count_name: str,
                             mlp_ratio: int, dropout: float) -> None:
    if count < 1:
        raise ValueError(f"{count_name} must be at least 1, got {count}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if hidden_dim < 1 or num_heads < 1:
        raise ValueError(f"hidden_dim and num_heads must be at least 1, got {hidden_dim} and {num_heads}")
    if hidden_dim % num_heads:
        raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
    if mlp_ratio < 1:
        raise ValueError(f"the FFN ratio must be at least 1, got {mlp_ratio}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class _AttentionAbstractor(Integrator):
    """Shared input side: LayerNorm (optional) + projection of the encoder tokens to the abstractor's width,
    plus a learned position embedding per encoder token (CNN features carry no position of their own).
    Shared output side: LayerNorm, projection to the LLM's width and (optional, as dense.py) a
    TextScaleNorm that puts visual tokens at the scale of the LLM's text embeddings."""

    def __init__(self, context: IntegratorContext, hidden_dim: int, input_norm: InputNorm, position_embedding: bool,
                 output_norm: bool, global_token: bool = False):
        super().__init__(context)
        self.global_token = whole_image_token(context, input_norm) if global_token else None
        # CNN features are unnormalised (post-ReLU6 for MobileNetV2): normalise before projecting, as dense.py.
        self.image_proj = nn.Sequential(input_norm_layer(input_norm, context.vision_dim),
                                        nn.Linear(context.vision_dim, hidden_dim))
        self.position = (nn.Parameter(torch.randn(context.num_input_tokens, hidden_dim) * 0.02)
                         if position_embedding else None)
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, context.llm_hidden)
        self.out_norm = TextScaleNorm(context) if output_norm else nn.Identity()

    def _output(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return with_whole_image_token(self.global_token, features,
                                      self.out_norm(self.out_proj(self.final_norm(tokens))))

    @property
    def num_tokens(self) -> int:
        return self._latents.shape[0] + int(self.global_token is not None)

    def patch_map(self) -> torch.Tensor | None:
        """(images, num_tokens, h·w): the recorded query→image cross-attention, averaged over heads and
        cross-attention layers, over the grid patches (a CLS column is dropped and rows renormalised)."""
        maps = list(self.last_attention.latent_to_image.values())
        if not maps:
            return None
        m = torch.stack(maps).float().mean(dim=(0, 2))  # (layers, B, heads, Q, N) → (B, Q, N)
        if self.context.has_cls:
            m = m[..., 1:]
        return with_whole_image_row(self.global_token, m / m.sum(dim=-1, keepdim=True).clamp_min(1e-12))

    def _image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        x = self.image_proj(features)
        return x + self.position if self.position is not None else x


class _QFormerBlock(nn.Module):
    """Pre-norm: queries self-attend, (optionally) cross-attend to the image tokens, then an FFN."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads, dropout)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_image = nn.LayerNorm(dim)
            self.cross_attn = _Attention(dim, heads, dropout)
        self.ffn = _feed_forward(dim, mlp_ratio * dim, dropout)

    def forward(self, q: torch.Tensor, image: torch.Tensor, want_probs: bool):
        h = self.norm_self(q)
        out, self_probs = self.self_attn(h, h, want_probs)
        q = q + out
        cross_probs = None
        if self.cross:
            out, cross_probs = self.cross_attn(self.norm_cross(q), self.norm_image(image), want_probs)
            q = q + out
        return q + self.ffn(q), self_probs, cross_probs


@INTEGRATORS.register("qformer", family="attention abstractor", follows="BLIP-2 (Li et al., 2023)",
                      paradigms=["single-stage", "two-stage"], placement="prefix",
                      description="Learned queries that self-attend and cross-attend to the image every k-th "
                                  "block (a small Q-Former); a fixed num_queries tokens per image")
class QFormer(_AttentionAbstractor):
    """BLIP-2's Querying Transformer (Li et al., 2023), small and without its text branch.

    `num_queries` learned query tokens pass `num_layers` pre-norm blocks: self-attention among the
    queries, cross-attention from the queries to the image tokens in blocks 0, k, 2k, … (k =
    `cross_attention_every`; BLIP-2 uses 2), then an FFN. The image tokens are LayerNorm-ed, projected
    to `hidden_dim` and given learned position embeddings (BLIP-2's ViT has its own; CNN features
    do not); the queries are finally projected to the LLM's width, as BLIP-2's fully connected layer.
    BLIP-2's Q-Former is a post-norm BERT initialised from BERT-base; this one is pre-norm and trained
    from scratch, which is what a single-stage run on a small LLM can afford.

    With `record_attention`, `last_attention.latent_to_image[i]` holds block i's query→image-token
    probabilities (B, heads, num_queries, N) (i = 0, k, 2k, …; rows sum to 1; position 0 is CLS when
    the encoder keeps one) and `last_attention.latent_self[i]` its query→query probabilities.

    Options:
        num_queries: learned queries, one visual token each; the global token adds one (at least 1); 16 by
            default where BLIP-2 has 32: each visual token is paid for in every LLM step, so fewer of them make
            many more steps in a lesson's minutes
        num_layers: transformer blocks the queries pass (at least 1)
        hidden_dim: width of the queries, divisible by num_heads (at least 1)
        num_heads: attention heads (at least 1)
        cross_attention_every: queries read the image in every k-th block; BLIP-2 uses 2 (at least 1)
        mlp_ratio: feed-forward width as a multiple of hidden_dim (at least 1)
        dropout: attention and feed-forward dropout while training (between 0 and 1)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
        position_embedding: learned position embedding on the image tokens
        global_token: one more token first, the whole image average-pooled (see whole_image_token; on by default)
    """

    def __init__(self, context: IntegratorContext, num_queries: int = 16, num_layers: int = 4,
                 hidden_dim: int = 256, num_heads: int = 4, cross_attention_every: int = 2, mlp_ratio: int = 4,
                 dropout: float = 0.0, input_norm: InputNorm = True, output_norm: bool = True,
                 position_embedding: bool = True, global_token: bool = True):
        _check_attention_options(hidden_dim, num_heads, num_layers, num_queries, "num_queries", mlp_ratio, dropout)
        if not 1 <= cross_attention_every <= num_layers:
            raise ValueError(f"cross_attention_every must be between 1 and num_layers ({num_layers}), "
                             f"got {cross_attention_every}")
        super().__init__(context, hidden_dim, input_norm, position_embedding, output_norm, global_token)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * 0.02)  # BLIP-2: N(0, 0.02)
        self.blocks = nn.ModuleList(
            _QFormerBlock(hidden_dim, num_heads, mlp_ratio, dropout, cross=i % cross_attention_every == 0)
            for i in range(num_layers))

    @property
    def _latents(self) -> torch.Tensor:
        return self.queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self._image_tokens(features)
        q = self.queries.expand(features.shape[0], -1, -1)
        record = self.record_attention
        if record:
            self.last_attention = AttentionRecord()
        for i, block in enumerate(self.blocks):
            q, self_probs, cross_probs = block(q, image, record)
            if record:
                self.last_attention.latent_self[i] = self_probs.detach()
                if cross_probs is not None:
                    self.last_attention.latent_to_image[i] = cross_probs.detach()
        return self._output(q, features)


class _ResamplerLayer(nn.Module):
    """Flamingo's PerceiverAttention + FFN: latents attend to concat(image tokens, latents)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, bias=False)  # Flamingo's projections have no bias
        self.ffn = _feed_forward(dim, ffn_mult * dim, bias=False)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, want_probs: bool):
        lat = self.norm_latents(latents)
        out, probs = self.attn(lat, torch.cat([self.norm_media(media), lat], dim=1), want_probs)
        latents = latents + out
        return latents + self.ffn(latents), probs


@INTEGRATORS.register("resampler", family="attention abstractor",
                      follows="Flamingo Perceiver resampler (Alayrac et al., 2022)",
                      paradigms=["single-stage", "two-stage"], placement="prefix",
                      description="Learned latents that cross-attend to the image tokens and themselves; "
                                  "a fixed num_latents tokens per image, whatever the patch count")
class PerceiverResampler(_AttentionAbstractor):
    """Flamingo's Perceiver resampler (Alayrac et al., 2022), as a prefix integrator.

    The image tokens are LayerNorm-ed, projected to `hidden_dim` and given learned position embeddings
    (one per encoder token; Flamingo's learned time embeddings, here over positions since each
    `<image>` is one frame). `num_latents` learned latents then pass `num_layers` layers of
    attention whose keys/values are concat(image tokens, latents) (Flamingo's choice) and an FFN, both
    residual; a final LayerNorm and a projection to the LLM's width follow. The output has
    `num_latents` tokens for any input size. Flamingo uses 6 layers and 64 latents at the vision width;
    the defaults here are sized for a ~135M LLM.

    With `record_attention`, `last_attention.latent_to_image[i]` holds layer i's latent→image-token
    attention (B, heads, num_latents, N) renormalised over the image tokens (rows sum to 1; position 0
    is CLS when the encoder keeps one), and `last_attention.image_share[i]` (B, heads, num_latents)
    the share of each latent's attention that went to the image rather than to the latents.

    Options:
        num_latents: learned latents, one visual token each; the global token adds one (at least 1); 16 by
            default, as the Q-Former's queries: fewer visual tokens, more LLM steps per minute
        num_layers: resampler layers (at least 1)
        hidden_dim: width of the latents, divisible by num_heads (at least 1)
        num_heads: attention heads (at least 1)
        ffn_mult: feed-forward width as a multiple of hidden_dim (at least 1)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
        global_token: one more token first, the whole image average-pooled (see whole_image_token; on by default)
    """

    def __init__(self, context: IntegratorContext, num_latents: int = 16, num_layers: int = 2,
                 hidden_dim: int = 256, num_heads: int = 4, ffn_mult: int = 4, input_norm: InputNorm = True,
                 output_norm: bool = True, global_token: bool = True):
        _check_attention_options(hidden_dim, num_heads, num_layers, num_latents, "num_latents", ffn_mult, 0.0)
        super().__init__(context, hidden_dim, input_norm, position_embedding=True, output_norm=output_norm,
                         global_token=global_token)
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim) * 0.02)
        self.layers = nn.ModuleList(_ResamplerLayer(hidden_dim, num_heads, ffn_mult) for _ in range(num_layers))

    @property
    def _latents(self) -> torch.Tensor:
        return self.latents

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self._image_tokens(features)
        N = media.shape[1]
        lat = self.latents.expand(features.shape[0], -1, -1)
        record = self.record_attention
        if record:
            self.last_attention = AttentionRecord()
        for i, layer in enumerate(self.layers):
            lat, probs = layer(lat, media, record)
            if record:
                image = probs[..., :N].detach()
                share = image.sum(dim=-1)
                self.last_attention.latent_to_image[i] = image / share.unsqueeze(-1)
                self.last_attention.image_share[i] = share
        return self._output(lat, features)
