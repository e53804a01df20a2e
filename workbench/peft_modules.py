"""Parameter-efficient modules on the LLM, implemented with the `peft` library.

`attach_peft(llm, spec)` wraps a transformers causal LM in a `peft.PeftModel` for one of METHODS:

- lora / dora: low-rank updates on linear layers (dora = LoRA with weight decomposition, use_dora=True);
- ia3: learned rescaling of keys, values and the feed-forward input;
- prompt_tuning: `num_virtual_tokens` trainable embeddings prepended to the input embeddings (peft prepends
  them, extends the attention mask and puts IGNORE_INDEX in front of the labels, so the logits it returns
  are `num_virtual_tokens` longer than the input; see `virtual_tokens`);
- prefix_tuning: trainable key/value prefixes in every layer (given as a prefilled KV cache; the logits keep
  the input's length);
- adaption_prompt: LLaMA-Adapter's zero-gated adaption prompts in the top attention layers (llama-like
  architectures only).

The base weights stay as they are (peft freezes them); `peft_parameters` lists the adapter's own
parameters, `save_peft` / `load_peft` write and read them as safetensors with peft's adapter_config.json.
peft is imported lazily, so importing this module (and `workbench.model`) stays cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PeftSpec
from .errors import ConfigError, UnknownComponentError

METHODS = ("none", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "adaption_prompt")
"""Valid `PeftSpec.method` values."""

METHOD_FIELDS = {"none": (), "lora": ("r", "alpha", "dropout", "target_modules", "layers"),
                 "dora": ("r", "alpha", "dropout", "target_modules", "layers"), "ia3": ("target_modules", "layers"),
                 "prompt_tuning": ("num_virtual_tokens",), "prefix_tuning": ("num_virtual_tokens",),
                 "adaption_prompt": ("num_virtual_tokens",)}
"""The `PeftSpec` fields each method reads (the app's PEFT form shows these; the rest do not apply)."""

ADAPTER_DIR = "adapter"
"""Sub-directory of a saved workbench model that holds the adapter (adapter_config.json + safetensors)."""

_LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
               "olmo", "olmo2", "phi3", "smollm3", "cohere", "starcoder2", "helium", "glm")
_LORA_TARGETS = {t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] for t in _LLAMA_LIKE}
_LORA_TARGETS.update({
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
})
_IA3_TARGETS = {t: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for t in _LLAMA_LIKE}
_IA3_TARGETS.update({
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "starcoder2": (["k_proj", "v_proj", "c_proj"], ["c_proj"]),
})
_QUANTIZE = ("4bit", "8bit")


# ---------------------------------------------------------------------------------------------- queries

def is_peft_model(llm: nn.Module) -> bool:
    """Whether `llm` is wrapped by peft (never imports peft: if it is not loaded, nothing can be wrapped)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(llm, peft.PeftModel)


def base_llm(llm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when it is not wrapped)."""
    return llm.get_base_model() if is_peft_model(llm) else llm


def peft_method(llm: nn.Module) -> str:
    """The workbench method name of the active adapter ("none" when not wrapped)."""
    if not is_peft_model(llm):
        return "none"
    config = llm.active_peft_config
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora" and getattr(config, "use_dora", False):
        return "dora"
    return kind


def virtual_tokens(llm: nn.Module) -> int:
    """Positions that peft prepends to the sequence (and to the logits): prompt tuning's virtual tokens.

    Prefix tuning's virtual tokens live in the KV cache and do not lengthen the logits, so they count 0 here.
    """
    if not is_peft_model(llm):
        return 0
    config = llm.active_peft_config
    if config.is_prompt_learning and peft_method(llm) not in ("prefix_tuning", "cartridge"):
        return int(config.num_virtual_tokens)
    return 0


def peft_parameters(llm: nn.Module) -> list[nn.Parameter]:
    """The adapter's own parameters (LoRA/DoRA/IA3 weights, prompt encoders, adaption prompts and gates,
    modules_to_save copies); the wrapped base weights are not among them."""
    if not is_peft_model(llm):
        return []
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    out: list[nn.Parameter] = []
    prompt_encoder = getattr(llm, "prompt_encoder", None)
    if isinstance(prompt_encoder, nn.Module):
        out += list(prompt_encoder.parameters())
    for module in llm.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                part = getattr(module, name, None)
                if isinstance(part, nn.Module):
                    out += list(part.parameters())
                elif isinstance(part, nn.Parameter):
                    out.append(part)
        if isinstance(module, ModulesToSaveWrapper):
            out += list(module.modules_to_save.parameters())
        if isinstance(module, _BaseAdaptedAttention):
            out += [module.adaption_prompt, module.adaption_gate]
    return unique_parameters(out)


