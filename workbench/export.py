"""A trained model out of the workbench: plain-transformers LLaVA where the parts allow, merged, or as it is —
each with a model card.

`export(source, format, out)` is the one entry point (the CLI's `workbench export`, the app's Export button,
notebook 5 and `frontend.export_model` call it). `source` is a run id, a run folder or a saved model folder.

Formats:
- `hf-llava`: a directory that `transformers.LlavaForConditionalGeneration.from_pretrained(DIR)` and
  `AutoProcessor.from_pretrained(DIR)` load without `trust_remote_code`. Possible when the parts are LLaVA's: a
  transformers CLIP / SigLIP vision tower (or an open_clip ViT, converted to a CLIP tower), the 2-layer MLP
  projector without the workbench's LayerNorms (`input_norm: false` — a `batch` standardiser is folded into
  the first layer — and `output_norm: false`), and a decoder-only LLM with LoRA / DoRA / IA3 merged in. The
  encoder's `layer` / `use_cls` become `vision_feature_layer` / `vision_feature_select_strategy`; the image
  processor pads, crops or resizes as `encoder.image_aspect` did; the tokenizer gains the image token
  (`image_seq_length` = the visual tokens per image) and a chat template that renders the workbench's prompt
  exactly. Otherwise `HFLlavaBlocked` (a ConfigError) names every part that blocks it and why.
- `merged`: the workbench format with PEFT modules merged into the LLM (no `peft` at load time); the LLM is a
  standard transformers causal-LM directory inside it (`llm/`), and a transformers vision tower is saved beside
  it (`encoder/`), so the directory is self-contained and the language part is usable on its own.
- `workbench`: the saved model directory as it is, copied or zipped.

Every export writes `README.md`: a model card with YAML metadata (parts with their sources and licences, the
paradigm and stages that trained it, the data, evaluation results beside the text-only baseline, trainable
parameters, training time and hardware, intended use and limits, how to load it in two lines). The hf-llava and
merged exports are checked before they are handed over: the export is loaded back the way its user will load
it and must give the workbench model's greedy tokens and logits (within float tolerance) on a test image.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError

FORMATS = {
    "hf-llava": "plain transformers LlavaForConditionalGeneration + AutoProcessor (where the parts allow)",
    "merged": "workbench format, PEFT merged, the LLM as a standard transformers causal-LM directory inside",
    "workbench": "the saved workbench model directory as it is (copied, or zipped)",
}
CARD = "README.md"
MERGEABLE_PEFT = ("none", "lora", "dora", "ia3")
_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
_ACTIVATIONS = {"GELU": "gelu", "ReLU": "relu", "SiLU": "silu"}


class HFLlavaBlocked(ConfigError):
    """The parts of a model do not fit LlavaForConditionalGeneration; `reasons` lists each part and why."""

    def __init__(self, reasons: list[str], mergeable: bool = True):
        self.reasons = reasons
        instead = ("Export with --format merged instead (the workbench format with PEFT merged and the LLM as a "
                   "plain transformers model)") if mergeable else \
            "Export with --format workbench instead (its PEFT modules cannot be merged, so merged is blocked too)"
        super().__init__("Cannot export to hf-llava: " + "; ".join(reasons) + ". " + instead)


@dataclass
class ExportResult:
    format: str
    path: Path
    card: str
    check: dict[str, Any] | None = None
    """What the self-check measured: max |Δlogit|, whether the greedy tokens agree (None: not checked)."""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- sources

def resolve_source(source: str | Path, registry=None, which: str = "model") -> tuple[Path | None, Path]:
    """(run folder or None, saved model folder) for a run id, a run folder or a saved model folder."""
    path = Path(source).expanduser()
    if not path.exists():
        from .jobs import RunRegistry

        path = (registry if registry is not None else RunRegistry()).run_dir(str(source))
        if not path.exists():
            raise ConfigError(f"'{source}' is neither a run id, a run folder nor a saved model folder")
    model_dir = next((d for d in (path / which, path) if (d / "config.yaml").is_file()), None)
    if model_dir is None:
        raise ConfigError(f"No saved model in {path} (looked for {which}/config.yaml and config.yaml): "
                          f"a run has one once it has finished")
    run_dir = next((d for d in (model_dir, model_dir.parent) if (d / "run.yaml").is_file()), None)
    return run_dir, model_dir


# ---------------------------------------------------------------------------------------------- hf-llava: can it?

def hf_llava_blockers(model) -> list[str]:
    """Every reason the model's parts do not fit LlavaForConditionalGeneration (empty: they do)."""
    reasons = []
    reasons += _encoder_blockers(model.encoder, model.config.encoder)
    spec = model.config.integrator
    if spec.name != "mlp":
        reasons.append(_integrator_blocker(spec.name))
    else:
        reasons += _projector_blockers(model)
    reasons += _llm_blockers(model)
    return reasons


def _integrator_blocker(name: str) -> str:
    """Why an integrator other than LLaVA's MLP projector cannot go into LlavaForConditionalGeneration."""
    from .integrators import INTEGRATORS

    info = INTEGRATORS.info(name) if name in INTEGRATORS else {}
    where = "adds modules inside the LLM's layers" if info.get("placement") == "in_llm" else \
        f"is a {info.get('family', 'custom')} integrator"
    return (f"integrator '{name}' {where}, which LlavaForConditionalGeneration has no place for (its projector is "
            f"LLaVA-1.5's 2-layer MLP): train with integrator mlp (depth 2, input_norm: false, output_norm: false)")


def config_blockers(config) -> list[str]:
    """The reasons visible in a model config alone (no weights loaded): what `export` refuses at once. Loading the
    model then checks the rest (the tower's type and resolution, the LLM's architecture, open_clip variants)."""
    from .encoders import ENCODERS

    reasons = []
    enc = config.encoder
    if enc.name in ENCODERS and ENCODERS.info(enc.name).get("backend") == "torchvision":
        what = f"encoder '{enc.name}'" + (f" ({enc.model})" if enc.model else "")
        reasons.append(f"{what} is not a ViT that transformers' LLaVA can hold (it needs a CLIP or SigLIP vision "
                       f"tower: train with encoder clip, siglip or an open_clip ViT)")
    spec, options = config.integrator, config.integrator.options
    if spec.name != "mlp":
        reasons.append(_integrator_blocker(spec.name))
    else:
        if options.get("input_norm", True) in (True, "layer"):
            reasons.append("input LayerNorm in the projector has no place in LlavaMultiModalProjector: train with "
                           "`input_norm: false`")
        if options.get("output_norm", True):
            reasons.append("output LayerNorm in the projector (visual tokens at the text scale) has no place in "
                           "LlavaMultiModalProjector: train with `output_norm: false`")
        depth = options.get("depth", 2)
        if depth != 2:
            reasons.append(f"the MLP projector has {depth} layer(s) (depth {depth}); LlavaMultiModalProjector has "
                           f"exactly 2: train with `depth: 2`")
        if config.visual_entry_layer:
            reasons.append(f"the visual tokens enter the LLM at decoder layer {config.visual_entry_layer} "
                           f"(`model.visual_entry_layer`); LLaVA puts them with the text embeddings: train with "
                           f"`visual_entry_layer: 0`")
    if config.peft.method not in MERGEABLE_PEFT:
        reasons.append(f"PEFT method {config.peft.method} cannot be merged into the LLM's weights (it adds virtual "
                       f"tokens or adaption prompts, which a plain transformers model has no place for): train with "
                       f"lora, dora or ia3")
    return reasons


