"""transformers vision towers (CLIP, SigLIP, DINOv2, ViT, …): patch tokens of one encoder layer.

`spec.model` is a hub id or a local directory. For a full CLIP/SigLIP checkpoint only the vision
tower is built and loaded (its config's `vision_config`), so the text tower never takes memory.
Features are `hidden_states` of the chosen layer: the raw block output, without the final
layernorm, also for layer -1, so every layer choice is the same kind of tensor.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

from ..config import EncoderSpec
from ..errors import ConfigError
from . import ENCODERS
from .base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VisionEncoder

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class HFVisionEncoder(VisionEncoder):
    """Wraps a transformers vision model; the layer, CLS and extra prefix tokens are found by one probe forward."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, name: str, image_size: int, patch_size: int,
                 mean, std):
        super().__init__(spec)
        self.model = model.eval()
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.grid = (image_size // patch_size, image_size // patch_size)
        config_size = getattr(model.config, "image_size", image_size)
        # Another resolution needs the position embeddings interpolated (DINOv2 always does it, without the flag).
        self._kwargs = {}
        if config_size != image_size and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            self._kwargs["interpolate_pos_encoding"] = True
        try:
            with torch.no_grad():
                hidden = self._hidden_states(torch.zeros(1, 3, image_size, image_size))
        except Exception as e:
            raise ConfigError(f"'{name}' cannot run as a ViT-style vision encoder at {image_size} px: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
        n_blocks = len(hidden) - 1  # hidden_states[0] is the embeddings output
        if not -n_blocks <= spec.layer < n_blocks:
            raise ConfigError(f"encoder.layer {spec.layer} is out of range for '{name}': it has {n_blocks} layers, "
                              f"so use -{n_blocks} … {n_blocks - 1}")
        self._index = spec.layer if spec.layer < 0 else spec.layer + 1
        probe = hidden[self._index]
        patches = self.grid[0] * self.grid[1]
        if probe.dim() != 3 or probe.shape[1] < patches:
            raise ConfigError(f"'{name}' gives hidden states of shape {tuple(probe.shape)}, not (1, tokens, dim) with "
                              f"{patches} patch tokens: only plain ViT-style models are supported")
        self._prefix = probe.shape[1] - patches  # 0 (SigLIP), 1 (CLS), 1 + registers (DINOv2-reg)
        self.has_cls = self._prefix > 0
        self.feature_dim = int(probe.shape[2])

    def _hidden_states(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **self._kwargs)
        if getattr(out, "hidden_states", None) is None:
            raise ConfigError("the model returns no hidden_states")
        return out.hidden_states

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self._hidden_states(pixel_values)[self._index]
        if self._prefix > 1:  # keep the CLS token, drop register / distillation tokens
            tokens = torch.cat([tokens[:, :1], tokens[:, self._prefix:]], dim=1)
        return tokens


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a vision tower from a full checkpoint reports every text weight as unexpected: expected, so hushed."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _side(size) -> int | None:
    """One side from an image processor's size / crop_size (int, dict or SizeDict)."""
    if size is None or isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return get("height") or get("shortest_edge")


def _processor_settings(source: str, local: bool, kwargs: dict, trust: bool) -> tuple:
    """(mean, std, size) from the model's preprocessor_config.json, or Nones when it has none."""
    if local and not (Path(source) / "preprocessor_config.json").is_file():
        return None, None, None
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust, **kwargs)
    except Exception:  # no processor, or one that cannot be built here: the defaults below apply
        return None, None, None
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    return getattr(proc, "image_mean", None), getattr(proc, "image_std", None), _side(crop) or _side(
        getattr(proc, "size", None))


def build_hf_vision(spec: EncoderSpec, name: str, default_model: str | None) -> VisionEncoder:
    from transformers import AutoConfig, AutoModel

    from ..hub import hub_kwargs, looks_like_hub_id

    source = spec.model or default_model
    if not source:
        raise ConfigError(f"encoder '{name}' needs encoder.model: a hub id (facebook/dinov2-small) or a local directory")
    local = not looks_like_hub_id(source)
    if local:
        if not Path(source).expanduser().is_dir():
            raise ConfigError(f"encoder.model '{source}' is neither a local directory nor a hub id (org/name)")
        source, kwargs = str(Path(source).expanduser()), {}
    else:
        kwargs = hub_kwargs(source, "Encoder")  # OfflineError now, not after minutes of retries
    trust = spec.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **kwargs)
        vision_config = getattr(config, "vision_config", None) or config  # CLIPConfig → CLIPVisionConfig, …
        if spec.weights == "random":  # the architecture only: nothing but config.json is read
            model, info = AutoModel.from_config(vision_config, trust_remote_code=trust), {"missing_keys": []}
        else:
            with _quiet_transformers():
                model, info = AutoModel.from_pretrained(source, config=vision_config, trust_remote_code=trust,
                                                        use_safetensors=True, dtype=torch.float32,
                                                        output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"Could not load vision encoder '{source}': {first}") from e
    # Poolers / heads / final norms are unused; an embedding or encoder weight left random is a broken load.
    missing = [k for k in info["missing_keys"]
               if ("embeddings" in k or "encoder" in k or "pre_layrnorm" in k) and "mask_token" not in k]
    if missing:
        raise ConfigError(f"'{source}' lacks vision weights the encoder needs: {', '.join(sorted(missing)[:5])}")

    mean, std, size = _processor_settings(source, local, kwargs, trust)
    model_type = getattr(vision_config, "model_type", "")
    fallback = (SIGLIP_MEAN, SIGLIP_STD) if "siglip" in model_type else \
        (CLIP_MEAN, CLIP_STD) if "clip" in model_type else (IMAGENET_MEAN, IMAGENET_STD)
    patch = getattr(vision_config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    image_size = getattr(vision_config, "image_size", None)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    image_size = spec.image_size or size or image_size
    if not patch or not image_size:
        raise ConfigError(f"'{source}' has no patch_size / image_size in its config: not a ViT-style vision model")
    return HFVisionEncoder(spec, model, source, int(image_size), int(patch), mean or fallback[0], std or fallback[1])


@ENCODERS.register("clip", backend="transformers", offline=False, grid="24×24", dim=1024,
                   description="CLIP vision tower via transformers (default openai/clip-vit-large-patch14-336, as LLaVA-1.5)")
def clip(spec: EncoderSpec) -> VisionEncoder:
    return build_hf_vision(spec, "clip", "openai/clip-vit-large-patch14-336")


@ENCODERS.register("siglip", backend="transformers", offline=False, grid="27×27", dim=1152,
                   description="SigLIP vision tower via transformers, no CLS token (default google/siglip-so400m-patch14-384)")
def siglip(spec: EncoderSpec) -> VisionEncoder:
    return build_hf_vision(spec, "siglip", "google/siglip-so400m-patch14-384")


@ENCODERS.register("hf_vision", backend="transformers", offline=False,
                   description="Any transformers ViT-style vision model with hidden_states (model: hub id or directory)")
def hf_vision(spec: EncoderSpec) -> VisionEncoder:
    return build_hf_vision(spec, "hf_vision", None)
