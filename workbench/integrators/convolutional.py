"""Convolutional abstractors and pooling: the encoder's patch grid is reshaped into a feature map and
reduced spatially, so neighbouring patches merge into fewer LLM tokens while keeping their layout
(Honeybee's C-Abstractor, MobileVLM's LDP, plain average pooling).

They work on the (h, w) grid only: a CLS token (ViT encoders) is dropped, except by `avg_pool` with
`keep_cls`. Output tokens are in row-major order of the reduced grid.

Each one has `receptive_field()`: a (num_tokens, h·w) matrix, rows summing to 1, saying how much each
output token draws on each input patch — exact for pooling, structural for the convolutions (see
`_SpatialTrace`) — which the attention views show where attention abstractors show their attention.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from . import INTEGRATORS
from .base import Integrator, IntegratorContext, InputNorm, TextScaleNorm, input_norm_layer


# ---------------------------------------------------------------------------------------------- shared pieces

def _square_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens) if isinstance(num_tokens, int) and num_tokens > 0 else 0
    if side * side != num_tokens or side == 0:
        raise ValueError(f"num_tokens must be a positive perfect square (4, 9, 16, 36, …: the output is a "
                         f"side×side grid), got {num_tokens}")
    return side


def _check_grid(context: IntegratorContext) -> None:
    h, w = context.grid
    if h < 1 or w < 1 or context.num_input_tokens != h * w + int(context.has_cls):
        raise ValueError(f"the encoder's grid {h}×{w}{' plus CLS' if context.has_cls else ''} does not match its "
                         f"{context.num_input_tokens} tokens")


class _GridIntegrator(Integrator):
    """Input LayerNorm and output TextScaleNorm (both optional, as dense.py), and the tokens → (B, C, h, w)
    map reshape with CLS split off."""

    def __init__(self, context: IntegratorContext, input_norm: InputNorm, output_norm: bool):
        super().__init__(context)
        _check_grid(context)
        # CNN features are unnormalised (post-ReLU6 for MobileNetV2): LayerNorm in front; behind, visual
        # tokens are put at the scale of the LLM's text embeddings (see TextScaleNorm).
        self.norm = input_norm_layer(input_norm, context.vision_dim)
        self.out_norm = TextScaleNorm(context) if output_norm else nn.Identity()

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, N, D) → (CLS (B, D) or None, patch tokens (B, h·w, D)), after the input norm."""
        self.check_features(features)
        x = self.norm(features)
        if self.context.has_cls:
            return x[:, 0], x[:, 1:]
        return None, x

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.context.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def patch_map(self) -> torch.Tensor:
        return self.receptive_field()

    @staticmethod
    def _to_tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at each position of a (B, C, H, W) map (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _SqueezeExcite(nn.Module):
    """Channel gating from the global average (Hu et al., 2018); `gate` is sigmoid or hard-sigmoid."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class _SpatialTrace:
    """Pushes one-hot maps of the input patches through a linearised model of the spatial ops.

    Every op is modelled as a row-stochastic averaging: a k×k convolution (padding k//2) as the plain mean
    over the in-grid part of its window, a residual block as ½·identity + ½·its branch, pooling as itself
    (exact). Channel-wise ops (1×1 convs, norms, activations) do not move information between positions
    and are left out, and so is squeeze-excite (a global per-channel gate). So the result is the
    structural receptive field with equal weights, not a gradient-based effective receptive field of the
    trained weights. Every op maps a constant map to the same constant, so rows sum to 1.
    """

    def __init__(self, grid: tuple[int, int]):
        h, w = grid
        self.x = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)

    def conv(self, kernel: int = 3, stride: int = 1) -> "_SpatialTrace":
        self.x = _window_mean(self.x, kernel, stride)
        return self

    def residual_conv(self, kernel: int = 3) -> "_SpatialTrace":
        self.x = 0.5 * (self.x + _window_mean(self.x, kernel, 1))
        return self

    def pool(self, side: int) -> "_SpatialTrace":
        self.x = F.adaptive_avg_pool2d(self.x, (side, side))
        return self

    def matrix(self) -> torch.Tensor:
        """(output positions, h·w)."""
        P = self.x.shape[0]
        return self.x.reshape(P, -1).T.contiguous().float()


def _window_mean(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    ones = torch.ones(1, 1, kernel, kernel, dtype=x.dtype)
    total = F.conv2d(x, ones, stride=stride, padding=kernel // 2)
    count = F.conv2d(torch.ones_like(x[:1]), ones, stride=stride, padding=kernel // 2)
    return total / count


def _mlp(width_in: int, hidden: int, width_out: int, depth: int, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    layers: list[nn.Module] = []
    width = width_in
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Linear(width, width_out if last else hidden))
        if not last:
            layers.append(act())
        width = hidden
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------- C-Abstractor

class _RegBlock(nn.Module):
    """Honeybee's ResBlock (timm RegNet Bottleneck, bottle ratio 1, group size 1 = depthwise 3×3, SE 0.25,
    LayerNorm2d, SiLU): 1×1 → dw 3×3 → SE → 1×1, plus a (projected when widths differ) shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), _LayerNorm2d(c_out), nn.SiLU())
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=False),
                                   _LayerNorm2d(c_out), nn.SiLU())
        self.se = _SqueezeExcite(c_out, max(1, round(c_in * 0.25)), nn.ReLU, nn.Sigmoid)
        self.conv3 = nn.Sequential(nn.Conv2d(c_out, c_out, 1, bias=False), _LayerNorm2d(c_out))
        self.shortcut = (nn.Identity() if c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), _LayerNorm2d(c_out)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.shortcut(x))


