"""Check a run config before a run is registered: every name, option and path it uses.

`RunRegistry.create` calls `check_run`, so the command line (foreground and background) and the app refuse a
config that cannot start with one line, before any run folder or registry row exists. The checks read
registries, signatures and the file system; they load no weights (an embedded LLM is only located, and its
config read when the visual entry layer must be checked against its layer count).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import DataSpec, RunConfig
from .errors import ConfigError

# Loader options that name a file or folder the loader will read.
_PATH_OPTIONS = ("json_path", "csv_path", "folder_or_file", "image_folder")


def check_run(run: RunConfig) -> RunConfig:
    """Raise ConfigError naming the first problem; return the run unchanged when it can start."""
    from .encoders import ENCODERS
    from .integrators import check_integrator_options
    from .llm import _source
    from .paradigms import resolve_stages
    from .peft_modules import check_peft_spec

    run.validate()
    model = run.model
    ENCODERS.entry(model.encoder.name)
    check_integrator_options(model.integrator)
    check_peft_spec(model.peft)
    _source(model.llm)  # unknown names, missing directories and uncached hub ids (offline) fail here
    if model.visual_entry_layer:
        from .llm import num_decoder_layers
        from .visual_entry import resolve_entry_layer

        layers = num_decoder_layers(model.llm)
        if layers:
            resolve_entry_layer(model.visual_entry_layer, layers)
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


def _check_options(what: str, target: Callable, options: dict[str, Any]) -> None:
    """Names against the signature; values against the declared types (see workbench.options)."""
    from .options import check_options, declared_options

    check_options(what, declared_options(target, skip=()), options)
