"""Before launch: trainable parameters and an estimate of peak training memory against the device.

The estimate is deliberately simple (weights + gradients + AdamW state + activations + logits) so a
user can see which term dominates; it is for refusing runs that clearly cannot fit, not for tuning.

- Weights at their stored size, except trained ones, which train as fp32 master weights
  (`VisionLanguageModel.upcast_trainable_`); their gradients are fp32 and AdamW keeps two fp32 moments
  (it allocates its state in the parameter's dtype).
- Activations per decoder layer of a Llama-style block with a fused attention kernel, at 16 bits:
  about 18 bytes per hidden unit (norm inputs in fp32, queries, keys, values, attention output) and 8 per
  MLP unit (gate, up, activation, product), per token; doubled in fp32. With gradient checkpointing only
  each layer's input is kept, plus one layer's activations while it is recomputed (after Korthikanti
  et al., 2022).
- Logits only where the LM head runs: with `answer_logits_only` (training), the positions that predict
  answer tokens; in fp32, with their log-probabilities and gradient.
- Memory already held for the model counts as available: the weights are loaded before the estimate,
  so counting them against the free memory as well would count them twice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GIB = 2**30
_TERMS = ("weights", "gradients", "optimizer", "activations", "logits")


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    available: int
    device: str
    gradient_checkpointing: bool = False
    advice: str = ""
    """What to change when it does not fit, or why gradient checkpointing was turned on."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.available

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def explain(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in _TERMS)
        checkpointing = " with gradient checkpointing" if self.gradient_checkpointing else ""
        return (f"estimated peak {self.total / GIB:.2f} GiB{checkpointing} ({parts} GiB) against "
                f"{self.available / GIB:.1f} GiB available on {self.device}")


