"""Before launch: trainable parameters and an estimate of peak training memory against the device.

The estimate is deliberately simple (weights + gradients + AdamW state + activations + logits) so a
user can see which term dominates; it is for refusing runs that clearly cannot fit, not for tuning.
Activations follow Korthikanti et al. (2022): ~34·s·b·h bytes per decoder layer at 16 bits, doubled in fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GIB = 2**30


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    available: int
    device: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.available

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def explain(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in ("weights", "gradients", "optimizer",
                                                                        "activations", "logits"))
        return (f"estimated peak {self.total / GIB:.2f} GiB ({parts} GiB) against {self.available / GIB:.1f} GiB "
                f"available on {self.device}")


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_training_memory(model, batch_size: int, seq_len: int, precision: str = "no") -> MemoryEstimate:
    """Peak memory of one training step of `model` with the current trainable set."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    gradients = sum(p.numel() * 4 for p in trainable)
    optimizer = sum(p.numel() * 8 for p in trainable)  # AdamW: two fp32 moments
    cfg = model.llm.config
    hidden = getattr(cfg, "hidden_size", 0)
    layers = getattr(cfg, "num_hidden_layers", 0)
    bytes_factor = 1 if precision in ("bf16", "fp16") else 2
    activations = 34 * seq_len * batch_size * hidden * layers * bytes_factor
    logits = batch_size * seq_len * getattr(cfg, "vocab_size", 0) * 4 * 2  # logits and their gradient, fp32
    device = model.device
    return MemoryEstimate(weights, gradients, optimizer, activations, logits, available_memory(device), str(device))


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
