"""The one mechanism by which "in_llm" integrators reach inside a decoder-only LLM: forward hooks.

An in-LLM integrator owns all of its modules (they are its submodules, so its state_dict, its
`parameters()` for the optimizer and `set_trainable` work as for a prefix integrator). `attach(llm)`
finds the decoder layers of a Llama-like transformers model and registers forward hooks / pre-hooks
(`with_kwargs=True`) on them, on their `self_attn` or on their `mlp`; the hooks run the integrator's
modules and change the hidden states flowing through the layer. No decoder code is copied and no
transformers class is patched, so the same code serves every architecture whose layers look like
Llama's: Llama, SmolLM (a Llama), Qwen2, Mistral, and others with `model.layers[i].self_attn.{q,k,v,o}_proj`
and `model.layers[i].mlp`. Anything else is refused with a ConfigError at attach time.

Dtypes: the integrator keeps fp32 master weights; hooks cast the LLM's hidden states (bf16 on CUDA) into
the modules' dtype and device, and cast what they add back to the LLM's dtype.

The visual context (`set_visual_context(features, image_to_sample)`) is per batch row: rows without an
image get no visual contribution. Everything a hook computes depends only on the current positions and
on that per-row context, never on the rest of the sequence, so decode steps with a KV cache (one new
token) see exactly what a full forward without cache sees.

Limitations: generation that multiplies batch rows (num_beams > 1, num_return_sequences > 1) is not
supported (the per-row context no longer lines up with the rows; a ConfigError is raised when it can be
detected), nor is gradient checkpointing of the LLM (the recomputation in backward would run after the
visual context has been cleared).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .base import Integrator, IntegratorContext

SUPPORTED = "Llama-like decoders (Llama, SmolLM, Qwen2, Mistral, ...)"


# ---------------------------------------------------------------------------------------------- the LLM's shape

@dataclass(frozen=True)
class LLMShape:
    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def llm_shape(context: IntegratorContext, who: str) -> LLMShape:
    """Layer count, width and heads of the LLM an in-LLM integrator is built for (from its config)."""
    config = context.llm_config
    if config is None:
        raise ConfigError(f"Integrator '{who}' works inside the LLM and needs the LLM's config "
                          f"(IntegratorContext.llm_config) to be built")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")
               if getattr(config, k, None) is None]
    if missing:
        raise ConfigError(f"Integrator '{who}' supports {SUPPORTED}; the "
                          f"'{getattr(config, 'model_type', type(config).__name__)}' config lacks {', '.join(missing)}")
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return LLMShape(str(getattr(config, "model_type", "?")), int(config.num_hidden_layers), int(config.hidden_size),
                    heads, kv, head_dim)


def _unwrap(llm: nn.Module) -> nn.Module:
    from ..peft_modules import base_llm

    return base_llm(llm)  # the transformers model under a peft wrapper


def decoder_layers(llm: nn.Module, who: str, need: tuple[str, ...] = ("self_attn",)) -> nn.ModuleList:
    """The decoder layers of a Llama-like causal LM (or of its decoder), checked for what the integrator needs.

    `need` lists dotted attributes each layer must have, e.g. ("self_attn.q_proj", "mlp").
    """
    llm = _unwrap(llm)
    model_type = getattr(getattr(llm, "config", None), "model_type", type(llm).__name__)
    layers = None
    inner = getattr(llm, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        layers = inner.layers
    elif callable(getattr(llm, "get_decoder", None)):
        try:
            decoder = llm.get_decoder()
        except Exception:  # some models raise when they have no separate decoder
            decoder = None
        if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            layers = decoder.layers
    if layers is None and isinstance(getattr(llm, "layers", None), nn.ModuleList):
        layers = llm.layers  # the decoder itself was given
    if layers is None or len(layers) == 0:
        raise ConfigError(f"Integrator '{who}' supports {SUPPORTED}: it could not find the decoder layers "
                          f"(model.layers) of the '{model_type}' LLM")
    for dotted in need:
        for i, layer in enumerate(layers):
            obj = layer
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
            if not isinstance(obj, nn.Module):
                raise ConfigError(f"Integrator '{who}' supports {SUPPORTED}: layer {i} of the '{model_type}' LLM "
                                  f"has no '{dotted}'")
    return layers


# ---------------------------------------------------------------------------------------------- hooks

def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    if isinstance(kwargs.get("x"), torch.Tensor):
        return kwargs["x"]
    raise ConfigError("An in-LLM integrator hook could not find the hidden states among the module's inputs")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else "x"
    return args, {**kwargs, key: hidden}


class HookSet:
    """Handles of the hooks one integrator installed; `remove()` takes them all out again."""

    def __init__(self):
        self.handles: list = []

    def __len__(self) -> int:
        return len(self.handles)

    def on_input(self, module: nn.Module, fn: Callable[[torch.Tensor, dict], torch.Tensor | None]) -> None:
        """fn(hidden_states, kwargs) -> new hidden_states (or None: unchanged) before `module` runs."""

        def pre_hook(mod, args, kwargs):
            hidden = _hidden_of(args, kwargs)
            new = fn(hidden, kwargs)
            return None if new is None else _with_hidden(args, kwargs, new)

        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def on_output(self, module: nn.Module,
                  fn: Callable[[torch.Tensor, dict, torch.Tensor], torch.Tensor | None]) -> None:
        """fn(input_hidden_states, kwargs, output_hidden_states) -> new output hidden states (or None)."""

        def hook(mod, args, kwargs, output):
            hidden = _hidden_of(args, kwargs)
            first = output[0] if isinstance(output, tuple) else output
            new = fn(hidden, kwargs, first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """RoPE on (B, heads, T, head_dim) queries from the (cos, sin) the decoder passes its attention layers."""
    pe = kwargs.get("position_embeddings")
    if pe is None:
        return q
    cos, sin = pe
    if cos.shape[-1] != q.shape[-1]:
        raise ConfigError(f"Partial rotary embeddings ({cos.shape[-1]} of {q.shape[-1]} dims) are not supported "
                          f"by the in-LLM integrators")
    cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    return q * cos + rotate_half(q) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Plain softmax attention on (B, h, T, d) / (B, h, S, d); mask (B, S) True = attend. Returns out, probs."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)


def marker_token(context: IntegratorContext) -> nn.Parameter:
    """A learned (1, 1, H) media-marker embedding, initialised at the scale of the LLM's text embeddings."""
    H = context.llm_hidden
    norm = getattr(context, "text_embedding_norm", None)
    return nn.Parameter(torch.randn(1, 1, H) * (norm / H ** 0.5 if norm else 0.02))


