"""open_clip ViT image towers: patch tokens of one transformer block, CLS first.

`spec.model` is an open_clip architecture (ViT-B-32, ViT-L-14-336, …) or, with `spec.model_config`,
one defined by a JSON file. `spec.pretrained` is an open_clip tag (laion2b_s34b_b79k, …), a local
checkpoint file, or None for random weights. Only the image tower is built for real and loaded (the
text tower is a stub), and weights are read with safetensors or torch.load(weights_only=True); a tag
comes from the hub cache when offline, so open_clip never tries the network then.

Features are the raw output of block `spec.layer` (no ln_post / projection, also for -1), so every
layer choice is the same kind of tensor and an integrator never sees a norm only the last one had.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from ..config import EncoderSpec
from ..errors import ConfigError, OfflineError, UnknownComponentError
from . import ENCODERS
from .base import CLIP_MEAN, CLIP_STD, VisionEncoder

DEFAULT_MODEL = "ViT-B-32"


class OpenCLIPEncoder(VisionEncoder):
    """Holds only open_clip's `visual` tower, cut after the chosen block (later blocks, ln_post, proj are dropped)."""

    has_cls = True

    def __init__(self, spec: EncoderSpec, visual: torch.nn.Module, name: str):
        super().__init__(spec)
        n = len(visual.transformer.resblocks)
        if not -n <= spec.layer < n:
            raise ConfigError(f"encoder.layer {spec.layer} is out of range for open_clip '{name}': "
                              f"it has {n} blocks, so use -{n} … {n - 1}")
        # Keep blocks 0..index only: nothing after the chosen block runs or holds parameters.
        visual.prune_intermediate_layers(indices=[spec.layer % n], prune_norm=True, prune_head=True)
        for attr in ("attn_pool", "attn_pool_contrastive"):  # CoCa poolers: unused, so not trainable either
            if getattr(visual, attr, None) is not None:
                setattr(visual, attr, None)
        self.visual = visual.eval()
        height, width = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
        if height != width:
            raise ConfigError(f"open_clip '{name}' expects {height}×{width} images; only square inputs are supported")
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.image_size = int(height)
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))
        self.feature_dim = int(visual.transformer.width)
        self.grid = tuple(int(g) for g in visual.grid_size)

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # open_clip's own intermediates API handles batch_first / seq-first transformers alike.
        out = self.visual.forward_intermediates(
            pixel_values, indices=[-1], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)


_STUB_TEXT = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