def _encoder_blockers(encoder, spec) -> list[str]:
    from .encoders.hf_vision import HFVisionEncoder
    from .encoders.open_clip_encoder import OpenCLIPEncoder

    if isinstance(encoder, HFVisionEncoder):
        kind = getattr(encoder.model.config, "model_type", "?")
        if kind not in _VISION_TYPES:
            return [f"encoder '{spec.name}' is a {kind} tower; the hf-llava export supports CLIP and SigLIP vision "
                    f"towers (LLaVA's own)"]
        size = getattr(encoder.model.config, "image_size", encoder.image_size)
        if int(size) != encoder.image_size:
            return [f"encoder.image_size {encoder.image_size} differs from the tower's {size}: the workbench "
                    f"interpolates position embeddings at run time, LlavaForConditionalGeneration does not (train "
                    f"at the tower's own resolution)"]
        return []
    if isinstance(encoder, OpenCLIPEncoder):
        why = _open_clip_unconvertible(encoder.visual)
        return [f"encoder open_clip '{spec.model or spec.model_config}' cannot become a CLIP vision tower: {why}"] \
            if why else []
    what = f"encoder '{spec.name}'" + (f" ({spec.model})" if spec.model else "")
    return [f"{what} is not a ViT that transformers' LLaVA can hold (it needs a CLIP or SigLIP vision tower: "
            f"train with encoder clip, siglip or an open_clip ViT)"]


