"""Out of memory → one line saying what to change, instead of a cut-off allocator message.

torch's CUDA message is several lines of allocator detail; the run record keeps only its first line,
which tells the user nothing they can act on. The settings that lower peak memory are known, so name
the ones this run can still change.
"""
from __future__ import annotations

import re

import torch

_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "Cannot allocate memory")


def out_of_memory_error(error: BaseException | None) -> BaseException | None:
    """The allocation failure (on a GPU or the CPU) that `error` is or was raised from; None if none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return error
        if isinstance(error, RuntimeError) and any(s in str(error) for s in _CPU_OOM):
            return error
        error = error.__cause__ or error.__context__
    return None


def oom_reason(error: BaseException, run=None) -> str | None:
    """A one-line reason for a run that ran out of memory (None when `error` is something else).

    `run` (a RunConfig) makes the advice specific: its batch size, whether gradient checkpointing is
    already on, whether a stage trains the whole LLM.
    """
    error = out_of_memory_error(error)
    if error is None:
        return None
    gpu = isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error)
    found = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", str(error))
    what = f" (tried to allocate {found.group(1)})" if found else ""
    advice = []
    training = getattr(run, "training", None)
    if training is not None:
        advice.append(f"lower training.batch_size (now {training.batch_size}; training.grad_accum keeps the "
                      f"effective batch)")
        if getattr(training, "gradient_checkpointing", "auto") is not True:
            advice.append("set training.gradient_checkpointing: true")
        stages = getattr(run, "stages", None) or []
        full = any(getattr(s, "llm", "") == "full" for s in stages) or getattr(run, "paradigm", "") == "two-stage"
        if full:
            advice.append("train a PEFT method (model.peft: lora, or QLoRA) instead of the full LLM")
    else:
        advice += ["lower training.batch_size", "set training.gradient_checkpointing: true",
                   "train a PEFT method instead of the full LLM"]
    advice.append("or pick a smaller LLM")
    return f"Out of {'GPU' if gpu else 'CPU'} memory{what}: " + ", ".join(advice)