def _read_state(path: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # corrupt file, or a pickle that weights_only refuses
        raise ConfigError(f"Checkpoint {path} could not be read safely: {_first_line(e)}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"Checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_visual(model: torch.nn.Module, path: str, name: str) -> None:
    """Load the image tower's weights from a full open_clip checkpoint (or one holding only `visual.*`/bare keys)."""
    from open_clip.model import resize_pos_embed

    state = _read_state(path)
    if not any(k.startswith("visual.") for k in state):
        state = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(state, model)  # another encoder.image_size: interpolate the position grid
    visual_state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    try:
        missing, unexpected = model.visual.load_state_dict(visual_state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"Checkpoint {path} does not fit open_clip '{name}': {_first_line(e)}") from e
    if missing or unexpected:
        raise ConfigError(f"Checkpoint {path} does not fit open_clip '{name}': missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def _hush_random_init_warning(active: bool):
    """open_clip warns 'initialized randomly' when built without its own loader; untrue when we load next."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        if active:
            root.removeFilter(keep)


def _is_vit(model_cfg: dict | None) -> bool:
    vision = (model_cfg or {}).get("vision_cfg", {})
    return "timm_model_name" not in vision and not isinstance(vision.get("layers", 12), (list, tuple))


def _register_config(path_str: str, model: str | None) -> str:
    """Add a JSON architecture to open_clip's registry (under its file stem) and return that name."""
    import open_clip

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ConfigError(f"encoder.model_config {path} does not exist")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"encoder.model_config {path} is not a readable JSON file: {e}") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"encoder.model_config {path} must hold embed_dim, vision_cfg and text_cfg "
                          f"(open_clip ignores other files)")
    if model and model != path.stem:
        raise ConfigError(f"encoder.model_config {path.name} defines open_clip model '{path.stem}' but encoder.model "
                          f"is '{model}': leave encoder.model empty or name the file {model}.json")
    if open_clip.get_model_config(path.stem) != cfg:  # skip re-adding the same file on every build
        open_clip.add_model_config(path)
    return path.stem


def _tag_checkpoint(name: str, tag: str, tag_cfg: dict) -> str:
    """Path of a tag's weights: from the local hub cache when offline (never touching the network), else downloaded."""
    from ..hub import is_offline, offline_message

    if is_offline():
        hub_id = tag_cfg.get("hf_hub", "")
        if hub_id:
            from huggingface_hub import try_to_load_from_cache

            repo, filename = os.path.split(hub_id)
            filename = filename or "open_clip_pytorch_model.bin"
            safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else \
                os.path.splitext(filename)[0] + ".safetensors"
            for candidate in (safe, filename):
                cached = try_to_load_from_cache(repo, candidate)
                if isinstance(cached, str) and os.path.isfile(cached):
                    return cached
        raise OfflineError(offline_message(f"{name}:{tag}", "Encoder"))
    import open_clip

    try:
        path = open_clip.download_pretrained(tag_cfg)
    except Exception as e:  # network / hub failures: one readable line instead of a retry trace
        raise OfflineError(f"Could not download open_clip weights '{name}:{tag}': {_first_line(e)}") from e
    if not path:  # a tag with no source would otherwise leave the weights silently random
        raise ConfigError(f"open_clip tag '{name}:{tag}' names no weights file")
    return path


@ENCODERS.register("open_clip", backend="open_clip", offline=False, grid="7×7", dim=768,
                   description="open_clip ViT image tower (model: ViT-B-32, …; pretrained: tag or checkpoint file)")
def open_clip_encoder(spec: EncoderSpec) -> VisionEncoder:
    import open_clip

    name = _register_config(spec.model_config, spec.model) if spec.model_config else (spec.model or DEFAULT_MODEL)
    if name.startswith(("hf-hub:", "local-dir:")):  # get_model_config would fetch from the hub at once
        raise ConfigError(f"open_clip model '{name}': hf-hub:/local-dir: names are not supported; give an "
                          f"architecture (or encoder.model_config) and a checkpoint file in encoder.pretrained")
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        valid = [m for m in open_clip.list_models() if _is_vit(open_clip.get_model_config(m))]
        raise UnknownComponentError(f"Unknown open_clip architecture '{name}'. Valid ViT architectures: "
                                    f"{', '.join(valid)} (or give encoder.model_config, a JSON file)")
    if not _is_vit(model_cfg):
        raise ConfigError(f"open_clip '{name}' has a ResNet or timm image tower; only ViT towers are supported")

    checkpoint, tag_cfg = None, {}
    if spec.weights == "random":
        pass  # the architecture with fresh weights: no checkpoint, no download
    elif spec.pretrained and Path(spec.pretrained).expanduser().is_file():
        checkpoint = str(Path(spec.pretrained).expanduser())
    elif spec.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, spec.pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(f"encoder.pretrained '{spec.pretrained}' is neither a checkpoint file nor an open_clip "
                              f"tag of '{name}'. Tags: {', '.join(tags) or 'none'}")
        checkpoint = _tag_checkpoint(name, spec.pretrained, tag_cfg)

    # The text tower is replaced by a stub: it is never used, so it should cost neither memory nor a download
    # (roberta / mt5 / nllb text towers would fetch a transformers config from the hub).
    with _hush_random_init_warning(checkpoint is not None):
        model = open_clip.create_model(
            name, force_image_size=spec.image_size, pretrained_text=False, text_cfg=_STUB_TEXT,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu")),  # OpenAI weights need QuickGELU whatever the name
            force_preprocess_cfg={k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg},
        )
    if checkpoint:
        _load_visual(model, checkpoint, name)
    visual = model.visual
    del model  # text stub (and a CoCa decoder) are never used: let them be freed
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ConfigError(f"open_clip '{name}' has a {type(visual).__name__} image tower; only ViT towers are supported")
    return OpenCLIPEncoder(spec, visual, name)
