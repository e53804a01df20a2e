"""Check a run config before a run is registered: every name, option and path it uses.

`RunRegistry.create` calls `check_run`, so the command line (foreground and background) and the app refuse a
config that cannot start with one line, before any run folder or registry row exists. The checks read
registries, signatures and the file system; they load no weights (an embedded LLM is only located).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from .config import DataSpec, RunConfig
from .errors import ConfigError

# Loader options that name a file or folder the loader will read.
_PATH_OPTIONS = ("json_path", "csv_path", "folder_or_file", "image_folder")


def check_run(run: RunConfig) -> RunConfig:
    """Raise ConfigError naming the first problem; return the run unchanged when it can start."""
    from .encoders import ENCODERS
    from .integrators import INTEGRATORS
    from .llm import _source
    from .paradigms import resolve_stages
    from .peft_modules import check_peft_spec

    run.validate()
    model = run.model
    ENCODERS.entry(model.encoder.name)
    _check_options(f"integrator '{model.integrator.name}'", INTEGRATORS.get(model.integrator.name).__init__,
                   model.integrator.options, skip=("self", "context"))
    check_peft_spec(model.peft)
    _source(model.llm)  # unknown names, missing directories and uncached hub ids (offline) fail here
    stages = resolve_stages(run)
    for spec in [s.data for s in stages] + ([run.eval_data] if run.eval_data is not None else []):
        check_data(spec)
    return run


def check_data(spec: DataSpec) -> None:
    """The data kind exists, its options are the loader's, and the paths they name are there."""
    from .data.loaders import DATASETS

    _check_options(f"dataset '{spec.kind}'", DATASETS.get(spec.kind), spec.options)
    for key in _PATH_OPTIONS:
        value = spec.options.get(key)
        if isinstance(value, (str, Path)) and not Path(value).expanduser().exists():
            raise ConfigError(f"dataset '{spec.kind}': {key} {value} does not exist")


def _check_options(what: str, target: Callable, options: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Names against the signature; values against the parameter's annotation (plain types only)."""
    params = {n: p for n, p in inspect.signature(target).parameters.items()
              if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for key, value in options.items():
        if key not in params:
            raise ConfigError(f"Unknown option '{key}' for {what}. Valid options: {', '.join(params) or 'none'}")
        allowed = _annotation_types(params[key])
        if allowed and not any(_is(value, t) for t in allowed):
            raise ConfigError(f"Option '{key}' of {what} must be {' or '.join(allowed)}, got {value!r}")


_PLAIN = {"bool", "int", "float", "str", "list", "dict", "tuple", "None"}


def _annotation_types(param: inspect.Parameter) -> list[str]:
    """`int`, `bool | str`, `list[int] | None` → their plain type names; [] when any part is not plain."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        return []
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip().split("[")[0] for part in text.replace("Optional[", "None | ").split("|")]
    return names if all(n in _PLAIN for n in names) else []


def _is(value: Any, name: str) -> bool:
    if name == "None":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "list": (list, tuple), "tuple": (list, tuple), "dict": dict}[name])
