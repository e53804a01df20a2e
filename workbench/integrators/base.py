"""The integrator seam: what every modality integrator receives, returns, and how it reaches the LLM.

Two placements exist:
- "prefix": the integrator turns encoder features into visual tokens that replace each `<image>`
  placeholder in the LLM's input embeddings (linear, MLP, Q-Former, resampler, C-Abstractor, pooling).
- "in_llm": the integrator adds modules inside the LLM's layers (gated cross-attention, adapters,
  zero-init prompts). It is `attach`ed to the LLM once, and before every LLM call it is given the
  visual features of the batch through `set_visual_context`. It may still emit a few prefix tokens
  (e.g. one media marker per image) through `forward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class IntegratorContext:
    """Facts about the neighbours an integrator is built for."""

    vision_dim: int
    """Width D_v of the encoder features."""
    num_input_tokens: int
    """N: encoder tokens per image (patches, plus CLS when kept)."""
    grid: tuple[int, int]
    """(h, w) of the patch tokens; with a CLS token it comes first and is not part of the grid."""
    has_cls: bool
    llm_hidden: int
    """Width of the LLM's input embeddings."""
    llm_config: object | None = None
    """The LLM's transformers config, for in-LLM integrators that need layer counts and heads."""
    text_embedding_norm: float | None = None
    """Mean L2 norm of the LLM's input embedding rows: the scale visual tokens should live at."""
    entry_layer: int = 0
    """The lowest decoder layer the image reaches (`model.visual_entry_layer`, resolved): visual tokens enter
    there, and in-LLM integrators put their modules at it and above, so the layers below see only text."""