def _projector_blockers(model) -> list[str]:
    from torch import nn

    from .integrators.base import FeatureStandardizer

    integrator, options = model.integrator, model.config.integrator.options
    reasons = []
    if isinstance(integrator.norm, nn.LayerNorm):
        reasons.append("input LayerNorm in the projector has no place in LlavaMultiModalProjector: train with "
                       "`input_norm: false`")
    elif not isinstance(integrator.norm, (nn.Identity, FeatureStandardizer)):
        reasons.append(f"input norm {type(integrator.norm).__name__} has no place in LlavaMultiModalProjector: train "
                       f"with `input_norm: false`")
    if not isinstance(integrator.out_norm, nn.Identity):
        reasons.append("output LayerNorm in the projector (visual tokens at the text scale) has no place in "
                       "LlavaMultiModalProjector: train with `output_norm: false`")
    linears = [m for m in integrator.proj if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        reasons.append(f"the MLP projector has {len(linears)} layer(s) (depth {options.get('depth', len(linears))}); "
                       f"LlavaMultiModalProjector has exactly 2: train with `depth: 2`")
    elif linears[0].out_features != linears[1].out_features:
        reasons.append(f"the MLP projector's hidden width is {linears[0].out_features}; LlavaMultiModalProjector's "
                       f"is the LLM's hidden size {linears[1].out_features}: leave `hidden_dim` unset")
    return reasons


def _llm_blockers(model) -> list[str]:
    from transformers import MODEL_MAPPING

    from .peft_modules import base_llm

    reasons = []
    method = model.config.peft.method
    if method not in MERGEABLE_PEFT:
        reasons.append(f"PEFT method {method} cannot be merged into the LLM's weights (it adds virtual tokens or "
                       f"adaption prompts, which a plain transformers model has no place for): train with lora, dora "
                       f"or ia3")
    elif (model.config.peft.options or {}).get("quantize"):
        reasons.append("the LLM is quantized for QLoRA: merge the adapter into a full-precision copy of the LLM")
    llm = base_llm(model.llm)
    decoder_cls = MODEL_MAPPING.get(type(llm.config), None) if type(llm.config) in MODEL_MAPPING else None
    decoder = getattr(llm, "model", None)
    if decoder_cls is None or decoder is None or type(decoder) is not decoder_cls or \
            not hasattr(llm, "lm_head"):
        reasons.append(f"LLM architecture {type(llm).__name__} is not a decoder with an LM head that "
                       f"LlavaForConditionalGeneration can hold")
    return reasons


def _open_clip_unconvertible(visual) -> str | None:
    """Why an open_clip ViT image tower cannot be written as transformers' CLIPVisionModel (None: it can)."""
    from open_clip.transformer import LayerNorm as OCLayerNorm
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock
    from torch import nn

    if isinstance(visual.ln_pre, nn.Identity):
        return "it has no pre-LayerNorm (no_ln_pre), which CLIPVisionModel always applies"
    if getattr(visual.conv1, "bias", None) is not None:
        return "its patch embedding has a bias"
    norms = [visual.ln_pre]
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            return f"block {i} is a {type(block).__name__} (qk-norm / scaled-cosine attention)"
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            return "it uses layer scale (ls_init_value), which CLIP blocks do not have"
        if hasattr(block, "ln_1_kv"):
            return "it has cross-attention blocks"
        act = block.mlp.gelu
        if not isinstance(act, (nn.GELU, QuickGELU)) or (isinstance(act, nn.GELU) and act.approximate != "none"):
            return f"its MLP activation {type(act).__name__} is neither GELU nor QuickGELU"
        norms += [block.ln_1, block.ln_2]
    if any(not isinstance(n, (nn.LayerNorm, OCLayerNorm)) for n in norms):
        return "it uses a norm other than LayerNorm"
    if len({n.eps for n in norms}) != 1:
        return "its LayerNorms use different eps"
    return None


# ---------------------------------------------------------------------------------------------- hf-llava: parts

def _vision_part(model) -> dict[str, Any]:
    """The vision tower as a transformers model with LLaVA's feature layer / select strategy for it."""
    from .encoders.hf_vision import HFVisionEncoder

    encoder, spec = model.encoder, model.config.encoder
    if isinstance(encoder, HFVisionEncoder):
        tower = encoder.model
        has_cls = encoder.has_cls
        layer = spec.layer if spec.layer < 0 else spec.layer + 1  # hidden_states[0] is the embeddings' output
        patch = tower.config.patch_size
    else:  # open_clip: only the blocks up to the chosen one are kept; they become a CLIP tower
        tower = open_clip_to_clip_vision(encoder.visual)
        has_cls, layer, patch = True, -1, tower.config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return {"tower": tower, "layer": int(layer), "strategy": "default" if has_cls and not spec.use_cls else "full",
            "extra_tokens": 1 if has_cls else 0, "patch_size": int(patch)}


def open_clip_to_clip_vision(visual):
    """An open_clip ViT image tower (VisionTransformer) as transformers' CLIPVisionModel with the same weights:
    its hidden_states[i + 1] is open_clip block i's output (the features the workbench takes)."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPVisionConfig, CLIPVisionModel

    why = _open_clip_unconvertible(visual)
    if why:
        raise ConfigError(f"This open_clip tower cannot become a CLIP vision tower: {why}")
    blocks = list(visual.transformer.resblocks)
    width = int(visual.transformer.width)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, image_size=int(size), patch_size=int(patch),
        hidden_act="quick_gelu" if isinstance(blocks[0].mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=float(visual.ln_pre.eps), projection_dim=width)
    state = {"embeddings.class_embedding": visual.class_embedding,
             "embeddings.patch_embedding.weight": visual.conv1.weight,
             "embeddings.position_embedding.weight": visual.positional_embedding,
             "pre_layrnorm.weight": visual.ln_pre.weight, "pre_layrnorm.bias": visual.ln_pre.bias,
             # unused by LLaVA (pooled output only): an identity norm
             "post_layernorm.weight": torch.ones(width), "post_layernorm.bias": torch.zeros(width)}
    for i, block in enumerate(blocks):
        p = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        state.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
            p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
            p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
            p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
        })
    dtype = visual.conv1.weight.dtype
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    tower.load_state_dict({k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}, strict=True,
                          assign=True)
    _materialise_buffers(tower)
    return tower.eval()


def _materialise_buffers(module, source=None) -> None:
    """Non-persistent buffers of a model built on the meta device (rotary frequencies, position ids): taken from
    `source`, the same architecture already loaded, or rebuilt (position ids)."""
    have = dict(source.named_buffers()) if source is not None else {}
    for prefix, sub in module.named_modules():
        for name, buf in list(sub._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if key in have:
                sub._buffers[name] = have[key].detach().to("cpu").clone()
            elif name == "position_ids":
                sub._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            else:
                raise ConfigError(f"Cannot rebuild buffer {key} of {type(sub).__name__} for the export")


def _projector_state(model) -> tuple[dict[str, torch.Tensor], str]:
    """linear_1 / linear_2 weights of LlavaMultiModalProjector (a batch standardiser folded into linear_1)."""
    from torch import nn

    from .integrators.base import FeatureStandardizer

    integrator = model.integrator
    linears = [m for m in integrator.proj if isinstance(m, nn.Linear)]
    acts = [m for m in integrator.proj if type(m).__name__ in _ACTIVATIONS]
    w1, b1 = linears[0].weight.detach().float(), linears[0].bias.detach().float()
    if isinstance(integrator.norm, FeatureStandardizer):  # (x - mean) / sqrt(var + eps), a per-channel affine map
        norm = integrator.norm
        scale = 1.0 / torch.sqrt(norm.running_var.float() + norm.eps)
        b1 = b1 - w1 @ (norm.running_mean.float() * scale)
        w1 = w1 * scale
    state = {"linear_1.weight": w1, "linear_1.bias": b1,
             "linear_2.weight": linears[1].weight.detach().float(), "linear_2.bias": linears[1].bias.detach().float()}
    return state, _ACTIVATIONS[type(acts[0]).__name__]


def _image_processor(model):
    from PIL import Image
    from transformers import LlavaImageProcessor

    encoder = model.encoder
    size, aspect = encoder.image_size, model.config.encoder.image_aspect
    common = dict(image_mean=list(encoder.mean), image_std=list(encoder.std), resample=Image.BICUBIC,
                  do_convert_rgb=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_resize=True)
    if aspect == "resize":
        return LlavaImageProcessor(do_pad=False, size={"height": size, "width": size}, do_center_crop=False, **common)
    # pad: LLaVA-1.5's expand-to-square with the mean colour, as the workbench does; crop: shortest side, centre
    return LlavaImageProcessor(do_pad=aspect == "pad", size={"shortest_edge": size}, do_center_crop=True,
                               crop_size={"height": size, "width": size}, **common)


def chat_template_for(model) -> str:
    """The LLM's chat template behind a preamble that renders OpenAI/transformers-style content lists
    ({"type": "image"} → the image token and a newline, {"type": "text"} → its text) as the workbench's string
    messages, and adds the model's system prompt where the workbench does: the rendered prompt is the same."""
    from .data.prompting import FALLBACK_TEMPLATE

    token = json.dumps(model.config.image_token + "\n")
    system = model.config.system_prompt
    preamble = (
        "{%- set _wb = namespace(messages=[]) -%}"
        "{%- for _m in messages -%}"
        "{%- if _m['content'] is string -%}{%- set _text = _m['content'] -%}"
        "{%- else -%}{%- set _parts = namespace(text='') -%}"
        "{%- for _p in _m['content'] -%}"
        "{%- if _p['type'] in ['image', 'image_url'] -%}{%- set _parts.text = _parts.text + " + token + " -%}"
        "{%- elif _p['type'] == 'text' -%}{%- set _parts.text = _parts.text + _p['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set _text = _parts.text -%}{%- endif -%}"
        "{%- set _wb.messages = _wb.messages + [{'role': _m['role'], 'content': _text}] -%}"
        "{%- endfor -%}"
    )
    if system is not None:
        preamble += ("{%- if _wb.messages | length == 0 or _wb.messages[0]['role'] != 'system' -%}"
                     "{%- set _wb.messages = [{'role': 'system', 'content': " + json.dumps(system) + "}] + "
                     "_wb.messages -%}{%- endif -%}")
    preamble += "{%- set messages = _wb.messages -%}"
    return preamble + (model.formatter.template or FALLBACK_TEMPLATE)


def _exported_tokenizer(model, tmp: Path):
    """An independent copy of the model's tokenizer with the image token added (LlavaProcessor needs it)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    model.tokenizer.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    token = model.config.image_token
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = chat_template_for(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = model.tokenizer.pad_token
    return tokenizer


def build_hf_llava(model, tmp: Path):
    """(LlavaForConditionalGeneration sharing the model's tensors, LlavaProcessor) for a model whose PEFT modules
    are merged already."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .peft_modules import base_llm

    llm = base_llm(model.llm)
    dtype = model.dtype
    vision = _vision_part(model)
    tokenizer = _exported_tokenizer(model, tmp)
    image_id = tokenizer.convert_tokens_to_ids(model.config.image_token)
    embed = llm.get_input_embeddings().weight.detach()
    head = llm.lm_head.weight.detach()
    tied = head.data_ptr() == embed.data_ptr()
    vocab = embed.shape[0]
    if image_id >= vocab:  # a new row each: never read (image features replace it) and never generated (suppressed)
        grow = image_id + 1 - vocab
        embed = torch.cat([embed, embed.new_zeros(grow, embed.shape[1])])
        head = embed if tied else torch.cat([head, head.new_zeros(grow, head.shape[1])])
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = embed.shape[0]
    vision_config = copy.deepcopy(vision["tower"].config)
    for sub in (text_config, vision_config):  # local paths of the parts mean nothing where the export goes
        sub._name_or_path = ""
    projector, act = _projector_state(model)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), image_token_index=image_id,
        image_seq_length=model.num_visual_tokens, projector_hidden_act=act,
        vision_feature_select_strategy=vision["strategy"], vision_feature_layer=vision["layer"],
        multimodal_projector_bias=True, tie_word_embeddings=bool(tied))
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)

    def on_cpu(state):
        return {k: v.detach().to("cpu", dtype) for k, v in state.items()}

    decoder = on_cpu(llm.model.state_dict())
    decoder["embed_tokens.weight"] = embed.to("cpu", dtype)
    llava.model.vision_tower.load_state_dict(on_cpu(vision["tower"].state_dict()), strict=True, assign=True)
    llava.model.multi_modal_projector.load_state_dict(on_cpu(projector), strict=True, assign=True)
    llava.model.language_model.load_state_dict(decoder, strict=True, assign=True)
    llava.lm_head.load_state_dict({"weight": decoder["embed_tokens.weight"] if tied else head.to("cpu", dtype)},
                                  strict=True, assign=True)
    _materialise_buffers(llava.model.vision_tower, vision["tower"])
    _materialise_buffers(llava.model.language_model, llm.model)
    _materialise_buffers(llava)
    llava.eval()
    eos = llm.generation_config.eos_token_id or model.tokenizer.eos_token_id
    llava.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=128, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=llm.generation_config.bos_token_id, suppress_tokens=[image_id])
    processor = LlavaProcessor(image_processor=_image_processor(model), tokenizer=tokenizer,
                               patch_size=vision["patch_size"], vision_feature_select_strategy=vision["strategy"],
                               chat_template=tokenizer.chat_template, image_token=model.config.image_token,
                               num_additional_image_tokens=vision["extra_tokens"])
    return llava, processor


