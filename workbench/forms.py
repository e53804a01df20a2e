"""Forms for component options: one field per declared option of every integrator and PEFT method, and the
conversions between a form's values and the specs (IntegratorSpec options, PeftSpec fields).

A front end lays out one field per `option_fields()` entry, in that order, shows only the chosen component's
fields, and hands all values back: `read_form` keeps the chosen ones and checks them (ConfigError with the
option and the reason), `fill_form` gives the values that show a loaded config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import IntegratorSpec, PeftSpec
from .options import Option, changed, from_form, to_form


@dataclass(frozen=True)
class Field:
    kind: str
    """integrator or peft"""
    owner: str
    """The integrator's registry name, or the PEFT method."""
    option: Option


def option_fields() -> list[Field]:
    """Every integrator's options, then every PEFT method's, in registry order."""
    from .integrators import INTEGRATORS, integrator_options
    from .peft_modules import METHODS, method_options

    return ([Field("integrator", name, o) for name in INTEGRATORS.names() for o in integrator_options(name)]
            + [Field("peft", m, o) for m in METHODS for o in method_options(m)])


def read_form(fields: list[Field], values: list[Any], integrator: str, peft_method: str) -> tuple[dict, PeftSpec]:
    """(integrator options that differ from the defaults, PeftSpec) from the fields of the chosen components."""
    if len(values) != len(fields):
        raise ValueError(f"{len(fields)} option fields, {len(values)} values")
    integrator_values, peft_values = {}, {}
    for f, raw in zip(fields, values):
        if f.kind == "integrator" and f.owner == integrator:
            integrator_values[f.option.name] = from_form(f"integrator '{integrator}'", f.option, raw)
        elif f.kind == "peft" and f.owner == peft_method:
            peft_values[f.option.name] = from_form(f"PEFT method {peft_method}", f.option, raw)
    declared = [f.option for f in fields if f.kind == "integrator" and f.owner == integrator]
    return changed(declared, integrator_values), PeftSpec(method=peft_method, **peft_values)


def fill_form(fields: list[Field], integrator: IntegratorSpec, peft: PeftSpec) -> list[Any]:
    """The field values that show `integrator` and `peft` (defaults where a spec says nothing; checked, so a
    config with an unknown or wrong option is refused here rather than shown half-filled)."""
    from .integrators import check_integrator_options

    options = check_integrator_options(integrator)
    layers = peft.layers if peft.layers is not None else (peft.options or {}).get("layers_to_transform")
    out = []
    for f in fields:
        if f.kind == "integrator":
            value = options.get(f.option.name, f.option.default) if f.owner == integrator.name else f.option.default
        else:
            value = (layers if f.option.name == "layers" else getattr(peft, f.option.name)) \
                if f.owner == peft.method else f.option.default
        out.append(to_form(f.option, value))
    return out
