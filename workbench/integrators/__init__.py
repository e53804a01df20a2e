"""Modality integrators behind one registry. Each registration carries metadata the front ends show:
family, the model it follows, which paradigms it suits, and its placement (prefix or in_llm).

Adding a family is one file in this folder with an `@INTEGRATORS.register(...)` class: the folder is
discovered on import, the registry stamps the declared name and metadata onto the class, and the CLI, the app,
the paradigms, the contract tests and the benchmarks iterate the registry."""
from __future__ import annotations

from ..config import IntegratorSpec
from ..errors import ConfigError
from ..registry import Registry, discover
from .base import Integrator, IntegratorContext

PLACEMENTS = ("prefix", "in_llm")


def _check_registration(name: str, cls: type, info: dict) -> None:
    """A family's declaration must agree with itself: the paradigms it names exist, and only a class that puts
    modules inside the LLM (overrides `attach`) says it lives there."""
    from ..paradigms import PARADIGMS

    if info["placement"] not in PLACEMENTS:
        raise ValueError(f"integrator '{name}': placement must be one of {', '.join(PLACEMENTS)}")
    inside = cls.attach is not Integrator.attach
    if (info["placement"] == "in_llm") != inside:
        raise ValueError(f"integrator '{name}': placement '{info['placement']}', but the class "
                         f"{'overrides' if inside else 'does not override'} attach (modules inside the LLM)")
    unknown = [p for p in info["paradigms"] if p not in PARADIGMS]
    if unknown:
        raise ValueError(f"integrator '{name}': unknown paradigm {unknown[0]}. Valid: {', '.join(PARADIGMS.names())}")


INTEGRATORS: Registry = Registry("integrator", required=("family", "follows", "paradigms", "placement", "description"),
                                 check=_check_registration, stamp=True)


def integrator_options(name: str) -> list:
    """The declared options (`workbench.options.Option`) of a registered integrator: its constructor's keyword
    arguments with the help of its docstring's `Options:` section."""
    from ..options import declared_options

    return declared_options(INTEGRATORS.get(name))


def check_integrator_options(spec: IntegratorSpec) -> dict:
    """The spec's options converted to their declared types; ConfigError names an unknown option, a wrong
    type or a value out of its declared range (the one check the config checks and the app's forms share)."""
    from ..options import check_options

    return check_options(f"integrator '{spec.name}'", integrator_options(spec.name), spec.options)


def resolved_integrator_options(spec: IntegratorSpec) -> dict:
    """Every option of the spec's integrator with its value, defaults included: what a saved model writes, so
    that a later change of a default (e.g. `global_token` turned on) does not change the model it rebuilds."""
    return {o.name: o.default for o in integrator_options(spec.name)} | check_integrator_options(spec)


def build_integrator(spec: IntegratorSpec, context: IntegratorContext) -> Integrator:
    cls = INTEGRATORS.get(spec.name)
    options = check_integrator_options(spec)
    try:
        return cls(context, **options)
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


discover(__name__, __path__)

__all__ = ["INTEGRATORS", "Integrator", "IntegratorContext", "build_integrator", "check_integrator_options",
           "integrator_catalog", "integrator_options", "resolved_integrator_options"]