# ---------------------------------------------------------------------------------------------- checking

class TokenCollector:
    """A transformers streamer that keeps the generated token ids of every row of a batch (the prompt, which
    `generate` hands over first, is skipped)."""

    def __init__(self):
        self.rows: list[list[int]] | None = None
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        value = value.reshape(-1).tolist()
        if self.rows is None:
            self.rows = [[] for _ in value]
        for row, token in zip(self.rows, value):
            row.append(int(token))

    def end(self):
        pass


def check_image(size: int = 64):
    """A deterministic test picture: a red disc and a blue bar on a grey-green gradient."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    rgb = np.stack([60 + 80 * x, 120 + 60 * y, 90 + 40 * (1 - x)], axis=-1)
    disc = (x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.05
    rgb[disc] = (220, 30, 30)
    rgb[(y > 0.75) & (y < 0.85) & (x > 0.5)] = (30, 40, 210)
    return Image.fromarray(rgb.astype(np.uint8))


def _cut_at_eos(tokens: list[int], eos) -> list[int]:
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


@torch.inference_mode()
def workbench_reference(model, image, question: str = "What is in the image?", max_new_tokens: int = 8) -> dict:
    """The workbench model's logits over the prompt (image tokens spliced in) and its greedy answer tokens."""
    from .data.prompting import with_image_placeholders

    messages = [{"role": "user", "content": with_image_placeholders(question, 1, model.config.image_token)}]
    batch = model.prepare_batch([messages], [[image]], add_generation_prompt=True)
    batch.pop("labels")
    logits = model(**batch).logits.float().cpu()
    collector = TokenCollector()
    model.generate(messages, [image], max_new_tokens=max_new_tokens, streamer=collector)
    eos = model.llm.generation_config.eos_token_id or model.tokenizer.eos_token_id
    return {"logits": logits, "tokens": _cut_at_eos(collector.rows[0], eos), "eos": eos}