# ---------------------------------------------------------------------------------------------- the base class

class InLLMIntegrator(Integrator):
    """Base of the integrators that work inside the LLM through hooks.

    Subclasses implement `_install(layers, hooks)` (register their hooks on the decoder layers) and
    say which layer attributes they need in `_needs`. They read the visual context of the current LLM
    call through `image_rows(batch)`, `row_groups(batch)` and `derived(key, fn)`.
    """

    _needs: tuple[str, ...] = ("self_attn",)

    def __init__(self, context: IntegratorContext):
        super().__init__(context)
        # plain attributes (not submodules): the LLM must not become part of the integrator's state
        self.__dict__["_hooks"] = HookSet()
        self.__dict__["_llm_ref"] = None
        self.__dict__["_features"] = None
        self.__dict__["_image_to_sample"] = None
        self.__dict__["_derived"] = {}

    def __getstate__(self):
        """Copies and pickles are detached: hooks, the LLM reference and the visual context stay behind."""
        state = self.__dict__.copy()
        state.update(_hooks=HookSet(), _llm_ref=None, _features=None, _image_to_sample=None, _derived={})
        return state

    # -- the seam
    @property
    def attached(self) -> bool:
        return self._llm_ref is not None and self._llm_ref() is not None and len(self._hooks) > 0

    def attach(self, llm: nn.Module) -> None:
        llm = _unwrap(llm)
        if self._llm_ref is not None and self._llm_ref() is llm and len(self._hooks):
            return  # already in this LLM: attaching twice must not double the hooks
        self.detach()
        layers = decoder_layers(llm, self._registry_name(), self._needs)
        self._check_layers(layers)
        self._install(layers, self._hooks)
        self.__dict__["_llm_ref"] = weakref.ref(llm)

    def detach(self) -> None:
        """Remove every hook from the LLM (the modules stay in the integrator)."""
        self._hooks.remove()
        self.__dict__["_llm_ref"] = None

    def set_visual_context(self, features: torch.Tensor | None, image_to_sample: torch.Tensor | None) -> None:
        self.__dict__["_derived"] = {}
        if features is None:
            self.__dict__["_features"] = None
            self.__dict__["_image_to_sample"] = None
            return
        if image_to_sample is None:  # one image per row
            image_to_sample = torch.arange(features.shape[0])
        image_to_sample = torch.as_tensor(image_to_sample, dtype=torch.long).flatten()
        if image_to_sample.numel() != features.shape[0]:
            raise ConfigError(f"image_to_sample has {image_to_sample.numel()} entries for {features.shape[0]} images")
        self.__dict__["_features"] = features
        self.__dict__["_image_to_sample"] = image_to_sample

    def llm_parameters(self) -> list[nn.Parameter]:
        return []  # the modules live in the integrator, not in the LLM's module tree

    # -- for subclasses
    def _install(self, layers: nn.ModuleList, hooks: HookSet) -> None:
        raise NotImplementedError

    def _check_layers(self, layers: nn.ModuleList) -> None:
        expected = getattr(self, "num_llm_layers", None)
        if expected is not None and len(layers) != expected:
            raise ConfigError(f"Integrator '{self._registry_name()}' was built for an LLM with {expected} layers; "
                              f"this one has {len(layers)}")

    def _registry_name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    @property
    def has_visual_context(self) -> bool:
        return self._features is not None

    @property
    def module_param(self) -> torch.Tensor:
        return next(self.parameters())

    def to_modules(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor from the LLM (or the encoder) cast to the integrator's device and master dtype."""
        p = self.module_param
        return x.to(device=p.device, dtype=p.dtype)

    def derived(self, key, fn: Callable[[], object]):
        """Compute once per visual context (i.e. once per LLM call, shared by all layers and decode steps).

        Without a visual context nothing is kept: an LLM call that was not bracketed by
        `set_visual_context(...)` / `set_visual_context(None, None)` must not see (or backpropagate through)
        tensors of an earlier call."""
        if not self.has_visual_context:
            return fn()
        if key not in self._derived:
            self._derived[key] = fn()
        return self._derived[key]

    def features(self) -> torch.Tensor:
        """The current (num_images, N, D_v) features in the integrator's dtype and device."""
        return self.derived("features", lambda: self.to_modules(self._features))

    def image_rows(self, batch: int) -> torch.Tensor:
        """The batch row of each image (on the integrator's device), checked against the LLM batch."""
        rows = self._image_to_sample
        if rows.numel() and int(rows.max()) >= batch:
            raise ConfigError(f"The visual context has images for batch row {int(rows.max())} but the LLM runs "
                              f"{batch} rows (beam search and num_return_sequences are not supported by "
                              f"in-LLM integrators)")
        return self.derived(("rows", batch), lambda: rows.to(self.module_param.device))

    def row_groups(self, batch: int):
        """(rows, index, valid): the R rows that have images, and for each the (R, n_max) image indices
        (-1 padded) with their validity mask. None when no row has an image."""
        def build():
            rows = self.image_rows(batch)
            if rows.numel() == 0:
                return None
            present = sorted(set(rows.tolist()))
            per_row = [[m for m, r in enumerate(rows.tolist()) if r == row] for row in present]
            n_max = max(len(x) for x in per_row)
            index = torch.full((len(present), n_max), -1, dtype=torch.long)
            for i, ims in enumerate(per_row):
                index[i, : len(ims)] = torch.tensor(ims)
            dev = self.module_param.device
            index = index.to(dev)
            return torch.tensor(present, device=dev), index, index >= 0

        return self.derived(("groups", batch), build)

    def add_to_rows(self, hidden: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) in the LLM dtype + delta (R, T, H) on the given rows (out of place)."""
        return hidden.index_add(0, rows.to(hidden.device), delta.to(device=hidden.device, dtype=hidden.dtype))
