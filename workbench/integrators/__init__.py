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


def integrator_catalog(context: IntegratorContext | None = None) -> list[dict]:
    """Every registered integrator with its metadata (family, follows, paradigms, placement, description).

    With a `context` (an encoder + LLM pair, e.g. `model.integrator.context`), each is also built at its
    default options to report what it would cost there: trainable parameters and visual tokens per image
    (in-LLM integrators count the modules they put inside the LLM). One that cannot be built for that pair
    says why in `error` instead.
    """
    import torch

    rows = []
    for entry in INTEGRATORS.entries():
        row = {"name": entry.name, **entry.info}
        if context is not None:
            try:
                with torch.device("cpu"):
                    integrator = build_integrator(IntegratorSpec(name=entry.name), context)
                row["trainable_params"] = sum(p.numel() for p in integrator.parameters() if p.requires_grad)
                row["visual_tokens"] = integrator.num_tokens
            except Exception as e:  # noqa: BLE001 -- a catalog row says why, it does not stop the listing
                row["error"] = str(e).splitlines()[0]
        rows.append(row)
    return rows


from . import abstractors, convolutional, dense, gated_xattn, lavin, llama_adapter  # noqa: E402,F401

__all__ = ["INTEGRATORS", "Integrator", "IntegratorContext", "build_integrator", "integrator_catalog"]
