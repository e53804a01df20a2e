"""Many runs, one base: runs that share frozen parts hold them once in memory, within a memory budget.

A class chats with the default model and with several trained runs. Their frozen encoder and LLM are the same
weights (same spec, not fine-tuned): loading each run whole would hold SmolLM2 once per run. Here a
`SharedBase` holds the frozen encoder + LLM once; each run gets its *own module tree* whose frozen parameters
and buffers are the base's tensors (same storage: `copy.deepcopy` with every base tensor pre-entered in the memo,
so the tree is copied and the tensors are not), and then its own trained parts are attached and loaded on top:
integrator, PEFT adapters, in-LLM modules.

Why own module trees rather than peft's multi-adapter model: peft keeps several adapters on one base model
(`load_adapter` / `set_adapter`, and for LoRA-like methods even a different adapter per row of one batch through
`adapter_names`), but only adapters of peft's own kinds inside one PeftModel: not prompt/prefix tuning beside LoRA,
not a run without PEFT beside one with it, and not the workbench's integrators, which are most of what a run trains
(prefix projectors make each run's visual tokens; in-LLM families hook the LLM's layers). A module tree per run over
shared tensors works the same for every integrator family and PEFT method, keeps each run's hooks and adapters on
its own tree, and costs only Python objects. Rows of runs that put nothing of their own inside the LLM (prefix
integrators, no PEFT) still generate in one batch: their LLM computation is the same
(`VisionLanguageModel.llm_batch_key`, `generate_together`); runs with adapters or in-LLM modules batch per run.
Built for real (not on the meta device), each run's own modules also get their non-persistent buffers initialised as
usual, which a meta build followed by loading its saved tensors would leave empty.

`ModelPool` keeps loaded runs in least-recently-used order within a byte budget (`default_budget`: a share of
the free GPU memory or RAM, or $WORKBENCH_MODEL_MEMORY): a run's cost is its own tensors, a base's cost its
tensors once; when over the budget the least recently used runs are dropped first, and a base goes when no
loaded run uses it.

Models answer in `dtype` (`llm.serving_dtype`): by default bf16 where the hardware computes it natively, as
servers for LLMs do (vLLM's `--dtype auto`: the checkpoint's bf16); the dtype is part of the base's key.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError

MEMORY_ENV = "WORKBENCH_MODEL_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_bytes(text: str | int) -> int:
    """'4GB', '512 MiB', '2g' or a plain number of bytes → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"A memory size must look like 4GB, 512MiB or a number of bytes, not {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def default_budget() -> int:
    """$WORKBENCH_MODEL_MEMORY, else half the GPU's memory (CUDA) or half the RAM available now."""
    if os.environ.get(MEMORY_ENV):
        return parse_bytes(os.environ[MEMORY_ENV])
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return int(0.5 * total)
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def tensors(module: nn.Module) -> list:
    """Every parameter and buffer, tied ones included (each owner keeps its own reference)."""
    return [t for _, t in module.named_parameters(remove_duplicate=False)] + \
        [t for _, t in module.named_buffers(remove_duplicate=False)]


def tensor_bytes(module: nn.Module, exclude: set[int] = frozenset()) -> int:
    """Bytes held by a module's tensors, each storage once, leaving out storages in `exclude` (data_ptr)."""
    seen, total = set(exclude), 0
    for t in tensors(module):
        if t.device.type == "meta":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def storage_ptrs(*modules: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in tensors(m) if t.device.type != "meta"}


def sharing(config) -> tuple[bool, bool]:
    """(encoder, LLM): which of a run's parts are frozen base weights that other runs can share."""
    quantized = bool((config.peft.options or {}).get("quantize")) and config.peft.method != "none"
    encoder = config.encoder.frozen and config.encoder.weights != "random"
    llm = config.llm.frozen and config.llm.weights != "random" and not quantized
    return encoder, llm


def base_key(config) -> str:
    """Runs with the same key can share a base: same encoder and LLM specs (how they train aside)."""
    from .config import to_dict

    spec = lambda s: {k: v for k, v in to_dict(s).items() if k != "frozen"}  # noqa: E731
    return json.dumps({"encoder": spec(config.encoder), "llm": spec(config.llm)}, sort_keys=True, default=str)


