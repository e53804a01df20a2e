"""One entry point for every dataset kind, so configs and front ends name data the same way.

Each kind registers its loader in its own file (`@DATASETS.register("kind", ...)`); the package imports every
module of this folder, so a new kind is one new file."""
from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .samples import SampleDataset

DATASETS: Registry = Registry("dataset", required=("offline", "embedded", "description"))


def load_dataset_spec(kind: str, **kwargs: Any) -> SampleDataset:
    """Load dataset `kind` with its own keyword arguments; unknown kinds or arguments say what is valid."""
    loader = DATASETS.get(kind)
    signature = inspect.signature(loader)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        params = ", ".join(signature.parameters)
        raise ConfigError(f"Dataset '{kind}': {e}. It takes: {params}") from None
    return loader(**kwargs)