@dataclass(eq=False)
class AttentionRecord:
    """What an integrator's last recorded forward saw, for the attention views: one typed field per kind of
    map, so a view asks for what it needs by name and an integrator cannot misspell a key it writes.

    Integrators fill it only while `record_attention` is on; every tensor is detached. Encoder-token
    positions follow the encoder's order (CLS first when the encoder keeps one, then the grid row by row).
    A record is falsy while nothing is in it.
    """

    latent_to_image: dict[int, torch.Tensor] = field(default_factory=dict)
    """Learned queries/latents reading the image (Q-Former, Perceiver resampler, gated cross-attention's
    resampler): layer → (images, heads, latents, N) attention over the encoder tokens, rows summing to 1."""
    latent_self: dict[int, torch.Tensor] = field(default_factory=dict)
    """Q-Former: block → (images, heads, queries, queries) query→query self-attention."""
    image_share: dict[int, torch.Tensor] = field(default_factory=dict)
    """Perceiver resampler: layer → (images, heads, latents) the share of each latent's attention that went to
    the image rather than to the latents (`latent_to_image` is renormalised over the image alone)."""
    text_to_latent: dict[int, torch.Tensor] = field(default_factory=dict)
    """Gated cross-attention: LLM layer → (B, heads, T, images·latents) text→latent attention (zeros on rows
    without an image and on padded image slots)."""
    text_to_prompt: dict[int, torch.Tensor] = field(default_factory=dict)
    """LLaMA-Adapter: LLM layer → (B, heads, T, prompt_length) query→adaption-prompt attention."""
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    """LLM layer → how far the integrator's attention is let into the LLM there: a scalar tanh(alpha) for gated
    cross-attention, one gate per head (heads,) for LLaMA-Adapter."""
    routes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    """LaVIN: (LLM layer, "attn" or "mlp") → (B, 2) routing weights per row (column 0 visual, 1 textual)."""
    visual_prompts: dict[int, torch.Tensor] = field(default_factory=dict)
    """Vectors at the LLM's hidden width that carry the image into a layer without being in the sequence
    (LLaMA-Adapter's adaption prompts with the image feature added): LLM layer → (B or 1, prompts, hidden).
    The logit lens decodes them where no visual token sits in the sequence."""

    def filled(self) -> dict[str, list]:
        """The fields that hold something, each with its sorted keys (layers; (layer, position) for routes)."""
        return {f.name: sorted(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}

    def __bool__(self) -> bool:
        return bool(self.filled())


def one_token_per_encoder_token(context: IntegratorContext) -> torch.Tensor:
    """The patch map of integrators that turn every encoder token into one visual token: identity on the grid,
    a kept CLS token (first) summarising the whole image (uniform row)."""
    h, w = context.grid
    m = torch.eye(h * w)
    if context.has_cls:
        m = torch.cat([torch.full((1, h * w), 1.0 / (h * w)), m])
    return m


class FeatureStandardizer(nn.BatchNorm1d):
    """Per-channel standardisation of encoder features with statistics gathered over the training images
    (BatchNorm without affine, on (..., C) tokens; running statistics are saved with the integrator).

    CNN features share a large image-independent component: on easy-VQA, MobileNetV2 tokens of a red and a
    yellow circle have cosine 0.999 after a per-token LayerNorm, and a projector trained on them stayed
    colour-blind (chance on colour questions after 190 steps) although a linear probe on standardised
    features reads the colour at 99.7%. Removing the dataset mean per channel exposes what differs.
    """

    def __init__(self, dim: int):
        super().__init__(dim, affine=False, momentum=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


InputNorm = Literal["layer", "batch", "none"] | bool
"""What `input_norm` options accept: a form offers these choices (true = layer, false = none)."""


def input_norm_layer(kind: InputNorm, dim: int) -> nn.Module:
    """The integrator's input normalisation: "layer" (True: per-token LayerNorm), "batch" (per-channel
    standardisation over the data, see FeatureStandardizer), or "none" (False)."""
    if kind is True or kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return FeatureStandardizer(dim)
    if kind is False or kind == "none" or kind is None:
        return nn.Identity()
    raise ValueError(f"input_norm must be layer, batch or none (or true/false), got {kind!r}")


class TextScaleNorm(nn.Module):
    """LayerNorm whose gain starts so that visual tokens have the L2 norm of the LLM's text embeddings.

    Unnormalised projectors trained against a frozen LLM drift to token norms far above the text
    embeddings', which swamp the residual stream and slow learning. Pinning the scale at the text
    embeddings' keeps visual and text tokens comparable.
    """

    def __init__(self, context: IntegratorContext):
        super().__init__()
        self.norm = nn.LayerNorm(context.llm_hidden)
        target = context.text_embedding_norm or context.llm_hidden ** 0.5
        with torch.no_grad():
            self.norm.weight.fill_(target / context.llm_hidden ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Integrator(nn.Module):
    """Base class. Subclasses define `forward(features) -> (B, T, llm_hidden)` and `num_tokens`."""

    registry_name: str
    placement: str
    """Both stamped onto the class by `INTEGRATORS.register`, with the rest of its declaration."""

    def __init__(self, context: IntegratorContext):
        super().__init__()
        self.context = context
        self.record_attention = False
        """When True, attention-based integrators keep their latest attention maps in `last_attention`
        (the attention views turn them into maps over image patches); off in training and chat."""
        self.last_attention = AttentionRecord()

    @property
    def num_tokens(self) -> int:
        """Visual tokens each `<image>` placeholder expands to."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_features(self, features: torch.Tensor) -> None:
        """Refuse features of another encoder shape with the numbers, before a matmul fails without them."""
        if features.dim() != 3 or features.shape[1] != self.context.num_input_tokens:
            raise ValueError(f"{type(self).__name__} was built for {self.context.num_input_tokens} encoder tokens "
                             f"per image, got features of shape {tuple(features.shape)}")

    def patch_map(self) -> torch.Tensor | None:
        """How each visual token draws on the encoder's grid patches: (num_tokens, h·w), or per image of the
        last forward (images, num_tokens, h·w); rows sum to 1. None when the visual tokens have no such path
        (adapters inside the LLM). Attention abstractors read it from the maps they recorded, so the
        attention views run their forward with `record_attention` on."""
        return None

    # -- in-LLM seam (no-ops for prefix integrators)
    def attach(self, llm: nn.Module) -> None:
        """Insert modules into the LLM's layers. Called once, after the LLM is loaded."""

    def set_visual_context(self, features: torch.Tensor | None, image_to_sample: torch.Tensor | None) -> None:
        """Give in-LLM modules the (num_images, N, D_v) features and the sample each image belongs to."""

    def llm_parameters(self) -> list[nn.Parameter]:
        """Parameters this integrator placed inside the LLM (saved and trained with the integrator)."""
        return []

    def llm_layers(self) -> list[int]:
        """The LLM layers (0 = first) this integrator puts modules in: what a diagram draws inside the LLM."""
        return []
