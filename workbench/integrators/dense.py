"""Dense projectors: every encoder token becomes one LLM token (LLaVA's linear, LLaVA-1.5's MLP)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import INTEGRATORS
from .base import Integrator, IntegratorContext, InputNorm, TextScaleNorm, input_norm_layer, one_token_per_encoder_token

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class _TokenProjector(Integrator):
    def __init__(self, context: IntegratorContext, input_norm: InputNorm, output_norm: bool):
        super().__init__(context)
        # CNN features are unnormalised (post-ReLU6 for MobileNetV2); a LayerNorm in front steadies training,
        # and one behind keeps visual tokens at the text embeddings' scale. Both on by default;
        # input_norm=false, output_norm=false give LLaVA's projector exactly.
        self.norm = input_norm_layer(input_norm, context.vision_dim)
        self.out_norm = TextScaleNorm(context) if output_norm else nn.Identity()

    @property
    def num_tokens(self) -> int:
        return self.context.num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        return self.out_norm(self.proj(self.norm(features)))

    def patch_map(self) -> torch.Tensor:
        """One visual token per patch (identity); a kept CLS token summarises the whole image (uniform row)."""
        return one_token_per_encoder_token(self.context)


@INTEGRATORS.register("linear", family="dense projector", follows="LLaVA (Liu et al., 2023)",
                      paradigms=["single-stage", "two-stage"], placement="prefix",
                      description="One linear map per visual token")
class LinearProjector(_TokenProjector):
    """One linear map per visual token (LLaVA's projector).

    Options:
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
    """

    def __init__(self, context: IntegratorContext, input_norm: InputNorm = True, output_norm: bool = True):
        super().__init__(context, input_norm, output_norm)
        self.proj = nn.Linear(context.vision_dim, context.llm_hidden)


@INTEGRATORS.register("mlp", family="dense projector", follows="LLaVA-1.5 (Liu et al., 2024)",
                      paradigms=["single-stage", "two-stage", "direct"], placement="prefix",
                      description="MLP with GELU per visual token (depth 2 = LLaVA-1.5's mlp2x_gelu)")
class MLPProjector(_TokenProjector):
    """An MLP per visual token (LLaVA-1.5's mlp2x_gelu at depth 2).

    Options:
        depth: linear layers in the MLP; 2 is LLaVA-1.5's (at least 1)
        hidden_dim: width between the layers; empty = the LLM's width (at least 1)
        activation: nonlinearity between the layers
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
        dropout: dropout between the layers while training (between 0 and 1)
    """

    def __init__(self, context: IntegratorContext, depth: int = 2, hidden_dim: int | None = None,
                 activation: Literal["gelu", "relu", "silu"] = "gelu", input_norm: InputNorm = True,
                 output_norm: bool = True, dropout: float = 0.0):
        super().__init__(context, input_norm, output_norm)
        if depth < 1:
            raise ValueError("depth must be at least 1")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}")
        hidden = hidden_dim or context.llm_hidden
        layers: list[nn.Module] = []
        width = context.vision_dim
        for i in range(depth):
            last = i == depth - 1
            layers.append(nn.Linear(width, context.llm_hidden if last else hidden))
            if not last:
                layers.append(_ACTIVATIONS[activation]())
                if dropout:
                    layers.append(nn.Dropout(dropout))
            width = hidden
        self.proj = nn.Sequential(*layers)
