"""Image encoders behind one registry; `build_encoder(spec)` is the only entry point the rest uses."""
from __future__ import annotations

from ..config import EncoderSpec
from ..registry import Registry
from .base import VisionEncoder

ENCODERS: Registry = Registry("encoder")


def build_encoder(spec: EncoderSpec) -> VisionEncoder:
    builder = ENCODERS.get(spec.name)
    encoder = builder(spec)
    encoder.freeze(spec.frozen)
    return encoder


# Registration happens on import of each backend file.
from . import torchvision_cnn  # noqa: E402,F401
from . import open_clip_encoder  # noqa: E402,F401
from . import hf_vision  # noqa: E402,F401

__all__ = ["ENCODERS", "VisionEncoder", "build_encoder"]