def peft_layers(llm: nn.Module) -> list[int]:
    """The LLM layers (0 = first) that hold adapter modules, for diagrams: where LoRA, DoRA, IA3 or adaption
    prompts sit; every layer for prefix tuning (its prefixes are per layer); none for prompt tuning, whose
    virtual tokens enter before the first layer."""
    import re

    method = peft_method(llm)
    if method in ("none", "prompt_tuning"):
        return []
    config = base_llm(llm).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if method == "prefix_tuning":
        return list(range(int(config.num_hidden_layers)))
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
    from peft.tuners.tuners_utils import BaseTunerLayer

    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    return sorted({int(m.group(1)) for name, module in llm.named_modules()
                   if isinstance(module, (BaseTunerLayer, _BaseAdaptedAttention)) and (m := pattern.search(name + "."))})


# ---------------------------------------------------------------------------------------------- building

def check_peft_spec(spec: PeftSpec) -> None:
    """Checks that need no model: the method name, and QLoRA's requirements (CUDA + bitsandbytes).

    Called before the LLM is loaded, so a bad spec fails fast.
    """
    if spec.method not in METHODS:
        raise UnknownComponentError(f"Unknown PEFT method '{spec.method}'. Valid methods: {', '.join(METHODS)}")
    quantize = (spec.options or {}).get("quantize")
    if quantize is None:
        return
    if quantize not in _QUANTIZE:
        raise ConfigError(f"peft.options.quantize must be {' or '.join(_QUANTIZE)}, not {quantize!r}")
    if spec.method not in ("lora", "dora"):
        raise ConfigError(f"peft.options.quantize (QLoRA) works with the lora and dora methods, not '{spec.method}'")
    missing = [what for what, ok in (("CUDA", torch.cuda.is_available()),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if missing:
        raise ConfigError(f"QLoRA (peft.options.quantize: {quantize}) needs CUDA + bitsandbytes; this machine lacks "
                          f"{' and '.join(missing)}. Remove peft.options.quantize to train plain "
                          f"{spec.method} on the unquantized LLM")


def quantization_config(spec: PeftSpec, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers BitsAndBytesConfig that QLoRA loads the LLM with, or None (after `check_peft_spec`)."""
    quantize = (spec.options or {}).get("quantize")
    if quantize is None or spec.method == "none":
        return None
    check_peft_spec(spec)
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def linear_module_names(llm: nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers (what target_modules can name)."""
    names = set()
    for name, module in base_llm(llm).named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _model_type(llm: nn.Module) -> str:
    return getattr(getattr(base_llm(llm), "config", None), "model_type", None) or type(llm).__name__


def _default_targets(llm: nn.Module, method: str) -> tuple[list[str] | None, list[str] | None]:
    """(target_modules, feedforward_modules) for a method and architecture; None leaves peft's own default."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)

    model_type = _model_type(llm)
    available = set(linear_module_names(llm))
    if method in ("lora", "dora"):
        targets = [t for t in _LORA_TARGETS.get(model_type, ()) if t in available]
        if targets:
            return targets, None
        if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            return None, None
    else:  # ia3
        targets, feedforward = _IA3_TARGETS.get(model_type, ((), ()))
        targets = [t for t in targets if t in available]
        if targets:
            return targets, [f for f in feedforward if f in targets]
        if model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            return None, TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    raise ConfigError(
        f"No default {method} target modules for the '{model_type}' architecture: set peft.target_modules to some "
        f"of its linear layers: {', '.join(linear_module_names(llm)) or '(none found)'}"
    )


def _config_with_options(config_cls, base: dict[str, Any], options: dict[str, Any], method: str):
    fields = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ConfigError(f"Unknown peft option '{unknown[0]}' for method {method} ({config_cls.__name__}). "
                          f"Valid options: {', '.join(sorted(fields))}")
    try:
        return config_cls(**{**base, **options})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid peft options for method {method}: {e}") from None


def build_peft_config(llm: nn.Module, spec: PeftSpec):
    """The peft config dataclass for `spec` on this LLM (defaults filled in per architecture)."""
    check_peft_spec(spec)
    if spec.method == "none":
        return None
    import peft

    options = {k: v for k, v in (spec.options or {}).items() if k != "quantize"}
    method = spec.method
    if spec.layers is not None:
        if "layers" not in METHOD_FIELDS[method]:
            raise ConfigError(f"peft.layers applies to {', '.join(m for m, f in METHOD_FIELDS.items() if 'layers' in f)}, "
                              f"not {method}")
        if "layers_to_transform" in options:
            raise ConfigError("Give the layers once: peft.layers or peft.options.layers_to_transform, not both")
        options["layers_to_transform"] = list(spec.layers)
    task = {"task_type": "CAUSAL_LM"}
    if method in ("lora", "dora"):
        targets = spec.target_modules
        if targets is None:
            targets, _ = _default_targets(llm, method)
        base = dict(task, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                    use_dora=method == "dora")
        return _config_with_options(peft.LoraConfig, base, options, method)
    if method == "ia3":
        targets, feedforward = spec.target_modules, None
        if targets is None:
            targets, feedforward = _default_targets(llm, method)
        elif "feedforward_modules" not in options:
            # IA3 scales the *input* of feed-forward modules; pick the usual ones among the targets
            feedforward = [t for t in targets if t in ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")]
        base = dict(task, target_modules=targets, feedforward_modules=feedforward)
        return _config_with_options(peft.IA3Config, base, options, method)
    if method == "prompt_tuning":
        base = dict(task, num_virtual_tokens=spec.num_virtual_tokens)
        return _config_with_options(peft.PromptTuningConfig, base, options, method)
    if method == "prefix_tuning":
        if options.get("prefix_projection"):
            raise ConfigError("peft.options.prefix_projection is not supported: peft saves only the projected prefix, "
                              "so a saved model or checkpoint could not be trained further; leave it off")
        base = dict(task, num_virtual_tokens=spec.num_virtual_tokens)
        return _config_with_options(peft.PrefixTuningConfig, base, options, method)
    # adaption_prompt (LLaMA-Adapter)
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    model_type = _model_type(llm)
    if model_type not in TRANSFORMERS_MODEL_CONFIG:
        raise ConfigError(f"PEFT method adaption_prompt (LLaMA-Adapter) supports the {', '.join(TRANSFORMERS_MODEL_CONFIG)} "
                          f"architectures only, not '{model_type}'; use lora, dora, ia3, prompt_tuning or "
                          f"prefix_tuning instead")
    layers = getattr(base_llm(llm).config, "num_hidden_layers", None) or 1
    base = dict(task, adapter_len=spec.num_virtual_tokens, adapter_layers=layers)
    config = _config_with_options(peft.AdaptionPromptConfig, base, options, method)
    if not 1 <= config.adapter_layers <= layers:
        raise ConfigError(f"peft.options.adapter_layers must be between 1 and {layers} (the LLM's layers)")
    return config


def attach_peft(llm: nn.Module, spec: PeftSpec) -> nn.Module:
    """Wrap `llm` with the PEFT modules of `spec` and return the `peft.PeftModel` (`llm` itself for "none").

    peft freezes the base weights and leaves the adapter trainable; the wrapper keeps `llm`'s train/eval mode.
    """
    config = build_peft_config(llm, spec)
    if config is None:
        return llm
    if is_peft_model(llm):
        raise ConfigError("The LLM already carries PEFT modules; attach them once")
    import peft

    on_meta = next(llm.parameters()).device.type == "meta"  # described, not loaded: nothing to quantize
    if (spec.options or {}).get("quantize") and not on_meta:
        if getattr(llm, "hf_quantizer", None) is None:
            raise ConfigError("QLoRA needs the LLM loaded quantized (load it with "
                              "workbench.peft_modules.quantization_config(spec) as quantization_config)")
        llm = peft.prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    training = llm.training
    try:
        with _quiet():
            wrapped = peft.get_peft_model(llm, config)
    except ValueError as e:  # e.g. target modules that do not exist in the model
        raise ConfigError(f"Could not attach PEFT method {spec.method}: {str(e).strip().splitlines()[0]}. "
                          f"Linear layers of this LLM: {', '.join(linear_module_names(llm))}") from None
    return wrapped.train(training)  # new modules (LoRA dropout, …) follow the model's mode: an eval LLM stays so


# ---------------------------------------------------------------------------------------------- generation

def generate(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """`llm.generate(inputs_embeds=..., attention_mask=...)` that also works for prompt and prefix tuning.

    peft's own generate refuses `inputs_embeds` for prompt-learning methods (its patched
    prepare_inputs_for_generation hides the argument from transformers, and prompt tuning would rebuild the
    embeddings from the empty input_ids). So the virtual tokens are put in place here and the base model
    generates: prompt tuning prepends its prompt embeddings (and ones to the mask); prefix tuning hands its
    key/value prefix over as a prefilled cache, with placeholder embeddings standing for the cached positions
    (transformers treats `inputs_embeds` as the full sequence, cache included, and feeds only the rest).
    Returns only the new tokens, as generate does for `inputs_embeds`.
    """
    if not is_peft_model(llm) or not llm.active_peft_config.is_prompt_learning:
        return llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
    method = peft_method(llm)
    if method not in ("prompt_tuning", "prefix_tuning"):
        raise ConfigError(f"Generation with inputs_embeds is not supported for the {method} PEFT method")
    config = llm.active_peft_config
    batch, n = inputs_embeds.shape[0], int(config.num_virtual_tokens)
    mask = torch.cat((attention_mask.new_ones(batch, n), attention_mask), dim=1)
    base = base_llm(llm)
    if method == "prefix_tuning":
        cache = llm.get_prompt(batch_size=batch, max_cache_len=-1)
        placeholder = inputs_embeds.new_zeros(batch, n, inputs_embeds.shape[-1])
        return base.generate(inputs_embeds=torch.cat((placeholder, inputs_embeds), dim=1), attention_mask=mask,
                             past_key_values=cache, **kwargs)
    prompts = llm.get_prompt(batch_size=batch).to(inputs_embeds.dtype)
    return base.generate(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), attention_mask=mask, **kwargs)


# ---------------------------------------------------------------------------------------------- save / load

def save_peft(llm: nn.Module, path: str | Path) -> Path:
    """Write the adapter (adapter_config.json + adapter_model.safetensors) into `path`."""
    if not is_peft_model(llm):
        raise ConfigError("The LLM carries no PEFT modules to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: the base embeddings are never resized here (and "auto" would ask the hub)
    llm.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    readme = path / "README.md"  # peft's model card template; the workbench manifest describes the model
    if readme.is_file():
        readme.unlink()
    return path


def _saved_method(path: Path) -> str:
    config = json.loads((path / "adapter_config.json").read_text())
    kind = str(config.get("peft_type", "")).lower()
    return "dora" if kind == "lora" and config.get("use_dora") else kind


def load_peft(llm: nn.Module, path: str | Path, spec: PeftSpec | None = None) -> nn.Module:
    """Load an adapter written by `save_peft` and return the wrapped model.

    On a model that already carries the same PEFT modules (as `attach_peft(llm, spec)` built them), the weights
    are loaded in place, strictly (same tensors, same shapes); on a plain model the adapter is attached from
    its own adapter_config.json (trainable, except prompt and prefix tuning, which peft loads for inference).
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{path} holds no PEFT adapter (no adapter_config.json)")
    saved = _saved_method(path)
    expected = spec.method if spec is not None and spec.method != "none" else peft_method(llm)
    if expected != "none" and saved != expected:
        raise ConfigError(f"{path} holds a {saved} adapter, but the model is configured for {expected}")
    import peft
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    if not is_peft_model(llm):
        # peft loads prompt-learning adapters for inference only (it refuses is_trainable for them)
        trainable = saved not in ("prompt_tuning", "prefix_tuning", "p_tuning", "multitask_prompt_tuning")
        try:
            with _quiet():
                return peft.PeftModel.from_pretrained(llm, str(path), is_trainable=trainable)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ConfigError(f"{path}: could not load the adapter: {str(e).strip().splitlines()[0]}") from None
    weights = load_peft_weights(str(path), device=str(next(llm.parameters()).device))
    want = set(get_peft_model_state_dict(llm, save_embedding_layers=False).keys())
    if set(weights) != want:
        raise ConfigError(f"{path} does not match the PEFT modules built from the config: "
                          f"missing {sorted(want - set(weights))[:3]}, unexpected {sorted(set(weights) - want)[:3]}")
    try:
        set_peft_model_state_dict(llm, weights)
    except RuntimeError as e:  # same names, other shapes
        raise ConfigError(f"{path} does not match the PEFT modules built from the config: "
                          f"{str(e).strip().splitlines()[0]}") from None
    return llm


@contextlib.contextmanager
def _quiet():
    """peft asks transformers about a deprecated attribute while wrapping; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def unique_parameters(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Each parameter once, in order (tied weights and shared modules appear in several lists)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def method_options(method: str) -> list:
    """The declared options (`workbench.options.Option`) of a PEFT method: the `PeftSpec` fields it reads."""
    from .options import declared_options

    check_peft_spec(PeftSpec(method=method))
    return [o for o in declared_options(PeftSpec) if o.name in METHOD_FIELDS[method]]
