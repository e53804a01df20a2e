"""LaVIN's mixture-of-modality adaptation (Luo et al., 2023), on a frozen LLM through hooks.

- Prefix: every encoder token becomes one LLM token through a light bottleneck MLP (LaVIN's
  "visual adapter" AdapterMLP: LayerNorm, D_v → `proj_hidden` → GELU → LLM width, then the dense
  projectors' TextScaleNorm so the tokens sit at the text embeddings' scale; `input_norm` / `output_norm`
  turn the norms off). num_tokens is the encoder's token count (49 for MobileNetV2's 7×7 grid); no pooling.
- Mixture-of-modality adapters (MM-Adapters) in the LLM: in every adapted layer (option `layers`: "all",
  or an integer k for every k-th layer starting at 0), one adapter on the input of the self-attention and
  one on the input of the MLP (after the layer's norms, as LaVIN places its RepAdapters;
  option `positions`: "attn_mlp", "attn" or "mlp"). Each adapter has two bottleneck paths, visual and
  textual (down-proj to `bottleneck`, activation, dropout, up-proj initialised at zero so the LLM is
  unchanged at init):
      x' = x + w_vis · up_v(act(down_v(x))) + w_txt · up_t(act(down_t(x)))
  The routing weights (w_vis, w_txt) = softmax(router(m) / temperature) come, per batch row, from a
  learned modality token m: one embedding for rows with an image, one for text-only rows (LaVIN routes on
  the hidden state of its prepended modality token, which under causal attention is a function of that
  token alone). Each adapter has its own router. The router does not look at the row's text (e.g. its
  mean hidden state) on purpose: with a KV cache a decode step sees one new token, so such a router would
  route cached and uncached generation differently, and it would see the padding.

With `record_attention`, `last_attention.routes[(layer, position)]` holds each adapter's routing weights (B, 2)
(column 0 visual, column 1 textual).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import INTEGRATORS
from .base import IntegratorContext, InputNorm, TextScaleNorm, input_norm_layer, one_token_per_encoder_token
from .llm_layers import HookSet, InLLMIntegrator, llm_shape

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "none": nn.Identity}
_POSITIONS = {"attn_mlp": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}


class _Bottleneck(nn.Sequential):
    def __init__(self, dim: int, bottleneck: int, activation: str, dropout: float):
        up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        super().__init__(nn.Linear(dim, bottleneck), _ACTIVATIONS[activation](), nn.Dropout(dropout), up)


class MixtureOfModalityAdapter(nn.Module):
    """Two bottleneck paths (visual, textual) mixed by a per-row router over the modality token."""

    def __init__(self, dim: int, bottleneck: int, activation: str, dropout: float, temperature: float):
        super().__init__()
        self.visual = _Bottleneck(dim, bottleneck, activation, dropout)
        self.textual = _Bottleneck(dim, bottleneck, activation, dropout)
        self.router = nn.Linear(dim, 2)
        self.temperature = temperature

    def weights(self, modality: torch.Tensor) -> torch.Tensor:
        """(B, dim) modality tokens → (B, 2) routing weights."""
        return torch.softmax(self.router(modality) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) → the delta to add to x."""
        return weights[:, 0, None, None] * self.visual(x) + weights[:, 1, None, None] * self.textual(x)


@INTEGRATORS.register("lavin_mma", family="mixture-of-modality adapters", follows="LaVIN (Luo et al., 2023)",
                      paradigms=["single-stage", "direct"], placement="in_llm",
                      description="Bottleneck-MLP visual tokens plus zero-init visual/textual bottleneck "
                                  "adapters in the LLM layers, mixed per row by a modality router")
class LaVINAdapter(InLLMIntegrator):
    """LaVIN's mixture-of-modality adapters inside the LLM (see the module docstring).

    Options:
        bottleneck: width of each adapter's bottleneck (at least 1)
        layers: adapted LLM layers: all, or k for every k-th layer, from the layer where the image enters
            (`model.visual_entry_layer`; 0 = the first)
        positions: adapters on the self-attention input, the MLP input or both
        temperature: softmax temperature of the modality router (at least 0.001)
        activation: nonlinearity inside the adapters
        dropout: adapter dropout while training (between 0 and 1)
        proj_hidden: width of the visual tokens' bottleneck MLP (at least 1)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
    """

    _needs = ("self_attn", "mlp")

    def __init__(self, context: IntegratorContext, bottleneck: int = 8, layers: str | int = "all",
                 positions: Literal["attn_mlp", "attn", "mlp"] = "attn_mlp", temperature: float = 10.0,
                 activation: Literal["gelu", "relu", "silu", "none"] = "gelu",
                 dropout: float = 0.1, proj_hidden: int = 128, input_norm: InputNorm = True, output_norm: bool = True):
        super().__init__(context)
        shape = llm_shape(context, self.registry_name)
        if bottleneck < 1 or proj_hidden < 1:
            raise ValueError("bottleneck and proj_hidden must be at least 1")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}")
        if positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(_POSITIONS)}")
        if layers == "all":
            every = 1
        else:
            try:
                every = int(layers)
            except (TypeError, ValueError):
                raise ValueError(f"layers must be 'all' or an integer k (every k-th layer), not {layers!r}") from None
            if every < 1:
                raise ValueError("layers (every k-th layer) must be at least 1")
        self.num_llm_layers = shape.num_layers
        self.adapted_layers = list(range(context.entry_layer, shape.num_layers, every))
        self.positions = _POSITIONS[positions]
        dim = context.llm_hidden
        self.proj = nn.Sequential(input_norm_layer(input_norm, context.vision_dim),
                                  nn.Linear(context.vision_dim, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, dim),
                                  TextScaleNorm(context) if output_norm else nn.Identity())
        self.modality = nn.Embedding(2, dim)  # 0: text-only row, 1: row with an image
        self.adapters = nn.ModuleDict({
            f"{i}_{pos}": MixtureOfModalityAdapter(dim, bottleneck, activation, dropout, temperature)
            for i in self.adapted_layers for pos in self.positions
        })

    @property
    def num_tokens(self) -> int:
        return self.context.num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)

    def llm_layers(self) -> list[int]:
        return list(self.adapted_layers)

    def patch_map(self) -> torch.Tensor:
        """The prefix keeps one visual token per encoder token, so the attention views reach the patches."""
        return one_token_per_encoder_token(self.context)

    def _install(self, layers: nn.ModuleList, hooks: HookSet) -> None:
        for i in self.adapted_layers:
            for pos in self.positions:
                target = layers[i].self_attn if pos == "attn" else layers[i].mlp
                hooks.on_input(target, self._adapter_hook(i, pos))

    def _modality_tokens(self, batch: int) -> torch.Tensor:
        """(B, dim): the image / text-only modality embedding of each row, once per LLM call."""
        def build():
            has_image = torch.zeros(batch, dtype=torch.long, device=self.module_param.device)
            if self.has_visual_context:
                has_image[self.image_rows(batch)] = 1
            return self.modality(has_image)

        return self.derived(("modality", batch), build)

    def _adapter_hook(self, layer: int, pos: str):
        def hook(hidden: torch.Tensor, kwargs: dict):
            adapter = self.adapters[f"{layer}_{pos}"]
            # runs also without images: text-only rows are routed by the text-only modality token
            weights = adapter.weights(self._modality_tokens(hidden.shape[0]))
            if self.record_attention:
                self.last_attention.routes[layer, pos] = weights.detach()
            delta = adapter(self.to_modules(hidden), weights)
            return hidden + delta.to(device=hidden.device, dtype=hidden.dtype)

        return hook
