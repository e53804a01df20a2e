"""What every image encoder gives the rest of the workbench: patch features, their grid, its preprocessing."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn

from ..config import EncoderSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """Base class: subclasses set `image_size`, `mean`, `std`, `feature_dim`, `grid`, `has_cls` and implement `extract`.

    `forward(pixel_values)` returns (B, N, D) features: N = h*w patch tokens in row-major grid order,
    preceded by the CLS token when `spec.use_cls` and the encoder has one. `grid` = (h, w) is what
    attention maps are laid back onto.
    """

    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    feature_dim: int
    grid: tuple[int, int]
    has_cls: bool = False

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec

    # -- to implement
    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, N, D) with the CLS token first if `has_cls` (it is dropped later if unwanted)."""
        raise NotImplementedError

    # -- shared behaviour
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + (1 if self.keeps_cls else 0)

    @property
    def keeps_cls(self) -> bool:
        return self.has_cls and self.spec.use_cls

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self, frozen: bool = True) -> "VisionEncoder":
        for p in self.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            super().train(False)  # frozen BatchNorm / dropout must behave as at inference
        return self

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters(), None)
        if param is not None:
            pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.extract(pixel_values)
        if self.has_cls and not self.spec.use_cls:
            feats = feats[:, 1:]
        return feats

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images → normalised (B, 3, S, S) float tensor, squared as `spec.image_aspect` says."""
        out = []
        for image in images:
            t = TF.to_dtype(TF.to_image(self.square_view(image)), torch.float32, scale=True)
            out.append(TF.normalize(t, list(self.mean), list(self.std)))
        return torch.stack(out)

    def square_view(self, image: Image.Image) -> Image.Image:
        """The image as the encoder sees it (RGB, squared per `spec.image_aspect`, resized): the patch grid
        covers exactly this picture, so attention maps are drawn over it."""
        size = self.image_size
        image = image.convert("RGB")
        if self.spec.image_aspect == "pad":
            image = _pad_to_square(image, tuple(int(m * 255) for m in self.mean))
        elif self.spec.image_aspect == "crop":
            side = min(image.size)
            image = TF.center_crop(image, [side, side])
        return image.resize((size, size), Image.BICUBIC)

    def fingerprint(self) -> str:
        """Identity of (weights, layer, preprocessing): the key a feature cache must use."""
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in asdict(self.spec).items() if k != "frozen"}, sort_keys=True).encode())
        h.update(json.dumps([type(self).__name__, self.image_size, self.mean, self.std]).encode())
        for name, tensor in sorted(self.state_dict().items())[:64]:
            h.update(name.encode())
            flat = tensor.detach().flatten()
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas
