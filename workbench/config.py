"""Plain dataclass specs for every component; YAML round trip; validation with clear messages.

Later issues extend this file with the run-level specs (paradigm, data, training); the model-level
specs here are what `VisionLanguageModel` is built from and what a saved model directory records.
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


@dataclass
class IntegratorSpec:
    """The modality integrator: its registry name plus family-specific options."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class PeftSpec:
    """Parameter-efficient modules attached to the LLM (implemented with peft)."""

    method: str = "none"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
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

    def validate(self) -> "ModelConfig":
        if self.encoder.image_aspect not in ("pad", "resize", "crop"):
            raise ConfigError(f"encoder.image_aspect must be pad, resize or crop, not '{self.encoder.image_aspect}'")
        if self.llm.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"llm.dtype must be auto, float32, bfloat16 or float16, not '{self.llm.dtype}'")
        if self.llm.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ConfigError(f"llm.attn_implementation must be sdpa, eager or flash_attention_2")
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
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"Unknown config key '{prefix}{unknown[0]}'. Valid keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Accept a bare model config or a run config with a `model:` section."""
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return from_dict(ModelConfig, data).validate()


def load_model_config(path: str | Path) -> ModelConfig:
    try:
        return model_config_from_dict(load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_model_config(config: ModelConfig, path: str | Path) -> Path:
    return save_yaml(to_dict(config), path)
