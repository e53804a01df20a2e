"""Image encoders behind one registry; `build_encoder(spec)` is the only entry point the rest uses."""
from __future__ import annotations

from ..config import EncoderSpec
from ..registry import Registry, discover
from .base import VisionEncoder

ENCODERS: Registry = Registry("encoder")


def build_encoder(spec: EncoderSpec) -> VisionEncoder:
    builder = ENCODERS.get(spec.name)
    encoder = builder(spec)
    encoder.freeze(spec.frozen)
    return encoder


discover(__name__, __path__)  # each backend file registers itself: adding one is adding the file

__all__ = ["ENCODERS", "VisionEncoder", "build_encoder"]