@INTEGRATORS.register("c_abstractor", family="convolutional abstractor", follows="Honeybee C-Abstractor (Cha et al., 2024)",
                      paradigms=["single-stage", "two-stage"], placement="prefix",
                      description="ResNet blocks, adaptive average pooling to num_tokens, ResNet blocks, MLP: "
                                  "fewer tokens that keep local context")
class CAbstractor(_GridIntegrator):
    """Honeybee's C-Abstractor (Cha et al., 2024): locality-preserving token reduction.

    The patch tokens (CLS dropped) get a learned position embedding (Honeybee's pos_emb), become a
    (vision_dim, h, w) map, pass `depth` ResBlocks to `hidden_dim` channels, are adaptively average-pooled
    to a √num_tokens × √num_tokens grid, pass `depth` more ResBlocks, and an MLP (Linear, SiLU, Linear, as
    Honeybee's readout) maps each position to the LLM's width. A grid smaller than the target is
    upsampled by the pooling (patches repeat), so the patch tokens are always exactly `num_tokens`.
    Honeybee uses depth 3 and hidden 1024 for a 7B LLM; hidden 256 suits a ~135M one.

    Options:
        num_tokens: patch tokens per image, a square number; the global token adds one (at least 1)
        depth: ResNet blocks before and after the pooling (at least 1)
        hidden_dim: channels of the ResNet blocks (at least 1)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
        position_embedding: learned position embedding on the patch tokens
        global_token: one more token first, the whole image average-pooled (see whole_image_token; on by default)
    """

    def __init__(self, context: IntegratorContext, num_tokens: int = 16, depth: int = 3, hidden_dim: int = 256,
                 input_norm: InputNorm = True, output_norm: bool = True, position_embedding: bool = True,
                 global_token: bool = True):
        side = _square_side(num_tokens)
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be at least 1, got {hidden_dim}")
        super().__init__(context, input_norm, output_norm)
        self.side = side
        self.depth = depth
        h, w = context.grid
        self.position = nn.Parameter(torch.randn(h * w, context.vision_dim) * 0.02) if position_embedding else None
        self.s1 = nn.Sequential(*[_RegBlock(context.vision_dim if i == 0 else hidden_dim, hidden_dim)
                                  for i in range(depth)])
        self.s2 = nn.Sequential(*[_RegBlock(hidden_dim, hidden_dim) for _ in range(depth)])
        self.readout = _mlp(hidden_dim, context.llm_hidden, context.llm_hidden, 2, nn.SiLU)
        self.global_token = whole_image_token(context, input_norm) if global_token else None

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + int(self.global_token is not None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, x = self._split(features)
        if self.position is not None:
            x = x + self.position
        x = self.s1(self._to_map(x))
        x = F.adaptive_avg_pool2d(x, (self.side, self.side))
        x = self.s2(x)
        out = self.out_norm(self.readout(self._to_tokens(x)))
        return with_whole_image_token(self.global_token, features, out)

    def receptive_field(self) -> torch.Tensor:
        """(num_tokens, h·w): the depthwise 3×3 of each ResBlock as a residual window mean, then the pooling."""
        t = _SpatialTrace(self.context.grid)
        for _ in range(self.depth):
            t.residual_conv(3)
        t.pool(self.side)
        for _ in range(self.depth):
            t.residual_conv(3)
        m = t.matrix()
        return with_whole_image_row(self.global_token, m)


# ---------------------------------------------------------------------------------------------- LDP

class _InvertedResidual(nn.Module):
    """MobileNetV3's inverted residual with expansion 1 (as MobileVLM's LDP builds it from torchvision):
    depthwise 3×3 (stride s) + LayerNorm2d + Hardswish, SE (hard-sigmoid gate), pointwise 1×1 + LayerNorm2d;
    a residual when stride is 1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.residual = stride == 1
        self.dw = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                                _LayerNorm2d(channels), nn.Hardswish())
        squeeze = channels // 4  # torchvision's _make_divisible(channels // 4, 8)
        reduced = max(8, (squeeze + 4) // 8 * 8)
        reduced += 8 if reduced < 0.9 * squeeze else 0
        self.se = _SqueezeExcite(channels, reduced, nn.ReLU, nn.Hardsigmoid)
        self.pw = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), _LayerNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.se(self.dw(x)))
        return x + y if self.residual else y


@INTEGRATORS.register("ldp", family="convolutional abstractor", follows="MobileVLM LDP (Chu et al., 2023)",
                      paradigms=["single-stage", "two-stage"], placement="prefix",
                      description="Lightweight Downsample Projector: MLP, then depthwise-separable conv blocks "
                                  "with one stride-2 block (¼ of the tokens)")
class LightweightDownsampleProjector(_GridIntegrator):
    """MobileVLM's Lightweight Downsample Projector, v1 (Chu et al., 2023).

    A pointwise MLP (Linear, GELU, Linear) maps each patch to the LLM's width; the (llm_hidden, h, w) map
    then passes two MobileNetV3 inverted-residual blocks (depthwise 3×3 + SE + pointwise, LayerNorm2d,
    Hardswish), the first with stride 1 and a residual, the second with stride `stride` (2: 7×7 → 4×4,
    14×14 → 7×7, each side ⌈side/stride⌉). CLS is dropped. Stride 1 keeps every token.

    Options:
        stride: stride of the second block: 2 keeps ¼ of the tokens, 1 all (between 1 and 3)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
    """

    def __init__(self, context: IntegratorContext, stride: int = 2, input_norm: InputNorm = True, output_norm: bool = True):
        if stride not in (1, 2, 3):
            raise ValueError(f"stride must be 1, 2 or 3 (its depthwise kernel is 3×3), got {stride}")
        super().__init__(context, input_norm, output_norm)
        self.stride = stride
        H = context.llm_hidden
        self.mlp = _mlp(context.vision_dim, H, H, 2, nn.GELU)
        self.blocks = nn.Sequential(_InvertedResidual(H, 1), _InvertedResidual(H, stride))

    @property
    def out_grid(self) -> tuple[int, int]:
        h, w = self.context.grid
        return -(-h // self.stride), -(-w // self.stride)

    @property
    def num_tokens(self) -> int:
        h, w = self.out_grid
        return h * w

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, x = self._split(features)
        return self.out_norm(self._to_tokens(self.blocks(self._to_map(self.mlp(x)))))

    def receptive_field(self) -> torch.Tensor:
        """(num_tokens, h·w): the stride-1 block as a residual 3×3 window mean, the strided one as a 3×3
        window mean sampled every `stride` positions (residual too when `stride` is 1)."""
        t = _SpatialTrace(self.context.grid).residual_conv(3)
        return (t.residual_conv(3) if self.stride == 1 else t.conv(3, self.stride)).matrix()


# ---------------------------------------------------------------------------------------------- pooling

@INTEGRATORS.register("avg_pool", family="pooling", follows="DeCo (Yao et al., 2024)",
                      paradigms=["single-stage", "two-stage", "direct"], placement="prefix",
                      description="Adaptive average pooling of the patch grid to num_tokens, then an MLP")
class AvgPoolProjector(_GridIntegrator):
    """The simplest token reducer: adaptive average pooling of the (h, w) grid to √num_tokens × √num_tokens,
    then a `depth`-layer MLP with GELU per token (depth 1: linear). DeCo (Yao et al., 2024) argues this
    parameter-free compression plus an MLP does as well as learned abstractors; here it is their baseline.

    With `keep_cls` (encoders with a CLS token only) the CLS token goes through the same MLP and comes
    first, so the image takes num_tokens + 1 tokens. A grid smaller than the target is upsampled
    (patches repeat), so the count is always what is configured.

    Options:
        num_tokens: visual tokens per image after pooling, a square number (at least 1)
        depth: linear layers in the MLP after the pooling (at least 1)
        hidden_dim: width between the MLP layers; empty = the LLM's width (at least 1)
        keep_cls: also pass the CLS token (encoders that keep one only)
        input_norm: normalisation of the encoder features: layer (true), batch (per channel over the data) or none (false)
        output_norm: put visual tokens at the scale of the LLM's text embeddings
    """

    def __init__(self, context: IntegratorContext, num_tokens: int = 16, depth: int = 2, hidden_dim: int | None = None,
                 keep_cls: bool = False, input_norm: InputNorm = True, output_norm: bool = True):
        side = _square_side(num_tokens)
        if keep_cls and not context.has_cls:
            raise ValueError("keep_cls needs an encoder that keeps a CLS token (this one has none)")
        super().__init__(context, input_norm, output_norm)
        self.side = side
        self.keep_cls = keep_cls
        self.proj = _mlp(context.vision_dim, hidden_dim or context.llm_hidden, context.llm_hidden, depth)

    @property
    def num_tokens(self) -> int:
        return self.side * self.side + int(self.keep_cls)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cls, x = self._split(features)
        x = self._to_tokens(F.adaptive_avg_pool2d(self._to_map(x), (self.side, self.side)))
        if self.keep_cls:
            x = torch.cat([cls.unsqueeze(1), x], dim=1)
        return self.out_norm(self.proj(x))

    def receptive_field(self) -> torch.Tensor:
        """(num_tokens, h·w): the pooling windows (exact). A kept CLS token's row is uniform: it summarises
        the whole image."""
        m = _SpatialTrace(self.context.grid).pool(self.side).matrix()
        if self.keep_cls:
            m = torch.cat([torch.full((1, m.shape[1]), 1.0 / m.shape[1]), m])
        return m


# ---------------------------------------------------------------------------------------------- global token

def whole_image_token(context: IntegratorContext, input_norm: InputNorm, width: int | None = None) -> AvgPoolProjector:
    """The `global_token` option: average pooling to one token, put first, before the integrator's own.

    `width`: the token's width when it joins latents narrower than the LLM (gated cross-attention's resampler);
    it is then left unscaled, since the latents are normalised after it, not put at the text embeddings' scale.

    Abstractors that start from random queries or deep convolution stacks learn *where* (shape) well before
    *what colour* (bench/RESULTS.md); average pooling reads global properties from the first steps. A global
    view beside the local tokens is also what LLaVA-NeXT's base image and InternVL's thumbnail give their LLMs.
    On by default: with it, each of the abstractors and gated cross-attention learned colour within its usual
    step count.
    """
    if width is None:
        return AvgPoolProjector(context, num_tokens=1, input_norm=input_norm)
    return AvgPoolProjector(replace(context, llm_hidden=width), num_tokens=1, input_norm=input_norm, output_norm=False)


def with_whole_image_token(pool: AvgPoolProjector | None, features: torch.Tensor,
                           tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, llm_hidden) tokens with the whole-image token first (unchanged when there is none)."""
    return tokens if pool is None else torch.cat([pool(features).to(tokens.dtype), tokens], dim=1)


def with_whole_image_row(pool: AvgPoolProjector | None, patch_map: torch.Tensor) -> torch.Tensor:
    """A patch map ((T, h·w) or (images, T, h·w)) with the whole-image token's row (its pooling window) first."""
    if pool is None:
        return patch_map
    row = pool.receptive_field().to(patch_map).expand(*patch_map.shape[:-2], 1, -1)
    return torch.cat([row, patch_map], dim=-2)
