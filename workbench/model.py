"""`VisionLanguageModel`: image → encoder → integrator → LLM. The one API every front end drives.

Inputs are conversations with `<image>` placeholders; each placeholder is expanded into the
integrator's visual tokens inside the LLM's input embeddings. A saved model is one directory:
config.yaml, the trained parts as safetensors, a manifest — and references to frozen base parts.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ModelConfig, load_model_config, model_config_from_dict, save_model_config, to_dict
from .data.prompting import IGNORE_INDEX, IMAGE_TOKEN_INDEX, EncodedConversation, PromptFormatter
from .encoders import VisionEncoder, build_encoder
from .errors import ConfigError
from .images import ImageSource, load_image
from .integrators import Integrator, IntegratorContext, build_integrator, resolved_integrator_options
from .llm import load_llm, resolve_device, training_attention
from .peft_modules import ADAPTER_DIR, unique_parameters, attach_peft, base_llm, check_peft_spec, is_peft_model, load_peft
from .peft_modules import generate as peft_generate
from .peft_modules import peft_parameters, save_peft, virtual_tokens
from .shared_prefix import run_prefix, shared_prefix_length
from .visual_entry import hidden_norm_at, resolve_entry_layer, span_mask, visual_entry, with_placeholders

FORMAT_NAME = "workbench-vlm"
FORMAT_VERSION = 1

Conversation = Sequence[dict[str, str]]


@dataclass
class MultimodalInputs:
    """What the LLM receives after visual tokens are spliced in."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L) with IGNORE_INDEX outside answers
    image_spans: list[list[tuple[int, int]]]  # per sample: (start, length) of each image's tokens


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, encoder: VisionEncoder, integrator: Integrator, llm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.integrator = integrator
        self.llm = llm
        self.tokenizer = tokenizer
        self.formatter = PromptFormatter(tokenizer, config.image_token, config.system_prompt)
        self.gradient_checkpointing = False
        self.entry_layer = _entry_layer(config, integrator, llm)
        """Decoder layer where visual tokens enter the LLM (`model.visual_entry_layer`, resolved; 0 = embeddings)."""
        integrator.attach(base_llm(llm))  # in-LLM modules go into the transformers model, under any PEFT wrapper

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig | dict | str | Path, device: str | torch.device | None = None,
                    base=None):
        """Build from specs: base weights from their sources, a freshly initialised integrator.

        `base` (a `model_pool.SharedBase`): take the frozen encoder and/or LLM from it instead of loading them —
        a module tree of this model's own whose weights are the base's tensors (several runs, one base)."""
        if isinstance(config, (str, Path)):
            config = load_model_config(config)
        elif isinstance(config, dict):
            config = model_config_from_dict(config)
        config = replace(config).validate()
        # with its index (cuda:LOCAL_RANK under torchrun): built where it trains, never first on cuda:0
        dev = resolve_device(str(device) if device is not None else config.llm.device)
        check_peft_spec(config.peft)  # fail before loading the LLM (unknown method, QLoRA without CUDA)
        shared = base.parts_for(config) if base is not None else {}
        llm, tokenizer = shared["llm"] if "llm" in shared else load_llm(config.llm, dev, peft=config.peft)  # QLoRA: quantized
        encoder = shared.get("encoder") or build_encoder(config.encoder)
        llm_dtype = next(llm.parameters()).dtype
        encoder.to(device=dev, dtype=llm_dtype if encoder.frozen else torch.float32)
        entry = _configured_entry(config, llm)
        context = IntegratorContext(
            vision_dim=encoder.feature_dim, num_input_tokens=encoder.num_tokens, grid=encoder.grid,
            has_cls=encoder.keeps_cls, llm_hidden=llm.get_input_embeddings().embedding_dim, llm_config=llm.config,
            text_embedding_norm=_text_scale(entry, llm, tokenizer), entry_layer=entry,
        )
        integrator = build_integrator(config.integrator, context).to(dev)  # fp32 master weights
        if config.peft.method == "none":
            return cls(config, encoder, integrator, llm, tokenizer)
        model = cls(config, encoder, integrator, attach_peft(llm, config.peft), tokenizer)
        return model.set_trainable(llm=not config.llm.frozen, peft=True)  # base as configured, adapter trains

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, base=None,
                        dtype: str | None = None):
        """Load a directory written by `save_pretrained`: rebuild from config, then load the trained parts.

        `dtype`: the LLM's dtype for answering (`llm.serving_dtype`) instead of the saved config's; trained
        parts are cast to it as they load, the integrator keeps fp32 weights."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path} is not a saved workbench model (no config.yaml)")
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        if manifest.get("format", FORMAT_NAME) != FORMAT_NAME or manifest.get("version", 1) > FORMAT_VERSION:
            raise ConfigError(f"{path} holds format {manifest.get('format')} v{manifest.get('version')}, "
                              f"which this workbench cannot read")
        config = _resolve_inside(load_model_config(path / "config.yaml"), path)
        if dtype is not None:
            config.llm.dtype = dtype
        model = cls.from_config(config, device=device, base=base)
        model.load_trained_parts(path)
        model.set_trainable(encoder=not model.config.encoder.frozen, llm=not model.config.llm.frozen)
        return model

    def load_trained_parts(self, path: str | Path) -> None:
        """Load the part files of a saved directory into this model (strict: names and shapes must match)."""
        path = Path(path)
        for part, module in self._parts().items():
            file = path / f"{part}.safetensors"
            if not file.is_file():
                continue
            try:
                missing, unexpected = load_model(module, str(file), strict=False, device=str(self.device))
            except RuntimeError as e:  # same names, other shapes
                raise ConfigError(f"{file} does not match the {part} built from config.yaml: {e}") from None
            if missing or unexpected:
                raise ConfigError(f"{file} does not match the {part} built from config.yaml: "
                                  f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        if (path / ADAPTER_DIR).is_dir():
            if not is_peft_model(self.llm):
                raise ConfigError(f"{path / ADAPTER_DIR} holds a PEFT adapter but this model has no PEFT modules "
                                  f"(peft.method is none)")
            load_peft(self.llm, path / ADAPTER_DIR, self.config.peft)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config + every trained part (integrator always; encoder/LLM when unfrozen) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.config.encoder.frozen = self.encoder.frozen
        self.config.llm.frozen = not any(p.requires_grad for p in self._llm_own_parameters())
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            integrator = replace(self.config.integrator, options=resolved_integrator_options(self.config.integrator))
            save_model_config(replace(self.config, integrator=integrator), tmp / "config.yaml")
            files = {}
            for part, module in self._parts().items():
                spec = getattr(self.config, part)
                # random-weight parts are saved too: rebuilding them from config.yaml would draw other weights
                trained = part == "integrator" or not spec.frozen or spec.weights == "random"
                if trained:
                    save_model(module, str(tmp / f"{part}.safetensors"))
                    files[part] = f"{part}.safetensors"
            if is_peft_model(self.llm):
                save_peft(self.llm, tmp / ADAPTER_DIR)
                files["adapter"] = f"{ADAPTER_DIR}/"
            manifest = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files, "base": {"encoder": to_dict(self.config.encoder), "llm": to_dict(self.config.llm)},
                "parameters": self.parameter_report(),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if path.exists():
                old = path.with_name(f".{path.name}.old-{time.time_ns()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _parts(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "integrator": self.integrator, "llm": self.llm}

    def _llm_own_parameters(self) -> list[nn.Parameter]:
        """The LLM's base weights: without in-LLM integrator modules and without PEFT adapters."""
        inside = {id(p) for p in self.integrator.llm_parameters() + peft_parameters(self.llm)}
        return [p for p in self.llm.parameters() if id(p) not in inside]

    # ------------------------------------------------------------------ properties and trainability
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def num_visual_tokens(self) -> int:
        """Tokens each image occupies in the LLM's sequence."""
        return self.integrator.num_tokens

    def set_trainable(self, encoder: bool | None = None, integrator: bool | None = None, llm: bool | None = None,
                      peft: bool | None = None):
        """Freeze or unfreeze whole parts (paradigm stages call this); the config records it for saving.

        `llm` is the LLM's base weights (full fine-tuning); `peft` the PEFT adapters attached to it.
        """
        if encoder is not None:
            self.encoder.freeze(not encoder)
            self.config.encoder.frozen = not encoder
        if integrator is not None:
            for p in self.integrator.parameters():
                p.requires_grad_(integrator)
        if llm is not None:
            if llm and is_quantized(self.llm):
                raise ConfigError("The LLM is loaded quantized (QLoRA): its base weights cannot train; train its "
                                  "PEFT modules (stage llm: peft) instead of the full LLM")
            for p in self._llm_own_parameters():
                p.requires_grad_(llm)
            self.config.llm.frozen = not llm
        if peft is not None:
            adapters = peft_parameters(self.llm)
            if peft and not adapters:
                raise ConfigError("The model has no PEFT modules to train (model.peft.method is none)")
            for p in adapters:
                p.requires_grad_(peft)
        return self

    def upcast_trainable_(self, dtype: torch.dtype = torch.float32):
        """Keep the parameters that train in `dtype` (fp32 master weights); frozen ones stay as loaded.

        An LLM loaded in bf16 (dtype auto on CUDA) and updated in place loses most updates: at a learning
        rate of 2e-5, AdamW's step is far below half a bf16 ulp of a typical weight and rounds away. Trained
        in fp32 under bf16 autocast, the matmuls still run in bf16 while the updates accumulate. Call after
        choosing the trainable set and before building the optimizer; returns self.
        """
        for p in self.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        return self

    def enable_gradient_checkpointing(self, enable: bool = True):
        """Recompute each LLM decoder layer in the backward pass instead of keeping its activations.

        Uses transformers' non-reentrant checkpointing, which passes gradients on to inputs that need them
        (visual tokens, PEFT modules) without `enable_input_require_grads` tricks. Returns self.
        """
        from .training.memory import can_checkpoint

        llm = base_llm(self.llm)
        if enable:
            possible, why_not = can_checkpoint(self)
            if not possible:
                raise ConfigError(f"Gradient checkpointing cannot be used here: {why_not}; set "
                                  f"training.gradient_checkpointing: false")
            kwargs = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif is_checkpointing(llm):
            (getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable)()
        self.gradient_checkpointing = enable
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if (self.config.llm.frozen and not self.integrator.llm_parameters()
                and not any(p.requires_grad for p in peft_parameters(self.llm))):
            self.llm.eval()  # a frozen LLM behaves as at inference (no dropout)
            if mode and getattr(self, "gradient_checkpointing", False):
                _checkpointed_layers_train(self.llm)
        return self

    def parameter_report(self) -> list[dict[str, Any]]:
        """Rows of component, total, trainable, trainable % of the component, and share % of the whole."""
        groups = {
            "encoder": list(self.encoder.parameters()),
            "integrator": list(self.integrator.parameters()) + self.integrator.llm_parameters(),
            "llm": self._llm_own_parameters(),
        }
        if is_peft_model(self.llm):
            groups["peft"] = peft_parameters(self.llm)
        rows = []
        grand = sum(p.numel() for ps in groups.values() for p in unique_parameters(ps))
        for name, params in groups.items():
            params = unique_parameters(params)
            total = sum(p.numel() for p in params)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            rows.append({"component": name, "total": total, "trainable": trainable,
                         "trainable_pct": 100.0 * trainable / total if total else 0.0,
                         "share_pct": 100.0 * total / grand if grand else 0.0})
        total = sum(r["total"] for r in rows)
        trainable = sum(r["trainable"] for r in rows)
        rows.append({"component": "total", "total": total, "trainable": trainable,
                     "trainable_pct": 100.0 * trainable / total if total else 0.0, "share_pct": 100.0})
        return rows

    # ------------------------------------------------------------------ inputs
    def encode_conversation(self, messages: Conversation, num_images: int,
                            add_generation_prompt: bool = False) -> EncodedConversation:
        encoded = self.formatter.encode(messages, add_generation_prompt=add_generation_prompt, num_images=num_images)
        length = len(encoded.input_ids) + num_images * (self.num_visual_tokens - 1)
        if length > self.config.max_length:
            raise ConfigError(f"The conversation is {length} tokens with its images; max_length is "
                              f"{self.config.max_length}")
        return encoded

    def pixel_values(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Load (safely) and preprocess images into the encoder's input tensor."""
        return self.encoder.preprocess([load_image(im) for im in images])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, S, S) → encoder features (M, N, D_v)."""
        return self.encoder(pixel_values.to(self.device))

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (possibly from a cache) → (M, T, H) tokens in the LLM's dtype."""
        w = next(self.integrator.parameters(), None)
        features = features.to(self.device, dtype=w.dtype if w is not None else features.dtype)
        return self.integrator(features).to(self.dtype)

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor | None,
               labels: torch.Tensor | None = None, padding_side: str = "right") -> MultimodalInputs:
        """Replace each IMAGE_TOKEN_INDEX in the padded ids with its image's visual tokens, and re-pad."""
        embed = self.llm.get_input_embeddings()
        rows, label_rows, spans = [], [], []
        k = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep].to(self.device)
            lab = labels[b][keep].to(self.device) if labels is not None else None
            text = embed(ids.clamp(min=0))
            parts, lparts, sample_spans = [], [], []
            pos = length = 0
            for s in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                if visual is None or k >= visual.shape[0]:
                    raise ConfigError("More image placeholders in the batch than images given")
                parts += [text[pos:s], visual[k]]
                if lab is not None:
                    lparts += [lab[pos:s], lab.new_full((visual.shape[1],), IGNORE_INDEX)]
                length += s - pos
                sample_spans.append((length, visual.shape[1]))
                length += visual.shape[1]
                pos, k = s + 1, k + 1
            parts.append(text[pos:])
            if lab is not None:
                lparts.append(lab[pos:])
            rows.append(torch.cat(parts))
            label_rows.append(torch.cat(lparts) if lab is not None else None)
            spans.append(sample_spans)
        if visual is not None and k != visual.shape[0]:
            raise ConfigError(f"{visual.shape[0]} images were given for {k} image placeholders in the batch")
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        B = len(rows)
        embeds = rows[0].new_zeros(B, width, hidden)
        mask = torch.zeros(B, width, dtype=torch.long, device=self.device)
        out_labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long, device=self.device) if labels is not None else None
        for b, row in enumerate(rows):
            n = row.shape[0]
            sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
            embeds[b, sl] = row
            mask[b, sl] = 1
            if out_labels is not None:
                out_labels[b, sl] = label_rows[b]
            if padding_side == "left":
                spans[b] = [(s + width - n, t) for s, t in spans[b]]
        return MultimodalInputs(embeds, mask, out_labels, spans)

    def collate(self, encoded: Sequence[EncodedConversation]) -> dict[str, torch.Tensor]:
        """Pad token-level encodings (sentinels still in place) into tensors."""
        width = max(len(e.input_ids) for e in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # ------------------------------------------------------------------ forward (training)
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                image_to_sample: torch.Tensor | None = None, answer_logits_only: bool = False, text_states=None,
                share_prefix: bool = False, **llm_kwargs):
        """Loss/logits for a padded batch. Give `pixel_values` or precomputed `image_features` (cache).

        `answer_logits_only` (training): the LM head runs only at positions that predict an answer token,
        not over the whole sequence. Same loss, and the full-vocabulary projection is ~20% of the
        compute of a small LLM; `logits` then holds only those positions.
        `text_states` (training): a `TextStateCache` whose bottom frozen layers are skipped (same loss).
        `share_prefix` (training, with `answer_logits_only`): the tokens every row starts with run once
        (shared_prefix.py; same loss, where `shared_prefix.why_not_shared` finds none of its exclusions).
        """
        features = image_features
        if features is None and pixel_values is not None:
            features = self.encode_images(pixel_values)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "image_to_sample": image_to_sample}
        return self.run_llm(batch, features, answer_logits_only=answer_logits_only, text_states=text_states,
                            share_prefix=share_prefix, **llm_kwargs)[0]

    def run_llm(self, batch: dict, features: torch.Tensor | None, answer_logits_only: bool = False,
                embeds_require_grad: bool = False, text_states=None, share_prefix: bool = False, **llm_kwargs):
        """Splice visual tokens into the text and run the LLM (with in-LLM integrators given the features).

        Returns (LLM output, the spliced MultimodalInputs): front ends that inspect a pass (attention
        views) need the sequence layout — where each image's tokens sit and which positions are answers.
        `embeds_require_grad` makes gradients reach the input embeddings (relevancy views), even with
        everything frozen.
        """
        visual = self.visual_tokens(features) if features is not None else None
        inputs = self.splice(batch["input_ids"], batch["attention_mask"], visual, batch.get("labels"))
        if embeds_require_grad and not inputs.inputs_embeds.requires_grad:  # keep a graph back to the features
            inputs.inputs_embeds = inputs.inputs_embeds.detach().requires_grad_(True)
        n = virtual_tokens(self.llm)
        slots = self.visual_slots(inputs)
        keep = None
        if answer_logits_only and inputs.labels is not None and not n:
            targets = inputs.labels[:, 1:]
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()  # positions predicting answers
            llm_kwargs["logits_to_keep"] = keep
        embeds = with_placeholders(inputs.inputs_embeds, slots)
        if text_states is not None:  # start at the cut with the cached states of the frozen text-only layers
            ids = batch["input_ids"]
            rows = [self.text_state_key(r[batch["attention_mask"][b].bool()]) for b, r in enumerate(ids)]
            embeds = text_states.lookup(self, rows).to(embeds.dtype)
        layers = text_states.upper_layers if text_states is not None else contextlib.nullcontext
        prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"], int(keep.min())) \
            if share_prefix and keep is not None and len(keep) else 0
        visual, mask = inputs.inputs_embeds, inputs.attention_mask
        if prefix:  # the rows' common start runs once; the rest of each row reads its keys and values
            with layers(), training_attention(embeds.device, prefix):
                llm_kwargs.update(run_prefix(self.llm, embeds, mask, prefix, keep))
            mask = llm_kwargs.pop("attention_mask")
            embeds, visual = embeds[:, prefix:], visual[:, prefix:]
            slots = None if slots is None else slots[:, prefix:]
        self.integrator.set_visual_context(features, batch.get("image_to_sample"))
        try:
            # the entry hook first: it finds its layer by index in the full decoder, before the cache cuts it
            # (a checkpointed layer recomputes in backward, outside this block: it keeps one kernel for both)
            kernel = contextlib.nullcontext() if self.gradient_checkpointing else \
                training_attention(embeds.device, embeds.shape[1])
            with visual_entry(self.llm, self.entry_layer, visual, slots), layers(), kernel:
                out = self.llm(inputs_embeds=embeds, attention_mask=mask,
                               labels=None if keep is not None else inputs.labels, **llm_kwargs)
        finally:
            self.integrator.set_visual_context(None, None)
        if keep is not None:
            out.loss = nn.functional.cross_entropy(out.logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                                   ignore_index=IGNORE_INDEX)
        if n and getattr(out, "logits", None) is not None:  # prompt tuning: logits of the prepended virtual tokens are dropped
            out.logits = out.logits[:, n:]
        return out, inputs

    def visual_slots(self, inputs: MultimodalInputs) -> torch.Tensor | None:
        """(B, L) bool marking the visual tokens' positions when they enter above the embeddings, else None."""
        if not self.entry_layer:
            return None
        return span_mask(inputs.image_spans, inputs.inputs_embeds.shape[1], inputs.inputs_embeds.device)

    def text_state_key(self, ids: torch.Tensor) -> torch.Tensor:
        """A sample's unpadded ids as the text-state cache sees the sequence: an image placeholder is dropped
        (its tokens enter inside the LLM, or not at all) or, with visual tokens entering above the embeddings,
        stands for its slots (IMAGE_TOKEN_INDEX repeated; the cache embeds them as zeros)."""
        if not self.entry_layer:
            return ids[ids != IMAGE_TOKEN_INDEX]
        counts = torch.where(ids == IMAGE_TOKEN_INDEX, self.num_visual_tokens, 1)
        return ids.repeat_interleave(counts)

    def prepare_batch(self, conversations: Sequence[Conversation], images: Sequence[Sequence[ImageSource]],
                      add_generation_prompt: bool = False) -> dict[str, torch.Tensor]:
        """Conversations + their images → the tensors `forward` takes (images checked against placeholders)."""
        if len(conversations) != len(images):
            raise ConfigError(f"{len(conversations)} conversations but {len(images)} image lists")
        encoded = [self.encode_conversation(c, len(ims), add_generation_prompt) for c, ims in zip(conversations, images)]
        batch = self.collate(encoded)
        flat = [im for ims in images for im in ims]
        if flat:
            batch["pixel_values"] = self.pixel_values(flat)
            batch["image_to_sample"] = torch.tensor([i for i, ims in enumerate(images) for _ in ims])
        return batch

    # ------------------------------------------------------------------ generation
    def _generation_inputs(self, conversations, images):
        batch = self.prepare_batch(conversations, images, add_generation_prompt=True)
        features = self._encode_distinct(batch["pixel_values"]) if "pixel_values" in batch else None
        visual = self.visual_tokens(features) if features is not None else None
        inputs = self.splice(batch["input_ids"], batch["attention_mask"], visual, padding_side="left")
        return inputs, features, batch.get("image_to_sample")

    def _encode_distinct(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`encode_images`, running the encoder once per distinct image: a class asking about the same example
        image is batched together (the chat batcher), and each copy would cost a full encoder pass."""
        slot: dict[bytes, int] = {}
        distinct, rows = [], []
        for i, row in enumerate(pixel_values.detach().cpu()):
            key = hashlib.blake2b(row.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).digest()
            if key not in slot:
                slot[key] = len(distinct)
                distinct.append(i)
            rows.append(slot[key])
        if len(distinct) == len(rows):
            return self.encode_images(pixel_values)
        features = self.encode_images(pixel_values[distinct])
        return features[torch.tensor(rows, device=features.device)]

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float, **extra) -> dict:
        from transformers import GenerationConfig

        gen = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0 else None,
            top_k=None, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.llm.generation_config.eos_token_id or self.tokenizer.eos_token_id, **extra,
        )
        return {"generation_config": gen}

    @torch.inference_mode()
    def generate(self, messages: Conversation | Sequence[Conversation], images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] = (),
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, streamer=None, **extra):
        """Answer one conversation (returns str) or a batch of conversations (returns list[str]).

        Always in inference mode: a model fresh from `from_config` is in training mode, where batch-statistics
        layers (the integrators' feature standardiser) would make an answer depend on the rest of its batch and
        would update their running statistics; the mode is restored afterwards."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        image_lists = [list(images)] if single else [list(x) for x in images] if images else [[] for _ in conversations]
        was_training = self.training
        self.eval()
        try:
            inputs, features, image_to_sample = self._generation_inputs(conversations, image_lists)
            self.integrator.set_visual_context(features, image_to_sample)
            try:
                texts = self._generate_from(inputs.inputs_embeds, inputs.attention_mask, max_new_tokens,
                                            temperature, top_p, streamer, slots=self.visual_slots(inputs), **extra)
            finally:
                self.integrator.set_visual_context(None, None)
        finally:
            if was_training:
                self.train()
        return texts[0] if single else texts

    def _generate_from(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float,
                       top_p: float, streamer=None, slots: torch.Tensor | None = None, **extra) -> list[str]:
        """The LLM generates from spliced, left-padded inputs (`peft_generate` = llm.generate without PEFT);
        `slots` marks visual tokens that enter above the embeddings."""
        with visual_entry(self.llm, self.entry_layer, embeds, slots):
            out = peft_generate(self.llm, with_placeholders(embeds, slots), mask, streamer=streamer,
                                **self._generation_kwargs(max_new_tokens, temperature, top_p, **extra))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def llm_batch_key(self) -> tuple:
        """Models with equal keys run the very same LLM computation: the same tensors (runs on a shared base,
        `model_pool`) and nothing of their own inside the LLM (no PEFT modules, no in-LLM integrator modules,
        no hooks). Their rows can be generated in one batch (`generate_together`); any other model's key is
        its own."""
        llm = self.llm
        own_inside = is_peft_model(llm) or self.integrator.llm_parameters() or any(
            m._forward_hooks or m._forward_pre_hooks for m in llm.modules())
        if own_inside:
            return ("model", id(self))
        return ("llm", hash(tuple(t.data_ptr() for t in llm.parameters())), str(self.dtype), str(self.device),
                self.entry_layer)

    def stream(self, messages: Conversation, images: Sequence[ImageSource] = (), **generation) -> Iterator[str]:
        """Yield the answer's text as it is generated (a background thread runs `generate`)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []
        # Load and check inputs here, so bad images or placeholders raise in the caller, not in the thread.
        self.encode_conversation(messages, len(images), add_generation_prompt=True)
        images = [load_image(im) for im in images]

        def run():
            try:
                self.generate(messages, images, streamer=streamer, **generation)
            except BaseException as e:  # surfaced to the consumer below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if errors:
            raise errors[0]


@torch.inference_mode()
def generate_together(models: Sequence[VisionLanguageModel], conversations: Sequence[Conversation],
                      images: Sequence[Sequence[ImageSource]], max_new_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, streamer=None, **extra) -> list[str]:
    """Generate row i with `models[i]` — several runs on one shared LLM (equal `llm_batch_key`s) in one batch.

    Each row's prompt and visual tokens come from its own model (its integrator, its system prompt); the
    shared LLM then generates every row at once, so a class chatting with different runs of one base is
    answered together. Rows of one model alone go through `model.generate`."""
    lead = models[0]
    if all(m is lead for m in models):
        return lead.generate(list(conversations), [list(x) for x in images], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, streamer=streamer, **extra)
    if len({m.llm_batch_key() for m in models}) != 1:
        raise ConfigError("These models do not share one LLM computation: generate them separately")
    distinct = list({id(m): m for m in models}.values())
    was_training = [m.training for m in distinct]
    rows: dict[int, torch.Tensor] = {}
    slot_rows: dict[int, torch.Tensor] = {}
    try:
        for model in distinct:
            model.eval()
            mine = [i for i, m in enumerate(models) if m is model]
            inputs, _, _ = model._generation_inputs([conversations[i] for i in mine], [list(images[i]) for i in mine])
            slots = span_mask(inputs.image_spans, inputs.inputs_embeds.shape[1], inputs.inputs_embeds.device)
            for j, i in enumerate(mine):
                keep = inputs.attention_mask[j].bool()
                rows[i], slot_rows[i] = inputs.inputs_embeds[j][keep], slots[j][keep]
        width = max(r.shape[0] for r in rows.values())
        embeds = rows[0].new_zeros(len(models), width, rows[0].shape[-1])
        mask = torch.zeros(len(models), width, dtype=torch.long, device=embeds.device)
        slots = torch.zeros(len(models), width, dtype=torch.bool, device=embeds.device)
        for i, row in rows.items():  # left-padded, as generation needs
            embeds[i, width - row.shape[0]:] = row
            mask[i, width - row.shape[0]:] = 1
            slots[i, width - row.shape[0]:] = slot_rows[i]
        return lead._generate_from(embeds, mask, max_new_tokens, temperature, top_p, streamer,
                                   slots=slots if lead.entry_layer else None, **extra)
    finally:
        for model, training in zip(distinct, was_training):
            model.train(training)


def _checkpointed_layers_train(llm: nn.Module) -> None:
    """Put only the decoder layers of an eval-mode LLM in training mode: transformers checkpoints a layer
    only while it is training, and a frozen LLM still keeps activations for the gradients that pass through
    it to the integrator. Their submodules (attention, dropout) stay in eval mode: no dropout appears."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in llm.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


def is_checkpointing(llm: nn.Module) -> bool:
    """Whether the LLM's layers recompute their activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base_llm(llm).modules())


def is_quantized(llm: nn.Module) -> bool:
    """Whether the LLM was loaded quantized (bitsandbytes, QLoRA)."""
    return getattr(base_llm(llm), "hf_quantizer", None) is not None


def _resolve_inside(config: ModelConfig, path: Path) -> ModelConfig:
    """Parts a saved directory carries inside itself (a `merged` export's `./llm/`, `./encoder/`) are named
    relative to it, so the directory loads wherever it is moved."""
    for spec, attr in ((config.llm, "name"), (config.encoder, "model")):
        value = getattr(spec, attr)
        if isinstance(value, str) and value.startswith("./") and (path / value).exists():
            setattr(spec, attr, str((path / value).resolve()))
    return config


def _entry_layer(config: ModelConfig, integrator: Integrator, llm: nn.Module) -> int:
    """`model.visual_entry_layer` as a decoder-layer index. An integrator without tokens in the sequence
    (LLaMA-Adapter's prompts) has nothing to move: 0, so one recipe can be tried with every family."""
    if not config.visual_entry_layer or not integrator.num_tokens:
        return 0
    if virtual_tokens(llm):
        raise ConfigError("model.visual_entry_layer cannot be combined with PEFT virtual tokens (prompt or prefix "
                          "tuning): they shift the sequence inside the LLM")
    return _configured_entry(config, llm)


def _configured_entry(config: ModelConfig, llm: nn.Module) -> int:
    """`model.visual_entry_layer` as a decoder-layer index (0 when not set)."""
    if not config.visual_entry_layer:
        return 0
    from .integrators.llm_layers import decoder_layers

    return resolve_entry_layer(config.visual_entry_layer, len(decoder_layers(base_llm(llm), "visual_entry_layer")))


def _text_scale(entry: int, llm: nn.Module, tokenizer) -> float:
    """The norm visual tokens should have where they enter (decoder layer `entry`): the text embeddings', or
    ordinary text's hidden states entering that layer."""
    if entry:
        norm = hidden_norm_at(llm, tokenizer, entry)
        if norm is not None:
            return norm
    return _text_embedding_norm(llm)


def _text_embedding_norm(llm: nn.Module) -> float:
    """Mean L2 norm of the input embedding rows (a sample of them: the vocabulary can be large)."""
    weight = llm.get_input_embeddings().weight
    if weight.device.type == "meta":  # described, not run: any scale will do
        return 1.0
    rows = weight[:: max(1, weight.shape[0] // 4096)]
    return float(rows.detach().float().norm(dim=-1).mean())


def format_parameter_table(rows: list[dict[str, Any]]) -> str:
    """The parameter report as an aligned text table (CLI and notebooks print this)."""
    lines = [f"{'component':<12}{'total':>15}{'trainable':>15}{'trainable %':>13}{'share %':>10}"]
    for r in rows:
        if r["component"] == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{r['component']:<12}{r['total']:>15,}{r['trainable']:>15,}{r['trainable_pct']:>12.2f}%"
                     f"{r['share_pct']:>9.1f}%")
    return "\n".join(lines)
