"""Modality integrators behind one registry. Each registration carries metadata the front ends show:
family, the model it follows, which paradigms it suits, and its placement (prefix or in_llm)."""
from __future__ import annotations

import inspect

from ..config import IntegratorSpec
from ..errors import ConfigError
from ..registry import Registry
from .base import Integrator, IntegratorContext

INTEGRATORS: Registry = Registry("integrator")


def build_integrator(spec: IntegratorSpec, context: IntegratorContext) -> Integrator:
    cls = INTEGRATORS.get(spec.name)
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n in params if n not in ("self", "context")]
    unknown = [k for k in spec.options if k not in valid]
    if unknown:
        raise ConfigError(
            f"Unknown option '{unknown[0]}' for integrator '{spec.name}'. Valid options: {', '.join(valid) or 'none'}"
        )
    try:
        return cls(context, **spec.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Integrator '{spec.name}' rejected its options {spec.options}: {e}") from None


from . import abstractors, convolutional, dense, gated_xattn, lavin, llama_adapter  # noqa: E402,F401

__all__ = ["INTEGRATORS", "Integrator", "IntegratorContext", "build_integrator"]