@torch.inference_mode()
def transformers_reference(path: str | Path, image, question: str = "What is in the image?",
                           max_new_tokens: int = 8, model=None, processor=None) -> dict:
    """The same for an hf-llava export, loaded the way a user of plain transformers loads it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = processor or AutoProcessor.from_pretrained(path)
    model = model or LlavaForConditionalGeneration.from_pretrained(path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    logits = model(**inputs).logits.float()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {"logits": logits, "tokens": _cut_at_eos(tokens, model.generation_config.eos_token_id),
            "input_ids": inputs["input_ids"][0].tolist(), "pixel_values": inputs["pixel_values"]}


def compare(reference: dict, exported: dict, dtype: torch.dtype = torch.float32) -> dict:
    """max |Δlogit| over the prompt (on the workbench's vocabulary) and whether the greedy tokens agree."""
    a, b = reference["logits"], exported["logits"]
    check = {"same_tokens": reference["tokens"] == exported["tokens"], "tokens": exported["tokens"],
             "workbench_tokens": reference["tokens"]}
    if a.shape[1] != b.shape[1]:
        return {**check, "max_abs_diff": float("inf"), "scale": 0.0,
                "problem": f"prompt lengths differ: {a.shape[1]} positions in the workbench, {b.shape[1]} exported"}
    vocab = min(a.shape[-1], b.shape[-1])
    diff = (a[..., :vocab] - b[..., :vocab]).abs().max().item()
    return {**check, "max_abs_diff": diff, "scale": a.abs().max().item(), "positions": a.shape[1]}


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


def _accept(check: dict, dtype: torch.dtype, what: str) -> dict:
    """Fail the export when the reloaded model disagrees with the workbench model beyond float tolerance."""
    scale = max(check.get("scale", 0.0), 1.0)
    check["within_tolerance"] = check["max_abs_diff"] <= _tolerance(dtype) * scale
    if not check["within_tolerance"] or (dtype == torch.float32 and not check["same_tokens"]):
        detail = check.get("problem") or (f"max |Δlogit| {check['max_abs_diff']:.3g} (logits up to {scale:.3g}); "
                                          f"greedy tokens {check['workbench_tokens']} vs {check['tokens']}")
        raise ConfigError(f"The {what} export does not reproduce the workbench model: {detail}. Nothing was "
                          f"written; please report this with the model's config.yaml")
    return check


# ---------------------------------------------------------------------------------------------- exporting

def load_for_export(model_dir: Path, device: str | None = None):
    from .model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(model_dir, device=device)
    return model.eval()


def merge_peft(model) -> list[str]:
    """Merge LoRA / DoRA / IA3 into the LLM's weights in place (the model no longer needs peft)."""
    from .config import PeftSpec
    from .peft_modules import is_peft_model, peft_method

    if not is_peft_model(model.llm):
        return []
    method = peft_method(model.llm)
    if method not in MERGEABLE_PEFT:
        raise ConfigError(f"PEFT method {method} cannot be merged into the LLM's weights (it adds virtual tokens or "
                          f"adaption prompts): export with --format workbench")
    model.llm = model.llm.merge_and_unload()
    model.config.peft = PeftSpec()
    return [f"{method} merged into the LLM's weights"]


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def _publish(staging: Path, out: Path, overwrite: bool) -> Path:
    if out.exists():
        if not overwrite:
            raise ConfigError(f"{out} exists: choose another --out or pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        staging.rename(out)
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: choose another --out or pass --force to replace it")


def export(source: str | Path, format: str = "hf-llava", out: str | Path | None = None, *, registry=None,
           which: str = "model", zip: bool = False, overwrite: bool = False, verify: bool = True,
           device: str | None = None, baseline: str | Path | None = None) -> ExportResult:
    """Export a run's (or a saved model folder's) model; see the module docstring for the formats.

    `out` defaults to `<run>/export/<format>` (or beside the model folder). `zip` (workbench format only) writes
    `<out>.zip` holding a `model/` folder. `verify` (hf-llava, merged) loads the export back and compares greedy
    tokens and logits with the workbench model; skip it for a model too large to hold twice. `baseline`: a
    text-only run whose evaluations the card shows beside this model's (found among the sibling runs if not
    given). Nothing is left behind when an export fails.
    """
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format '{format}'. Valid formats: {', '.join(FORMATS)}")
    if zip and format != "workbench":
        raise ConfigError("Only the workbench format is zipped (--zip); hf-llava and merged are directories")
    run_dir, model_dir = resolve_source(source, registry, which)
    if out is None:
        out = (run_dir or model_dir.parent) / "export" / (format if run_dir else f"{model_dir.name}-{format}")
    out = Path(out).expanduser().resolve()
    if out == model_dir.resolve() or model_dir.resolve() in out.parents:
        raise ConfigError(f"Export into a folder outside the saved model {model_dir}, not {out}")
    facts = describe_source(run_dir, model_dir, baseline=baseline, registry=registry)
    if format == "workbench":
        return _export_workbench(model_dir, out, facts, zip, overwrite)
    _check_out(out, overwrite)
    if format == "hf-llava":
        from .config import load_model_config

        config = load_model_config(model_dir / "config.yaml")
        reasons = config_blockers(config)
        if reasons:  # refused at once, before loading any weights
            raise HFLlavaBlocked(reasons, mergeable=config.peft.method in MERGEABLE_PEFT)
    model = load_for_export(model_dir, device)
    facts["parameters"] = model.parameter_report()
    if format == "hf-llava":
        reasons = hf_llava_blockers(model)
        if reasons:
            raise HFLlavaBlocked(reasons, mergeable=model.config.peft.method in MERGEABLE_PEFT)
    image = check_image(model.encoder.image_size)
    reference = workbench_reference(model, image) if verify else None
    facts.setdefault("parts_config", copy.deepcopy(model.config))  # the card names the parts it was built from
    notes = merge_peft(model)
    staging = _staging(out)
    try:
        if format == "hf-llava":
            check, more = _write_hf_llava(model, staging, reference, image)
        else:
            check, more = _write_merged(model, staging, reference, image, facts)
        notes += more
        card = model_card(model.config, facts, format, check=check, notes=notes)
        (staging / CARD).write_text(card, encoding="utf-8")
        path = _publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(format, path, card, check, notes)


def _write_hf_llava(model, staging: Path, reference: dict | None, image) -> tuple[dict | None, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        llava, processor = build_hf_llava(model, Path(tmp))
    llava.save_pretrained(staging)
    processor.save_pretrained(staging)
    notes = [f"vision_feature_layer {llava.config.vision_feature_layer}, select strategy "
             f"{llava.config.vision_feature_select_strategy}, {llava.config.image_seq_length} image tokens"]
    if model.config.encoder.image_aspect == "crop":
        notes.append("the processor resizes the shortest side before cropping the centre (the workbench crops, then "
                     "resizes): non-square pictures give slightly different pixels")
    del llava
    if reference is None:
        return None, notes
    exported = transformers_reference(staging, image)
    return _accept(compare(reference, exported), model.dtype, "hf-llava"), notes


def _write_merged(model, staging: Path, reference: dict | None, image, facts: dict) -> tuple[dict | None, list[str]]:
    from .config import to_dict
    from .encoders.hf_vision import HFVisionEncoder
    from .model import VisionLanguageModel
    from .peft_modules import base_llm

    notes = []
    config = model.config
    llm = base_llm(model.llm)
    package = staging / "model"
    # The parts travel inside the directory: names relative to it (resolved by VisionLanguageModel.from_pretrained)
    config.llm = replace(config.llm, name="./llm", gguf_file=None, revision=None, weights="pretrained",
                         chat_template=None)
    if isinstance(model.encoder, HFVisionEncoder):
        config.encoder.model, config.encoder.weights = "./encoder", "pretrained"
        config.encoder.image_size = model.encoder.image_size
    elif config.encoder.weights != "random":  # torchvision / open_clip: the weights go into encoder.safetensors
        config.encoder.weights = "random"
        notes.append("encoder weights saved in encoder.safetensors (no download at load time)")
    model.set_trainable(encoder=False, integrator=False, llm=False)
    model.save_pretrained(package)
    if isinstance(model.encoder, HFVisionEncoder):
        model.encoder.model.save_pretrained(package / "encoder")
        _image_processor(model).save_pretrained(package / "encoder")
    llm.save_pretrained(package / "llm")
    model.tokenizer.save_pretrained(package / "llm")
    if llm.generation_config is not None:
        llm.generation_config.save_pretrained(package / "llm")
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["export"] = {"format": "merged", "from": facts.get("model_dir"), "peft_merged": True,
                          "parts": to_dict(facts["parts_config"])}
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for item in package.iterdir():  # model/* → staging/*
        item.rename(staging / item.name)
    package.rmdir()
    notes.append("the LLM is a standard transformers causal-LM directory: llm/")
    if reference is None:
        return None, notes
    reloaded = VisionLanguageModel.from_pretrained(staging, device=str(model.device)).eval()
    check = compare(reference, workbench_reference(reloaded, image))
    del reloaded
    return _accept(check, model.dtype, "merged"), notes


def _export_workbench(model_dir: Path, out: Path, facts: dict, zip: bool, overwrite: bool) -> ExportResult:
    from .config import load_model_config
    from .model import _resolve_inside

    config = _resolve_inside(load_model_config(model_dir / "config.yaml"), model_dir)
    if zip:
        out = out if out.name.endswith(".zip") else out.with_name(out.name + ".zip")
    _check_out(out, overwrite)
    staging = _staging(out)
    try:
        folder = staging / "model"
        shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(CARD))
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
        facts["parameters"] = manifest.get("parameters")
        card = model_card(config, facts, "workbench")
        (folder / CARD).write_text(card, encoding="utf-8")
        if zip:
            archive = Path(shutil.make_archive(str(staging / "archive"), "zip", root_dir=staging, base_dir="model"))
            if out.exists():
                out.unlink()
            archive.rename(out)
            path = out
        else:
            path = _publish(folder, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult("workbench", path, card)


# ---------------------------------------------------------------------------------------------- what the card says

_LICENCES = {  # hub ids and names of the parts the workbench names (published licences)
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "HuggingFaceTB/SmolLM2-360M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "apache-2.0", "Qwen/Qwen2.5-0.5B-Instruct": "apache-2.0",
    "Qwen/Qwen2.5-1.5B-Instruct": "apache-2.0", "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "apache-2.0",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3.2", "microsoft/Phi-3-mini-4k-instruct": "mit",
    "lmsys/vicuna-7b-v1.5": "llama2", "openai/clip-vit-large-patch14-336": "mit",
    "openai/clip-vit-large-patch14": "mit", "openai/clip-vit-base-patch32": "mit",
    "openai/clip-vit-base-patch16": "mit", "google/siglip-so400m-patch14-384": "apache-2.0",
    "google/siglip-base-patch16-224": "apache-2.0", "torchvision": "bsd-3-clause",
}
_DATA_LICENCES = {"easy-vqa": "mit", "emoji-captions": "cc-by-4.0"}
_ASPECTS = {"pad": "padded with the mean colour", "crop": "centre-cropped", "resize": "squashed"}
_TOY_FARM = "toy_farm"


def _licence_of_dir(path: Path) -> str | None:
    """The `license:` of a local model folder's own model card, if it has one."""
    readme = path / CARD
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if text.startswith("---"):
        try:
            meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            return str(meta["license"]) if meta.get("license") else None
        except (yaml.YAMLError, IndexError, AttributeError):
            return None
    return None


def describe_parts(config) -> dict[str, dict[str, Any]]:
    """Each part: what it is, where its weights came from, its licence (as far as known)."""
    from .assets import ASSETS
    from .encoders import ENCODERS
    from .hub import looks_like_hub_id
    from .integrators import INTEGRATORS
    from .llm import LLMS

    parts: dict[str, dict[str, Any]] = {}
    enc = config.encoder
    source = enc.model or enc.name
    entry = ENCODERS.info(enc.name) if enc.name in ENCODERS else {}
    licence = None
    if enc.name in ASSETS:
        licence = ASSETS[enc.name].license.lower()
    elif enc.model and enc.model in _LICENCES:
        licence = _LICENCES[enc.model]
    elif enc.model and Path(enc.model).is_dir():
        licence = _licence_of_dir(Path(enc.model))
    elif entry.get("backend") == "torchvision":
        licence = _LICENCES["torchvision"]
    elif enc.name == "open_clip":
        licence = "mit (open_clip code; weights: see the tag's model card)"
    parts["encoder"] = {
        "name": enc.name, "source": source + (f" ({enc.pretrained})" if enc.pretrained else ""),
        "hub_id": enc.model if enc.model and looks_like_hub_id(enc.model) else None,
        "weights": enc.weights, "layer": enc.layer, "use_cls": enc.use_cls, "image_aspect": enc.image_aspect,
        "frozen": enc.frozen, "licence": "n/a (random weights)" if enc.weights == "random" else licence or "unknown",
        "description": entry.get("description", "")}
    info = INTEGRATORS.info(config.integrator.name) if config.integrator.name in INTEGRATORS else {}
    parts["integrator"] = {"name": config.integrator.name, "options": dict(config.integrator.options),
                           "family": info.get("family", ""), "follows": info.get("follows", ""),
                           "source": "trained in this run", "licence": "same as this model"}
    llm = config.llm
    hub = LLMS.info(llm.name).get("hub_id") if llm.name in LLMS else (llm.name if looks_like_hub_id(llm.name) else None)
    licence = ASSETS[llm.name].license.lower() if llm.name in ASSETS else _LICENCES.get(hub or "") or (
        _licence_of_dir(Path(llm.name)) if Path(llm.name).is_dir() else None)
    parts["llm"] = {"name": llm.name, "source": hub or llm.name, "hub_id": hub, "weights": llm.weights,
                    "frozen": llm.frozen, "licence": "n/a (random weights)" if llm.weights == "random"
                    else licence or "unknown"}
    peft = config.peft
    if peft.method != "none":
        parts["peft"] = {"method": peft.method, "r": peft.r, "alpha": peft.alpha,
                         "target_modules": peft.target_modules}
    return parts


def _data_text(spec) -> str:
    if spec is None:
        return "—"
    options = {k: (Path(v).name if isinstance(v, str) and ("/" in v or "\\" in v) else v)
               for k, v in (spec.options or {}).items()}
    return spec.kind + (f" {json.dumps(options, sort_keys=True)}" if options else "")


def _data_licence(spec) -> str:
    if spec is None:
        return "unknown"
    text = json.dumps(spec.options or {})
    if _TOY_FARM in text:
        return "cc-by-4.0 (Twemoji)"
    return _DATA_LICENCES.get(spec.kind, "unknown (the user's data)")


def _run_evaluations(run_dir: Path) -> dict[str, Any]:
    """The last evaluation during training and the `workbench eval` results in the run folder."""
    from .training.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    out: dict[str, Any] = {"training": None, "files": [], "rows": rows}
    evals = [r for r in rows if r.get("kind") == "eval" and "accuracy" in r]
    if evals:
        out["training"] = evals[-1]
    for path in sorted(run_dir.glob("eval-*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        result["file"] = path.name
        out["files"].append(result)
    return out


def _sibling_baseline(run_dir: Path, run) -> Path | None:
    """A finished text-only run of the same recipe and data among the run's siblings (latest first)."""
    from .config import load_run_config

    candidates = []
    for other in run_dir.parent.iterdir():
        if other == run_dir or not (other / "run.yaml").is_file() or not (other / "metrics.jsonl").is_file():
            continue
        try:
            config = load_run_config(other / "run.yaml")
        except Exception:  # noqa: BLE001 -- an unreadable neighbour is simply not a candidate
            continue
        if config.text_only and config.data == run.data and config.eval_data == run.eval_data \
                and config.paradigm == run.paradigm:
            candidates.append(other)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def describe_source(run_dir: Path | None, model_dir: Path, baseline: str | Path | None = None,
                    registry=None) -> dict[str, Any]:
    """What the card tells about where the model came from: run, recipe, data, evaluations, time, hardware."""
    from .config import load_run_config
    from .paradigms import resolve_stages

    facts: dict[str, Any] = {"model_dir": str(model_dir), "name": model_dir.name, "run": None, "stages": [],
                             "evaluations": [], "baseline": None}
    manifest = json.loads((model_dir / "manifest.json").read_text()) if (model_dir / "manifest.json").is_file() else {}
    facts["saved_at"] = manifest.get("saved_at")
    if isinstance(manifest.get("export", {}).get("parts"), dict):  # a merged export: the parts it came from
        from .config import model_config_from_dict

        try:
            facts["parts_config"] = model_config_from_dict(manifest["export"]["parts"])
        except ConfigError:
            pass
    if run_dir is None:
        return facts
    run = load_run_config(run_dir / "run.yaml")
    facts.update(run=run_dir.name, name=run.name, paradigm=run.paradigm, text_only=run.text_only,
                 data=_data_text(run.data), data_licence=_data_licence(run.data), eval_data=_data_text(run.eval_data),
                 eval_kind=run.eval_data.kind if run.eval_data else None, precision=run.training.precision)
    try:
        stages = resolve_stages(run)
    except ConfigError:
        stages = run.stages or []
    evaluations = _run_evaluations(run_dir)
    rows = evaluations["rows"]
    logged = [r for r in rows if r.get("kind") == "stage"]
    for i, s in enumerate(stages):
        trains = [p for p, on in (("encoder", s.train_encoder), ("integrator", s.train_integrator)) if on]
        trains += {"full": ["LLM (full)"], "peft": [f"{run.model.peft.method} modules"]}.get(s.llm, [])
        row = next((r for r in logged if r.get("stage") == i), {})
        facts["stages"].append({"name": s.name, "data": _data_text(s.data), "trains": trains, "lr": s.lr,
                                "lr_llm": s.lr_llm if s.llm == "full" or s.llm == "peft" else None,
                                "epochs": s.epochs, "max_steps": s.max_steps, "max_minutes": s.max_minutes,
                                "samples": row.get("samples"), "trainable_params": row.get("trainable_params"),
                                "total_params": row.get("total_params")})
    counted = [r for r in logged if r.get("trainable_params")]
    if counted:
        top = max(counted, key=lambda r: r["trainable_params"])
        facts["trainable_params"], facts["total_params"] = top["trainable_params"], top.get("total_params")
    ends = [r for r in rows if r.get("kind") == "end"]
    if logged and ends:
        facts["training_seconds"] = ends[-1]["time"] - logged[0]["time"]
    steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
    facts["steps"] = max(steps) if steps else None
    memory = [r for r in rows if r.get("kind") == "memory"]
    train = [r for r in rows if r.get("kind") == "train"]
    if memory:
        m = memory[-1]
        facts["hardware"] = f"{m.get('device', '?')}" + (f" ({m['available'] / 2 ** 30:.0f} GiB available)"
                                                          if m.get("available") else "")
    if train:
        facts["peak_memory_mb"] = max(r.get("memory_mb") or 0 for r in train)
        facts["samples_per_s"] = sum(r.get("samples_per_s") or 0 for r in train) / len(train)
    label = "text-only run (trained and evaluated without images)" if run.text_only else "this model"
    if evaluations["training"]:
        e = evaluations["training"]
        facts["evaluations"].append({"model": label, "data": facts["eval_data"], "metric": "accuracy",
                                     "value": e["accuracy"], "by_type": e.get("by_type", {}),
                                     "count": e.get("count"), "step": e.get("step"), "source": "metrics.jsonl"})
    for result in evaluations["files"]:
        for metric in ("accuracy", "bleu4", "cider"):
            if metric in result:
                entry = {"model": "same model, images withheld" if result.get("text_only") else label,
                         "data": f"{result.get('data', '?')} ({result['file']})", "metric": metric,
                         "value": result[metric], "by_type": result.get("by_type", {}), "count": result.get("count"),
                         "source": result["file"]}
                (facts.setdefault("withheld", []) if result.get("text_only") else facts["evaluations"]).append(entry)
    base_dir = None
    if baseline is not None:
        base_dir, _ = _baseline_dir(baseline, registry)
    elif not run.text_only:
        base_dir = _sibling_baseline(run_dir, run)
    if base_dir is not None:
        base_rows = _run_evaluations(base_dir)
        if base_rows["training"]:
            e = base_rows["training"]
            facts["baseline"] = {"model": f"text-only baseline ({base_dir.name})", "data": facts["eval_data"],
                                 "metric": "accuracy", "value": e["accuracy"], "by_type": e.get("by_type", {}),
                                 "count": e.get("count"), "run": base_dir.name}
    if facts["baseline"] is None and facts.get("withheld"):
        w = facts["withheld"][-1]
        facts["baseline"] = {**w, "model": "text-only baseline (same model, images withheld)"}
    return facts


def _baseline_dir(baseline, registry) -> tuple[Path, Path | None]:
    path = Path(baseline).expanduser()
    if not path.exists():
        from .jobs import RunRegistry

        path = (registry if registry is not None else RunRegistry()).run_dir(str(baseline))
    if not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"Baseline '{baseline}' is not a run folder with a metrics log")
    return path, None


def _fmt_pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "—"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "not recorded"
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s"


def model_card(config, facts: dict[str, Any], format: str, check: dict | None = None,
               notes: list[str] | None = None) -> str:
    """README.md with model-card metadata (YAML front matter) for an export of `config`'s model (its parts are
    described as `facts["parts_config"]` names them when given: where a merged model came from)."""
    config = facts.get("parts_config") or config
    parts = describe_parts(config)
    llm_licence = parts["llm"]["licence"].split(" ")[0]
    licences = {p["licence"] for p in parts.values() if "licence" in p and p["licence"] != "same as this model"}
    base_models = [p["hub_id"] for p in (parts["encoder"], parts["llm"]) if p.get("hub_id")]
    results = facts["evaluations"] + ([facts["baseline"]] if facts.get("baseline") else [])
    meta: dict[str, Any] = {
        "license": llm_licence if llm_licence not in ("unknown", "n/a") else "other",
        "library_name": "transformers" if format == "hf-llava" else "workbench",
        "pipeline_tag": "image-text-to-text",
        "tags": ["vision-language", "vllm-workbench", f"integrator-{config.integrator.name}"]
                + (["llava"] if format == "hf-llava" else []) + ([config.peft.method] if config.peft.method != "none"
                                                                  else []),
    }
    if base_models:
        meta["base_model"] = base_models
    data_kind = facts.get("data", "").split(" ")[0] if facts.get("data") else None
    if data_kind:
        meta["datasets"] = [data_kind]
    if results:
        meta["model-index"] = [{"name": facts.get("name") or "model", "results": [{
            "task": {"type": "visual-question-answering" if r["metric"] == "accuracy" else "image-to-text"},
            "dataset": {"name": r["data"], "type": r["data"].split(" ")[0]},
            "metrics": [{"type": r["metric"], "value": round(float(r["value"]), 4), "name": r["model"]}],
        } for r in results]}]
    meta["workbench"] = {"format": format, "parts": {k: {kk: vv for kk, vv in v.items() if kk != "description"}
                                                     for k, v in parts.items()},
                         "paradigm": facts.get("paradigm"), "run": facts.get("run")}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    name = facts.get("name") or "model"
    lines += [f"# {name}", "",
              f"A vision-language model built and trained with the VLLM Workbench: image encoder "
              f"**{parts['encoder']['name']}** → integrator **{config.integrator.name}** → LLM "
              f"**{parts['llm']['source']}**" + (f" with **{config.peft.method}**" if config.peft.method != "none"
                                                 else "") + f". Exported as `{format}` ({FORMATS[format]}).", ""]
    lines += ["## Load it", "", "```python"]
    if format == "hf-llava":
        lines += ["from transformers import AutoProcessor, LlavaForConditionalGeneration",
                  'model, processor = LlavaForConditionalGeneration.from_pretrained("PATH"), '
                  'AutoProcessor.from_pretrained("PATH")']
    else:
        lines += ["from workbench import VisionLanguageModel",
                  'model = VisionLanguageModel.from_pretrained("PATH")  # then model.generate(messages, images)']
    lines += ["```", ""]
    if format == "hf-llava":
        lines += ["Ask with the processor's chat template (the image goes where the workbench put it):", "", "```python",
                  'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in '
                  'the image?"}]}]',
                  "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
                  'inputs = processor(images=[image], text=prompt, return_tensors="pt")',
                  "answer = processor.decode(model.generate(**inputs)[0, inputs.input_ids.shape[1]:], "
                  "skip_special_tokens=True)", "```", ""]
    elif format == "merged":
        lines += ["The language model alone is a standard transformers directory: "
                  '`AutoModelForCausalLM.from_pretrained("PATH/llm")`.', ""]
    lines += ["## Parts", "", "| part | what | source | licence |", "|---|---|---|---|"]
    e = parts["encoder"]
    lines.append(f"| encoder | {e['name']} (layer {e['layer']}, {'CLS kept' if e['use_cls'] else 'patch tokens'}, "
                 f"{e['image_aspect']}, {'frozen' if e['frozen'] else 'trained'}) | {e['source']} | {e['licence']} |")
    i = parts["integrator"]
    options = ", ".join(f"{k}={v}" for k, v in i["options"].items()) or "defaults"
    lines.append(f"| integrator | {i['name']} — {i['family']}, follows {i['follows']} ({options}) | trained in "
                 f"this run | — |")
    m = parts["llm"]
    lines.append(f"| LLM | {'frozen' if m['frozen'] else 'trained'} | {m['source']} | {m['licence']} |")
    if "peft" in parts:
        p = parts["peft"]
        lines.append(f"| PEFT | {p['method']} r={p['r']} alpha={p['alpha']}"
                     f"{' (merged into the LLM)' if format != 'workbench' else ''} | trained in this run | — |")
    if len(licences) > 1:
        lines += ["", "The parts carry different licences: the most restrictive one applies to the whole."]
    lines += ["", "## Training", ""]
    if facts.get("run"):
        lines.append(f"Run `{facts['run']}`, paradigm **{facts.get('paradigm')}**"
                     + (" — the text-only baseline (no images)" if facts.get("text_only") else "") + ".")
        lines += ["", "| stage | data | trains | lr | epochs / limit | samples |", "|---|---|---|---|---|---|"]
        for s in facts["stages"]:
            limit = f"{s['epochs']:g} epoch{'' if s['epochs'] == 1 else 's'}" + (f", ≤{s['max_steps']} steps" if s["max_steps"] else "") + (
                f", ≤{s['max_minutes']:g} min" if s["max_minutes"] else "")
            lr = f"{s['lr']:g}" + (f" (LLM {s['lr_llm']:g})" if s["lr_llm"] else "")
            lines.append(f"| {s['name']} | {s['data']} | {', '.join(s['trains']) or '—'} | {lr} | {limit} | "
                         f"{s['samples'] if s['samples'] is not None else '—'} |")
        trainable = facts.get("trainable_params")
        total = facts.get("total_params")
        lines += ["", f"- Data: {facts.get('data')} (licence: {facts.get('data_licence')}); evaluated on "
                      f"{facts.get('eval_data')}.",
                  "- Trainable parameters: " + (f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
                                                if trainable and total else f"{trainable:,}" if trainable
                                                else "not recorded") + ".",
                  f"- Training time: {_duration(facts.get('training_seconds'))}"
                  + (f" ({facts['steps']} optimizer steps)" if facts.get("steps") else "") + ".",
                  f"- Hardware: {facts.get('hardware') or 'not recorded'}; precision {facts.get('precision')}"
                  + (f"; peak memory {facts['peak_memory_mb']:.0f} MB" if facts.get("peak_memory_mb") else "") + "."]
    else:
        lines.append("Exported from a saved model folder without its run: the training recipe, data and evaluations "
                     "were not recorded beside it.")
    params = facts.get("parameters")
    if params:
        total_row = next((r for r in params if r["component"] == "total"), None)
        if total_row:
            lines.append(f"- Parameters: {total_row['total']:,} in all.")
    lines += ["", "## Evaluation", ""]
    if results:
        types = sorted({t for r in results for t in (r.get("by_type") or {})})
        lines += ["| model | data | " + " | ".join([results[0]["metric"]] + types) + " | questions |",
                  "|---" * (3 + len(types)) + "|---|"]
        for r in results:
            value = _fmt_pct(r["value"]) if r["metric"] == "accuracy" else f"{r['value']:.4f}"
            cells = [value] + [_fmt_pct((r.get("by_type") or {}).get(t)) for t in types]
            lines.append(f"| {r['model']} | {r['data']} | " + " | ".join(cells) + f" | {r.get('count') or '—'} |")
        if facts.get("baseline") and facts["evaluations"]:
            gain = facts["evaluations"][0]["value"] - facts["baseline"]["value"]
            lines += ["", f"The image adds {100 * gain:+.1f} points over the text-only baseline: what the baseline "
                          f"gets right comes from the questions alone."]
        elif not facts.get("baseline"):
            lines += ["", "No text-only baseline was recorded: part of the accuracy may come from the questions "
                          "alone (train the same recipe with `text_only: true`, or `workbench eval --text-only`)."]
    else:
        lines.append("No evaluation was recorded for this model.")
    if check is not None:
        lines += ["", f"Checked at export: loaded back as its users will load it, the export gives the same greedy "
                      f"tokens as the workbench model ({'yes' if check['same_tokens'] else 'NO'}) and logits within "
                      f"{check['max_abs_diff']:.2g} of it (largest logit {check['scale']:.3g})."]
    lines += ["", "## Intended use and limits", "",
              "- A research and teaching prototype: it answers short questions about images like those it was "
              "trained on" + (f" ({facts.get('data')})" if facts.get("data") else "") + ". It has not been tested "
                                                                                          "beyond the evaluation above.",
              "- It can state wrong things fluently and can answer from the question alone rather than the picture "
              "(compare with the text-only baseline). It has no safety tuning beyond its LLM's own.",
              "- Do not use it for decisions about people, medical, legal or safety-critical matters.",
              f"- Pictures are made square ({_ASPECTS.get(config.encoder.image_aspect, config.encoder.image_aspect)}) "
              f"and resized to the encoder's "
              + (f"{config.encoder.image_size} px" if config.encoder.image_size else "own resolution")
              + "; transparent pictures were composited on white in training: do the same before asking."]
    for note in notes or []:
        lines.append(f"- Export note: {note}.")
    lines += ["", f"Exported {time.strftime('%Y-%m-%d %H:%M')} by the VLLM Workbench (`workbench export`)."]
    return "\n".join(lines) + "\n"
