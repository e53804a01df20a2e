"""CNN encoders: the embedded MobileNetV2 / EfficientNet-Lite0 and any torchvision classification model.

A CNN's last feature map (B, C, h, w) becomes h*w visual tokens of width C (7×7 = 49 at 224 px).
`spec.layer` counts blocks of the feature stack from the end (-1 = all blocks, -2 = drop the last).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..assets import asset_path
from ..config import EncoderSpec
from ..errors import ConfigError, OfflineError
from . import ENCODERS
from .base import VisionEncoder


def _load_weights(module: nn.Module, path: Path, strict: bool = True) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle code
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("classifier", "fc.", "_fc"))]
    if strict and (missing or unexpected):
        raise ConfigError(f"Checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class CNNEncoder(VisionEncoder):
    """Wraps a stack of feature blocks (an nn.Sequential or a callable) ending in a spatial feature map."""

    def __init__(self, spec: EncoderSpec, blocks: nn.Module, image_size: int, mean, std):
        super().__init__(spec)
        self.blocks = blocks
        self.image_size = spec.image_size or image_size
        self.mean, self.std = tuple(mean), tuple(std)
        with torch.no_grad():
            probe = self.blocks.eval()(torch.zeros(1, 3, self.image_size, self.image_size))
        self.feature_dim = int(probe.shape[1])
        self.grid = (int(probe.shape[2]), int(probe.shape[3]))

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        fmap = self.blocks(pixel_values)
        return fmap.flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h*w, C), row-major


def _truncate(features: nn.Sequential, layer: int, name: str) -> nn.Sequential:
    n = len(features)
    if layer == -1:
        return features
    if not -n < layer < n:
        raise ConfigError(f"encoder.layer {layer} is out of range for {name}: it has {n} feature blocks")
    stop = layer + 1 if layer >= 0 else n + layer + 1
    return features[:stop]


@ENCODERS.register("mobilenet_v2", backend="torchvision", offline=True, grid="7×7", dim=1280,
                   description="MobileNetV2, ImageNet-1k (embedded, 3.5M params)")
def mobilenet_v2(spec: EncoderSpec) -> VisionEncoder:
    from torchvision.models import mobilenet_v2 as build

    from .base import IMAGENET_MEAN, IMAGENET_STD

    model = build()
    if spec.weights != "random":
        _load_weights(model, Path(spec.pretrained) if spec.pretrained else asset_path("mobilenet_v2"))
    return CNNEncoder(spec, _truncate(model.features, spec.layer, "mobilenet_v2"), 224, IMAGENET_MEAN, IMAGENET_STD)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite's stem + blocks + head as one module (the package keeps them apart)."""

    def __init__(self, net: nn.Module, n_blocks: int, head: bool):
        super().__init__()
        self.net, self.n_blocks, self.head = net, n_blocks, head

    def forward(self, x):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks[: self.n_blocks]):
            rate = net._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(net._blocks)
            x = block(x, drop_connect_rate=rate)
        if self.head:
            x = net._swish(net._bn1(net._conv_head(x)))
        return x


@ENCODERS.register("efficientnet_lite0", backend="torchvision", offline=True, grid="7×7", dim=1280,
                   description="EfficientNet-Lite0, ImageNet (embedded, 4.7M params)")
def efficientnet_lite0(spec: EncoderSpec) -> VisionEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if spec.weights != "random":
        _load_weights(net, Path(spec.pretrained) if spec.pretrained else asset_path("efficientnet_lite0"))
    n = len(net._blocks)
    if spec.layer == -1:
        blocks = _LiteFeatures(net, n, head=True)
    elif -n - 1 <= spec.layer < -1:
        blocks = _LiteFeatures(net, n + spec.layer + 1, head=False)
    else:
        raise ConfigError(f"encoder.layer {spec.layer} is out of range for efficientnet_lite0 (-1 … {-n - 1})")
    mean = (127.5 / 255,) * 3  # the package expects (x - 127.5) / 128
    std = (128 / 255,) * 3
    return CNNEncoder(spec, blocks, 224, mean, std)


@ENCODERS.register("torchvision", backend="torchvision", offline=False,
                   description="Any torchvision classification CNN by name (model: resnet50, convnext_tiny, …)")
def torchvision_any(spec: EncoderSpec) -> VisionEncoder:
    import torchvision.models as tvm

    from .base import IMAGENET_MEAN, IMAGENET_STD

    name = spec.model or "resnet18"
    if name not in tvm.list_models(module=tvm):
        raise ConfigError(f"Unknown torchvision model '{name}'. Valid: {', '.join(tvm.list_models(module=tvm))}")
    if spec.weights == "random":
        model = tvm.get_model(name)
    elif spec.pretrained and Path(spec.pretrained).is_file():
        model = tvm.get_model(name)
        _load_weights(model, Path(spec.pretrained))
    elif spec.pretrained:  # a weights enum name such as DEFAULT: downloads, so needs the network
        from ..hub import is_offline

        if is_offline():
            raise OfflineError(f"Encoder weights '{name}:{spec.pretrained}' need a download and the network is "
                               f"unreachable. Embedded offline encoders: mobilenet_v2, efficientnet_lite0.")
        model = tvm.get_model(name, weights=spec.pretrained)
    else:
        model = tvm.get_model(name)  # random weights: for tests and from-scratch experiments
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        blocks = _truncate(model.features, spec.layer, name)
    else:  # ResNet-style: everything before global pooling
        children = [m for n_, m in model.named_children() if n_ not in ("avgpool", "fc", "classifier")]
        blocks = _truncate(nn.Sequential(*children), spec.layer, name)
    return CNNEncoder(spec, blocks, 224, IMAGENET_MEAN, IMAGENET_STD)
