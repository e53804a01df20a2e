"""The integrator seam: what every modality integrator receives, returns, and how it reaches the LLM.

Two placements exist (see DESIGN.md):
- "prefix": the integrator turns encoder features into visual tokens that replace each `<image>`
  placeholder in the LLM's input embeddings (linear, MLP, Q-Former, resampler, C-Abstractor, pooling).
- "in_llm": the integrator adds modules inside the LLM's layers (gated cross-attention, adapters,
  zero-init prompts). It is `attach`ed to the LLM once, and before every LLM call it is given the
  visual features of the batch through `set_visual_context`. It may still emit a few prefix tokens
  (e.g. one media marker per image) through `forward`.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def input_norm_layer(kind: bool | str, dim: int) -> nn.Module:
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

    Unnormalised projectors trained against a frozen LLM drift to huge token norms (measured: 228 vs
    3.2 for SmolLM2's text embeddings after 300 steps), which swamp the residual stream and slow
    learning. Pinning the scale at the text embeddings' keeps visual and text tokens comparable.
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
        self.last_attention: dict[str, torch.Tensor] = {}

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
