"""Frozen linear weights held in the autocast dtype while a stage trains under mixed precision.

Autocast casts a matmul's weight to bf16/fp16 at every call and keeps the cast only for weights that train,
so a frozen fp32 LLM (the CPU default) has every weight copied again in each forward. Holding the frozen
`nn.Linear` weights in the autocast dtype for the stage gives the same matmuls (autocast rounds them the same
way) without the copies. Only linear layers are cast, and only parameters no other module shares (a tied
embedding keeps its fp32 lookup), so everything outside the matmuls computes as before.

The loaded values come back when the stage ends and around every save: a later stage may train them, a saved
part must hold them, and code outside autocast needs fp32. A weight whose value bf16 holds exactly (a bf16
checkpoint loaded in fp32) is restored by casting back; only the others keep their fp32 copy meanwhile.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FrozenLinearCasts:
    """Casts `module`'s frozen linear weights to `dtype` on creation; `restore()` puts the loaded values back."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.loaded = [(p, p.dtype) for p in _castable(module, dtype)]
        self.kept: dict[int, torch.Tensor] = {}
        self._cast()

    @classmethod
    def for_precision(cls, module: nn.Module, mixed_precision: str) -> "FrozenLinearCasts | None":
        """Casts for accelerate's `mixed_precision` ("no", "bf16", "fp16"); None when it does not autocast."""
        dtype = MIXED_DTYPES.get(mixed_precision)
        return cls(module, dtype) if dtype is not None else None

    def _cast(self) -> None:
        for p, _ in self.loaded:
            low = p.data.to(self.dtype)
            if not torch.equal(low.to(p.dtype), p.data):
                self.kept[id(p)] = p.data
            p.data = low

    def restore(self) -> None:
        """Put the loaded values back (idempotent)."""
        for p, dtype in self.loaded:
            if p.dtype != dtype:
                p.data = self.kept.pop(id(p)) if id(p) in self.kept else p.data.to(dtype)
        self.kept.clear()

    @contextlib.contextmanager
    def restored(self):
        """The loaded values inside the block (a save), the cast ones again after it."""
        self.restore()
        try:
            yield
        finally:
            self._cast()

    @property
    def count(self) -> int:
        return len(self.loaded)


def _castable(module: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Frozen floating-point parameters owned only by `nn.Linear` layers, not already in `dtype`."""
    elsewhere = {id(p) for m in module.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    found: dict[int, nn.Parameter] = {}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            for p in m.parameters(recurse=False):
                if (not p.requires_grad and p.is_floating_point() and p.dtype != dtype
                        and id(p) not in elsewhere):
                    found[id(p)] = p
    return list(found.values())