class SharedBase:
    """A frozen encoder + LLM (with its tokenizer) loaded once; `parts_for` lends them to one run's model."""

    def __init__(self, config):
        from .config import IntegratorSpec, PeftSpec
        from .model import VisionLanguageModel

        plain = replace(copy.deepcopy(config), integrator=IntegratorSpec(name="linear"), peft=PeftSpec())
        plain.encoder.frozen = plain.llm.frozen = True
        loaded = VisionLanguageModel.from_config(plain)  # prepared exactly as a run's own load would be
        self.key = base_key(config)
        self.encoder, self.llm, self.tokenizer = loaded.encoder, loaded.llm, loaded.tokenizer
        self.nbytes = tensor_bytes(self.encoder) + tensor_bytes(self.llm)
        self.ptrs = storage_ptrs(self.encoder, self.llm)

    def parts_for(self, config) -> dict[str, Any]:
        """The run's own module trees over the base's tensors: {"encoder": …, "llm": (llm, tokenizer)}, each
        only where the run keeps that part frozen."""
        if base_key(config) != self.key:
            raise ConfigError("This run's encoder or LLM differs from the shared base's")
        share_encoder, share_llm = sharing(config)
        out: dict[str, Any] = {}
        if share_encoder:
            out["encoder"] = _share_tensors(self.encoder)
        if share_llm:
            out["llm"] = (_share_tensors(self.llm), self.tokenizer)
        return out


def _share_tensors(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in tensors(module)}
    return copy.deepcopy(module, memo)


@dataclass
class _Loaded:
    model: Any
    stamp: str
    base: str | None
    nbytes: int
    used: float = field(default_factory=time.time)


class ModelPool:
    """Loaded runs by key, least recently used first out, their frozen bases shared; see the module docstring."""

    def __init__(self, budget_bytes: int | str | None = None, dtype: str = "auto"):
        from .llm import serving_dtype

        serving_dtype("auto", "cpu", dtype)  # refuse an unknown dtype now, not at the first chat
        self.budget = parse_bytes(budget_bytes) if budget_bytes is not None else default_budget()
        self.dtype = dtype
        """The LLM dtype models answer in (`llm.serving_dtype`): "auto" = bf16 where the hardware computes it."""
        self._runs: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()
        self._bases: dict[str, SharedBase] = {}
        self._lock = threading.RLock()
        self.dropped: list[str] = []
        """Keys of the runs dropped to stay within the budget, oldest first (the log and tests read it)."""

    def get(self, key: str, config, folder: Path | None = None, stamp: str = ""):
        """The model for `key` (a run's saved folder, or the default config), loaded once and shared."""
        from .llm import resolve_device, serving_dtype
        from .model import VisionLanguageModel

        with self._lock:
            entry = self._runs.get(key)
            if entry is not None and entry.stamp == stamp:
                self._runs.move_to_end(key)
                entry.used = time.time()
                return entry.model
            if entry is not None:  # saved again since (a run still training): the new weights
                self._drop(key)
            started = time.time()
            config = copy.deepcopy(config)
            config.llm.dtype = serving_dtype(config.llm.dtype, resolve_device(config.llm.device), self.dtype)
            base = None
            if any(sharing(config)):
                bkey = base_key(config)
                base = self._bases.get(bkey)
                if base is None:
                    base = self._bases[bkey] = SharedBase(config)
            model = VisionLanguageModel.from_pretrained(folder, base=base, dtype=config.llm.dtype) \
                if folder is not None else \
                VisionLanguageModel.from_config(config, base=base)
            model.eval()
            model.load_seconds = time.time() - started
            own = tensor_bytes(model, base.ptrs if base is not None else set())
            self._runs[key] = _Loaded(model, stamp, base.key if base is not None else None, own)
            self._fit(keep=key)
            return model

    def _drop(self, key: str) -> None:
        from .frontend import release_memory

        entry = self._runs.pop(key)
        used = {e.base for e in self._runs.values()}
        if entry.base is not None and entry.base not in used:
            self._bases.pop(entry.base, None)
        del entry
        release_memory()

    def _fit(self, keep: str) -> None:
        while self.used_bytes > self.budget:
            victim = next((k for k in self._runs if k != keep), None)
            if victim is None:
                break  # the one run asked for stays, even alone over the budget
            self.dropped.append(victim)
            self._drop(victim)

    @property
    def used_bytes(self) -> int:
        return sum(b.nbytes for b in self._bases.values()) + sum(e.nbytes for e in self._runs.values())

    def loaded(self) -> list[dict[str, Any]]:
        """What is in memory, least recently used first."""
        with self._lock:
            return [{"key": k, "own_bytes": e.nbytes, "shares_base": e.base is not None,
                     "load_seconds": getattr(e.model, "load_seconds", None)} for k, e in self._runs.items()]

    def summary(self) -> str:
        return (f"{len(self._runs)} model(s) loaded over {len(self._bases)} shared base(s), "
                f"{self.used_bytes / 2 ** 20:,.0f} MiB of a {self.budget / 2 ** 20:,.0f} MiB budget")

    def clear(self) -> None:
        with self._lock:
            for key in list(self._runs):
                self._drop(key)