def available_memory(device: torch.device) -> int:
    """Memory free on `device` now (for other processes' use too: on CUDA, what the driver reports free)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _held_for(model, device: torch.device) -> int:
    """Memory this process already holds for `model` on `device` (it is free for the run to use)."""
    if _same_device(model.device, device):
        if device.type == "cuda":
            return int(torch.cuda.memory_reserved(device))
        if device.type == "cpu":
            return sum(p.numel() * p.element_size() for p in model.parameters())
    return 0


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = lambda d: d.index if d.index is not None else torch.cuda.current_device()  # noqa: E731
    return index(a) == index(b)


def _weight_bytes(model) -> int:
    """Bytes of the weights as they will train: trained ones as fp32 masters; an LLM that QLoRA will load
    quantized but that is only described here (meta device) at its quantized size."""
    quantize = (model.config.peft.options or {}).get("quantize") if model.config.peft.method != "none" else None
    scale = {"4bit": 0.25, "8bit": 0.5}.get(quantize, 1.0) if model.device.type == "meta" else 1.0
    quantizable = set()
    if scale != 1.0:
        from torch import nn

        from ..peft_modules import base_llm

        llm = base_llm(model.llm)
        head = llm.get_output_embeddings()
        quantizable = {id(m.weight) for m in llm.modules()
                       if isinstance(m, nn.Linear) and m is not head and m.weight.element_size() == 2}
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * (max(p.element_size(), 4) if p.requires_grad else p.element_size())
        total += int(size * scale) if id(p) in quantizable and not p.requires_grad else size
    return total


def _plain_estimate(model, batch_size, seq_len, precision, answer_len, checkpointing, device) -> MemoryEstimate:
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    cfg = model.llm.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inner = getattr(cfg, "intermediate_size", None) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    sixteen = precision in ("bf16", "fp16") or model.dtype in (torch.bfloat16, torch.float16)
    factor = 1 if sixteen else 2
    tokens = batch_size * seq_len
    per_layer = tokens * (18 * hidden + 8 * inner) * factor
    if checkpointing:
        activations = tokens * hidden * 2 * factor * layers + per_layer
    else:
        activations = per_layer * layers
    positions = seq_len if answer_len is None else min(answer_len, seq_len)
    logits = batch_size * positions * (getattr(cfg, "vocab_size", 0) or 0) * 4 * 3
    return MemoryEstimate(_weight_bytes(model), trainable * 4, trainable * 8, activations, logits,
                          available_memory(device) + _held_for(model, device), str(device), checkpointing)


def can_checkpoint(model) -> tuple[bool, str]:
    """(whether gradient checkpointing can be used on this model's LLM, why not)."""
    from ..peft_modules import base_llm

    if model.config.peft.method == "prefix_tuning":
        return False, "prefix tuning hands its prefix over as a KV cache, which checkpointed layers drop"
    llm = base_llm(model.llm)
    if not getattr(llm, "supports_gradient_checkpointing", False):
        return False, f"the {type(llm).__name__} architecture does not support it"
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in llm.modules():  # hooks on a layer's input are outside its checkpoint; inside it they would rerun
        if isinstance(layer, GradientCheckpointingLayer) and any(
                sub._forward_hooks or sub._forward_pre_hooks for name, sub in layer.named_modules() if name):
            return False, (f"the {model.config.integrator.name} integrator hooks into modules inside the LLM's "
                           f"layers, and keeps per-call state a recomputed layer would not see")
    return True, ""


def estimate_training_memory(model, batch_size: int, seq_len: int, precision: str = "no", *,
                             answer_len: int | None = None, gradient_checkpointing: bool | str = False,
                             device: torch.device | str | None = None) -> MemoryEstimate:
    """Peak memory of one training step of `model` with the current trainable set.

    `precision`: accelerate's mixed_precision ("no", "bf16", "fp16"). `answer_len`: positions the LM head
    runs at per sequence (None: every position). `gradient_checkpointing`: True, False or "auto" (on only
    when the run does not fit without it; the estimate's `gradient_checkpointing` says what was chosen).
    `device`: where it will train (default: where the model is; a model built on the meta device is
    estimated against the device its config names).
    """
    if device is None:
        device = model.device
        if device.type == "meta":
            from ..llm import target_device

            device = target_device(model.config.llm)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    args = (model, batch_size, seq_len, precision, answer_len)
    if gradient_checkpointing is True or gradient_checkpointing is False:
        estimate = _plain_estimate(*args, gradient_checkpointing, device)
    elif gradient_checkpointing == "auto":
        estimate = _plain_estimate(*args, False, device)
        possible, why_not = can_checkpoint(model)
        if not estimate.fits and possible:
            with_it = _plain_estimate(*args, True, device)
            with_it.advice = (f"gradient checkpointing on: without it the estimate is {estimate.total / GIB:.1f} GiB "
                              f"(activations {estimate.activations / GIB:.1f} GiB)")
            estimate = with_it if with_it.total < estimate.total else estimate
        elif not estimate.fits and why_not:
            estimate.advice = f"gradient checkpointing is not available: {why_not}"
    else:
        raise ValueError(f"gradient_checkpointing must be True, False or 'auto', not {gradient_checkpointing!r}")
    if not estimate.fits:
        estimate.advice = "; ".join(a for a in (estimate.advice, _what_to_change(model, estimate, batch_size)) if a)
    return estimate


def recommend_gradient_checkpointing(model, batch_size: int, seq_len: int, precision: str = "no",
                                     answer_len: int | None = None, device=None) -> bool:
    """Whether to train with gradient checkpointing: only when the run does not fit without it (it costs
    about one more forward pass per step), as large LLMs at useful batch sizes do not."""
    return estimate_training_memory(model, batch_size, seq_len, precision, answer_len=answer_len,
                                    gradient_checkpointing="auto", device=device).gradient_checkpointing


def _what_to_change(model, estimate: MemoryEstimate, batch_size: int) -> str:
    advice = [f"lower training.batch_size (now {batch_size}; training.grad_accum keeps the effective batch)"]
    if not estimate.gradient_checkpointing and can_checkpoint(model)[0]:
        advice.append("set training.gradient_checkpointing: true")
    if any(p.requires_grad for p in model._llm_own_parameters()):
        advice.append("use a PEFT method instead of full tuning")
    advice.append("or a smaller LLM")
    return "Lower the estimate: " + ", ".join(advice)


def training_lengths(model, samples, limit: int = 32) -> tuple[int, int | None]:
    """(longest sequence with its visual tokens, positions the answer-only LM head runs at) over the first
    `limit` samples that encode. In a batch the head runs at every position where any row predicts an
    answer token: at most the span from the earliest answer start to the latest answer end."""
    from ..data.prompting import IGNORE_INDEX
    from ..errors import WorkbenchError

    lengths, starts, ends = [], [], []
    for sample in list(samples)[:limit]:
        try:
            enc = model.formatter.encode(sample.messages)
        except WorkbenchError:
            continue
        extra = len(sample.images) * (model.num_visual_tokens - 1)
        lengths.append(len(enc.input_ids) + extra)
        answer = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
        if answer:  # labels after the image placeholders shift by the visual tokens
            starts.append(answer[0] + extra)
            ends.append(answer[-1] + extra)
    seq_len = max(lengths, default=model.config.max_length)
    return seq_len, (max(ends) - min(starts) + 1 if starts else None)


def peak_memory_mb() -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, resident set size on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return 0.0
