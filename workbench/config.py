"""Plain dataclass specs for every component; YAML round trip; validation with clear messages.

The model-level specs are what `VisionLanguageModel` is built from and what a saved model directory records;
the run-level specs (paradigm with its stages, data, training) are what a run folder records.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C")


@dataclass
class EncoderSpec:
    """Which image encoder, and how its features are taken."""

    name: str = "mobilenet_v2"
    """Registry name: mobilenet_v2, efficientnet_lite0, open_clip, clip, siglip, hf_vision, …"""
    model: str | None = None
    """Backend model id: an open_clip architecture, a hub id or a local directory."""
    pretrained: str | None = None
    """open_clip pretrained tag or checkpoint file; a checkpoint file for torchvision models."""
    model_config: str | None = None
    """open_clip only: a JSON model config for architectures open_clip does not ship."""
    layer: int = -1
    """Which layer's output to use (-1 last, -2 penultimate as in LLaVA)."""
    use_cls: bool = False
    """Keep the CLS token in front of the patch tokens (ViTs only)."""
    frozen: bool = True
    image_size: int | None = None
    """Input resolution; None uses the encoder's own."""
    image_aspect: str = "pad"
    """How non-square images become square: pad (LLaVA-1.5), resize (squash) or crop (center)."""
    trust_remote_code: bool = False
    weights: str = "pretrained"
    """pretrained, or random: the architecture with fresh weights (for transformers encoders only its config.json
    is needed; torchvision and open_clip need nothing)."""


@dataclass
class IntegratorSpec:
    """The modality integrator: its registry name plus family-specific options."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


LLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What `llm.dtype` (and the serving dtype of the app and `workbench serve`) may be."""


@dataclass
class LLMSpec:
    """The language model: an embedded alias, a hub id, a local directory or a .gguf file."""

    name: str = "smollm2-135m-instruct"
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, mps."""
    frozen: bool = True
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    use_safetensors: bool = True
    """Refuse pickle checkpoints unless turned off (safe by default)."""
    chat_template: str | None = None
    """A Jinja chat template overriding the tokenizer's own (or supplying one it lacks)."""
    weights: str = "pretrained"
    """pretrained, or random: the architecture from its config.json with fresh weights (sizing a design, GPU
    throughput benchmarks, tests) — no weight download, only the config and tokenizer."""


@dataclass
class PeftSpec:
    """Parameter-efficient modules attached to the LLM (implemented with peft).

    Options:
        r: rank of the low-rank update (at least 1)
        alpha: scale of the update (alpha / r multiplies it) (at least 1)
        dropout: dropout on the adapter's input while training (between 0 and 1)
        target_modules: linear layers that get the update, e.g. q_proj, v_proj; empty = the architecture's usual ones
        layers: LLM layer indices that get modules, e.g. 22, 23; empty = every layer (at least 0)
        num_virtual_tokens: virtual tokens (prompt and prefix tuning) or adaption prompt length (at least 1)
    """

    method: str = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    layers: list[int] | None = None
    """peft's layers_to_transform (lora, dora, ia3): None puts modules in every layer."""
    num_virtual_tokens: int = 10
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a `VisionLanguageModel` from its parts."""

    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    integrator: IntegratorSpec = field(default_factory=IntegratorSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    peft: PeftSpec = field(default_factory=PeftSpec)
    image_token: str = "<image>"
    max_length: int = 2048
    system_prompt: str | None = None
    """System message added to conversations that have none; None keeps the chat template's own default."""
    visual_entry_layer: int = 0
    """Decoder layer where a prefix integrator's visual tokens enter the LLM: 0 = with the text embeddings
    (LLaVA); k > 0 = the layers below k see only text, so with a frozen LLM there the trainer's text-state
    cache skips them (see visual_entry.py). Negative counts from the top: -8 = the top 8 layers. Integrators
    without tokens in the sequence (llama_adapter) ignore it."""

    def validate(self) -> "ModelConfig":
        if self.encoder.image_aspect not in ("pad", "resize", "crop"):
            raise ConfigError(f"encoder.image_aspect must be pad, resize or crop, not '{self.encoder.image_aspect}'")
        for part, spec in (("encoder", self.encoder), ("llm", self.llm)):
            if spec.weights not in ("pretrained", "random"):
                raise ConfigError(f"{part}.weights must be pretrained or random, not '{spec.weights}'")
        if self.llm.dtype not in LLM_DTYPES:
            raise ConfigError(f"llm.dtype must be auto, float32, bfloat16 or float16, not '{self.llm.dtype}'")
        if self.llm.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ConfigError("llm.attn_implementation must be sdpa, eager or flash_attention_2")
        if not self.image_token:
            raise ConfigError("image_token must be a non-empty string")
        if self.max_length < 16:
            raise ConfigError("max_length must be at least 16")
        return self


# ---------------------------------------------------------------- generic dict/YAML conversion

def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = _drop_retired(cls, data, where)
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"Unknown config key '{prefix}{unknown[0]}'. Valid keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


RETIRED_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    "StageSpec": {"loraplus_lr_ratio": (1.0, "LoRA+ did not pay: bench/RESULTS.md, issue 15")},
}
"""Removed options by spec class: name -> (the old default, which saved runs carry and which is dropped; why)."""


def _drop_retired(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Saved configs still name options that were removed: their old default is dropped, any other value refused."""
    retired = RETIRED_KEYS.get(cls.__name__, {})
    kept = {}
    for key, value in data.items():
        if key not in retired:
            kept[key] = value
            continue
        default, why = retired[key]
        if value != default:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"'{name}' was removed ({why}); delete it from the config")
    return kept


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"Config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level")
    return data


def save_yaml(data: dict[str, Any], path: str | Path) -> Path:
    from .atomic_files import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Accept a bare model config or a run config with a `model:` section."""
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return from_dict(ModelConfig, data).validate()


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A model config from YAML (a bare model config or a run config); overrides name keys of the model
    config (`integrator.name=qformer`; a leading `model.` is accepted too)."""
    try:
        data = load_yaml(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        overrides = [o[len("model."):] if o.startswith("model.") else o for o in overrides or []]
        return model_config_from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_model_config(config: ModelConfig, path: str | Path) -> Path:
    return save_yaml(to_dict(config), path)


# ---------------------------------------------------------------- run-level specs (training engine)

@dataclass
class DataSpec:
    """A dataset by loader kind (easy-vqa, llava, captions, emoji-captions, hf) and the loader's options."""

    kind: str = "easy-vqa"
    options: dict[str, Any] = field(default_factory=dict)
    balance: float = 0.0
    """Training only: draw answers evenly within each question template, so the question alone stops giving the
    answer away (0 off, 1 fully balanced; see workbench/data/balance.py)."""


@dataclass
class StageSpec:
    """One stage of a paradigm: its data, which parts train, and their learning rates."""

    name: str = "train"
    data: DataSpec | None = None
    """None: the run's `data`."""
    train_encoder: bool = False
    train_integrator: bool = True
    llm: str = "frozen"
    """frozen, full, or peft (the run's `model.peft` modules train, the rest of the LLM stays frozen)."""
    lr: float = 1e-3
    """Learning rate of the integrator (and of in-LLM integrator modules)."""
    lr_llm: float = 2e-5
    lr_encoder: float = 1e-5
    epochs: float = 1.0
    max_steps: int | None = None
    """Stops the stage early; None trains `epochs` over the data."""
    max_minutes: float | None = None
    """A wall-clock budget for the stage (evaluations included): it stops when the budget is spent, and the
    learning rate's cosine decay follows the elapsed share of the budget, so the run anneals by the deadline."""


@dataclass
class TrainingSpec:
    """Loop settings shared by every stage."""

    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX); else fp32), fp32, bf16, fp16."""
    eval_every: int = 0
    """Steps between evaluations (0: at the end of each stage only)."""
    eval_samples: int = 256
    early_stopping_patience: int = 0
    """Evaluations without improvement before a stage stops (0: never)."""
    gradient_checkpointing: bool | str = "auto"
    """auto, true or false. Recompute each decoder layer's activations in the backward pass instead of keeping
    them: far less memory for about one more forward pass per step. auto turns it on only when the memory
    estimate says the stage would not fit without it (large LLMs, large batches)."""
    cache_features: bool = True
    """Compute frozen encoder features once and reuse them across epochs, stages and runs."""
    cache_text_states: bool = True
    """Keep the hidden states of the LLM's bottom layers when they are frozen and see only text (the image
    enters above them), so training runs only the layers that learn (see training/text_state_cache.py)."""
    text_state_cache_mb: float = 2048.0
    share_prefix: bool | str = "auto"
    """auto, true or false. Run the tokens every sample of a batch starts with (system prompt, chat template)
    once per step instead of once per sample, where that is an exact rewrite (see shared_prefix.py). auto uses
    it in fp32 only: under bf16 autocast on a CPU it did not pay (bench/RESULTS.md, shared_prefix)."""
    save_every: int = 0
    """Steps between checkpoints (0: by time only; there is always one at the end of each stage and on cancel)."""
    save_every_minutes: float = 5.0
    """Minutes between checkpoints, so a run that is killed (out of memory, a reboot) loses at most this much
    (0: by steps only)."""
    keep_last: int = 2
    num_workers: int = 0
    log_every: int = 10


@dataclass
class RunConfig:
    """A run: the model, the paradigm (its stages), the data and the loop settings."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    paradigm: str = "single-stage"
    """single-stage, two-stage or direct: a recipe that fills in `stages` when they are not given."""
    stages: list[StageSpec] | None = None
    data: DataSpec = field(default_factory=DataSpec)
    eval_data: DataSpec | None = None
    training: TrainingSpec = field(default_factory=TrainingSpec)
    text_only: bool = False
    """Train and evaluate without the images: the text-only baseline of the same recipe."""

    def validate(self) -> "RunConfig":
        self.model.validate()
        t = self.training
        if t.batch_size < 1 or t.grad_accum < 1:
            raise ConfigError("training.batch_size and training.grad_accum must be at least 1")
        if t.gradient_checkpointing not in (True, False, "auto"):
            raise ConfigError(f"training.gradient_checkpointing must be auto, true or false, not "
                              f"{t.gradient_checkpointing!r}")
        if t.share_prefix not in (True, False, "auto"):
            raise ConfigError(f"training.share_prefix must be auto, true or false, not {t.share_prefix!r}")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"training.precision must be auto, fp32, bf16 or fp16, not '{t.precision}'")
        for spec in [self.data] + [s.data for s in self.stages or [] if s.data is not None]:
            if not 0.0 <= spec.balance <= 1.0:
                raise ConfigError(f"data.balance must be between 0 and 1, not {spec.balance}")
        for s in self.stages or []:
            if s.llm not in ("frozen", "full", "peft"):
                raise ConfigError(f"stage '{s.name}': llm must be frozen, full or peft, not '{s.llm}'")
            if s.llm == "peft" and self.model.peft.method == "none":
                raise ConfigError(f"stage '{s.name}' trains PEFT modules but model.peft.method is none")
            if s.epochs <= 0 and not s.max_steps:
                raise ConfigError(f"stage '{s.name}': epochs must be positive (or give max_steps)")
            if s.max_minutes is not None and s.max_minutes <= 0:
                raise ConfigError(f"stage '{s.name}': max_minutes must be positive, not {s.max_minutes}")
        return self


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) applied to a config mapping, for the command line:
    `--set model.integrator.name=qformer --set training.batch_size=8 --set stages.0.max_minutes=5` (a number
    indexes a list). Keys are checked later by from_dict."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"An override must look like key.sub=value, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"Override '{item}': '{part}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                    break
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}': '{parts[depth - 1]}' is not a section")
            if last:
                node[part] = value
                break
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return data


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    try:
        return from_dict(RunConfig, apply_overrides(load_yaml(path), overrides)).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_run_config(config: RunConfig, path: str | Path) -> Path:
    return save_yaml(to_dict(config), path)
