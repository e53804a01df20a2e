"""Where did the model look? Attention and relevancy maps over the image, for every model the workbench builds.

One eager-attention pass over prompt + answer (chat and training keep their fused kernels) records:
- the LLM's self-attention probabilities, per layer and head;
- how each visual token draws on the encoder's patch grid (`Integrator.patch_map`): identity for
  linear/MLP, the pooling/convolution receptive field for avg_pool/C-Abstractor/LDP, the recorded
  query→patch cross-attention for Q-Former/resampler;
- for gated cross-attention (Flamingo), the text→latent cross-attention of every block with its gate,
  composed with the resampler's latent→patch attention.
Composing token→visual-token attention with visual-token→patch maps puts every view on image patches.
What the integrator recorded is read by field from its `AttentionRecord` (integrators/base.py).

A second, gradient-based view (`relevancy=True`) needs one backward pass: gradient-weighted attention
relevancy (Chefer et al., 2021, as LVLM-Interpret uses) and |gradient · input| on the encoder's patches,
which works for every integrator, including adapters inside the LLM that have no attention path to
the patches (LaVIN, LLaMA-Adapter), and for PEFT-wrapped (LoRA…) models.

Conventions: an answer token is read at the position that produced it (the query one step before it);
maps are distributions over the image's grid patches (non-negative, summing to 1).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ConfigError

HEAD_AGGREGATIONS = ("mean", "max")
METHODS = ("attention", "rollout", "relevancy", "gradient")


@dataclass
class AttentionTrace:
    """What one eager pass recorded for a single conversation (everything on CPU, float32)."""

    tokens: list[str]
    """One label per sequence position: text tokens as text, visual tokens as "<image k:t>"."""
    image_spans: list[tuple[int, int]]
    """(start, count) of each image's visual tokens in the sequence."""
    answer_positions: list[int]
    """Sequence positions of the answer's tokens."""
    answer: str
    attentions: torch.Tensor
    """(layers, heads, L, L) self-attention probabilities of the LLM over the sequence."""
    patch_maps: list[torch.Tensor | None]
    """Per image: (visual tokens, h·w) how each visual token draws on the grid patches, or None."""
    grid: tuple[int, int]
    images: list = field(default_factory=list)
    """The images as the encoder saw them (squared, resized): what the maps are drawn over."""
    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    """Gated cross-attention: layer → (heads, L, images·latents) text→latent attention."""
    gates: dict[int, float] = field(default_factory=dict)
    """Gated cross-attention: layer → tanh(alpha) of its attention gate."""
    latent_maps: torch.Tensor | None = None
    """Gated cross-attention: (images, latents, h·w) latent→patch attention of its resampler."""
    relevancy: torch.Tensor | None = None
    """(answer tokens, L) gradient-weighted attention relevancy of each position (with `relevancy=True`)."""
    gradient: torch.Tensor | None = None
    """(answer tokens, images, h·w) |gradient · input| per encoder patch (with `relevancy=True`; see
    `_attribution_point`)."""
    integrator: str = ""
    fixed_patch_map: bool = False
    """Whether each visual token's patch map is fixed by the architecture (projectors, pooling, convolutions),
    not read from this image's attention (Q-Former, resampler): only then do the tokens keep a grid."""
    visual_prompts: bool = False
    """Whether the integrator carried the image into the layers as vectors outside the sequence
    (`AttentionRecord.visual_prompts`), which the logit lens can read."""
    entry_layer: int = 0
    """Decoder layer where the visual tokens enter (`model.visual_entry_layer`): below it their slots hold
    image-free placeholders, so the views read the layers from it up unless given others."""

    @property
    def num_layers(self) -> int:
        return int(self.attentions.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.attentions.shape[1])

    @property
    def answer_tokens(self) -> list[str]:
        return [self.tokens[p] for p in self.answer_positions]

    def query_position(self, token: int) -> int:
        """The position whose output produced answer token `token` (negative counts from the end)."""
        if not self.answer_positions:
            raise ConfigError("The answer is empty: there is no answer token to explain")
        try:
            return self.answer_positions[token] - 1
        except IndexError:
            raise ConfigError(f"Answer token {token} does not exist: the answer has "
                              f"{len(self.answer_positions)} tokens") from None

    def image_positions(self, image: int = 0) -> slice:
        if not 0 <= image < len(self.image_spans):
            raise ConfigError(f"Image {image} does not exist: the prompt has {len(self.image_spans)} image(s)")
        start, count = self.image_spans[image]
        return slice(start, start + count)


# ---------------------------------------------------------------------------------------------- recording

@contextlib.contextmanager
def eager_attention(llm):
    """Switch the LLM (under any PEFT wrapper) to eager attention for one pass, which returns the weights."""
    from .peft_modules import base_llm

    model = base_llm(llm)
    previous = getattr(model.config, "_attn_implementation", None)
    switched = previous not in (None, "eager")
    if switched:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(previous)


@contextlib.contextmanager
def _recording(integrator):
    previous = integrator.record_attention
    integrator.record_attention = True
    try:
        yield
    finally:
        integrator.record_attention = previous


def trace_attention(model, messages: list[dict], images: Sequence = (), answer: str | None = None,
                    max_new_tokens: int = 32, relevancy: bool = False) -> AttentionTrace:
    """Answer (unless `answer` is given) with normal generation, then record one eager pass over prompt + answer.

    `relevancy=True` adds a backward pass per answer token for the gradient-based views.
    """
    from .images import load_image

    images = [load_image(im) for im in images]
    if answer is None:
        answer = model.generate(messages, images, max_new_tokens=max_new_tokens)
    conversation = list(messages) + [{"role": "assistant", "content": answer}]
    batch = model.prepare_batch([conversation], [images])
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model.llm), _recording(model.integrator), torch.no_grad():
            features = model.encode_images(batch["pixel_values"]) if images else None
            out, inputs = model.run_llm(batch, features, output_attentions=True)
            recorded = _recorded_views(model)
            patch_maps = _patch_maps(model, len(images))
        trace = _build_trace(model, batch, inputs, out, recorded, patch_maps, images, answer)
        trace.fixed_patch_map = _fixed_patch_map(model)
        trace.visual_prompts = bool(model.integrator.last_attention.visual_prompts)
        if relevancy:
            _add_relevancy(model, batch, trace, features)
    finally:
        model.train(was_training)
    return trace


def _patch_maps(model, num_images: int) -> list[torch.Tensor | None]:
    maps = model.integrator.patch_map()
    if maps is None:
        return [None] * num_images
    maps = maps.detach().float().cpu()
    if maps.dim() == 2:
        return [maps] * num_images
    return list(maps)


def _fixed_patch_map(model) -> bool:
    """A patch map of one matrix for every image (`Integrator.patch_map` contract) is the architecture's own."""
    maps = model.integrator.patch_map()
    return maps is not None and maps.dim() == 2


def _recorded_views(model) -> tuple[dict[int, torch.Tensor], dict[int, float], torch.Tensor | None]:
    """What the trace keeps from the integrator's AttentionRecord: gated cross-attention's text→latent maps
    (first row), every attention gate as its mean |value| per layer, and, to compose the text→latent maps with,
    the latent→patch maps of the resampler layer whose latents the blocks read (its last)."""
    record = model.integrator.last_attention
    cross = {layer: a[0].float().cpu() for layer, a in record.text_to_latent.items()}
    gates = {layer: float(g.float().abs().mean()) for layer, g in record.gates.items()}
    latent_maps = None
    if cross and record.latent_to_image:
        last = record.latent_to_image[max(record.latent_to_image)]
        latent_maps = _drop_cls(model, last.float().mean(dim=1).cpu())
    return cross, gates, latent_maps


def _answer_positions(labels: torch.Tensor) -> list[int]:
    from .data.prompting import IGNORE_INDEX

    return (labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()


def _build_trace(model, batch, inputs, out, recorded, patch_maps, images, answer) -> AttentionTrace:
    L = inputs.inputs_embeds.shape[1]
    attentions = torch.stack([a[0, :, -L:, -L:].float().cpu() for a in out.attentions])  # drop virtual tokens
    spans = inputs.image_spans[0]
    positions = _answer_positions(inputs.labels)
    labels = _token_labels(model, inputs, batch, spans)
    cross, gates, latent_maps = recorded
    return AttentionTrace(tokens=labels, image_spans=list(spans), answer_positions=positions, answer=answer,
                          attentions=attentions, patch_maps=patch_maps, grid=tuple(model.encoder.grid),
                          images=[model.encoder.square_view(im) for im in images], cross=cross, gates=gates,
                          latent_maps=latent_maps, integrator=model.config.integrator.name,
                          entry_layer=getattr(model, "entry_layer", 0))


def _drop_cls(model, maps: torch.Tensor) -> torch.Tensor:
    """(..., N) over encoder tokens → (..., h·w) over grid patches, renormalised (CLS, when kept, dropped)."""
    if model.integrator.context.has_cls:
        maps = maps[..., 1:]
    return maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _token_labels(model, inputs, batch, spans) -> list[str]:
    """Text of every sequence position; visual tokens as <image k:t>."""
    from .data.prompting import IMAGE_TOKEN_INDEX

    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    labels: list[str] = []
    k = 0
    for token_id in ids:
        if token_id == IMAGE_TOKEN_INDEX:
            labels += [f"<image {k}:{t}>" for t in range(spans[k][1])]
            k += 1
        else:
            labels.append(model.tokenizer.decode([token_id]))
    return labels


def _add_relevancy(model, batch, trace: AttentionTrace, features: torch.Tensor | None) -> None:
    """Gradient-weighted attention relevancy (Chefer et al., 2021) and |gradient · input| per patch, per answer
    token."""
    rel_rows, grad_rows = [], []
    L = trace.attentions.shape[-1]
    point = _attribution_point(model)
    for position in trace.answer_positions:
        feats = features.detach().clone().requires_grad_(True) if features is not None else None
        seen: list[torch.Tensor] = []
        hook = point.register_forward_hook(lambda m, a, out: seen.append(out) or out.retain_grad()) \
            if point is not None and feats is not None else None
        with eager_attention(model.llm), torch.enable_grad():
            try:
                out, inputs = model.run_llm(batch, feats, output_attentions=True, embeds_require_grad=True)
            finally:
                if hook is not None:
                    hook.remove()
            for a in out.attentions:
                a.retain_grad()
            target = inputs.labels[0, position]
            logprob = out.logits[0, position - 1].float().log_softmax(-1)[target]
            model.zero_grad(set_to_none=True)
            logprob.backward()
        relevance = torch.eye(L)
        for a in out.attentions[trace.entry_layer:]:  # below the entry the visual slots hold placeholders
            attn, grad = a[0, :, -L:, -L:].detach().float().cpu(), a.grad[0, :, -L:, -L:].float().cpu()
            cam = (grad * attn).clamp(min=0).mean(dim=0)
            relevance = relevance + cam @ relevance
        rel_rows.append(relevance[position - 1])
        # read after the norm when it keeps one row per patch (LLaMA-Adapter normalises a pooled vector)
        x = seen[0] if seen and seen[0].grad is not None and seen[0].shape == feats.shape else feats
        if x is not None and x.grad is not None:
            # how much each patch's input moves the answer's log-probability, either way (|grad · input|)
            g = (x.grad * x.detach()).sum(dim=-1).abs().float().cpu()  # (images, N)
            grad_rows.append(_drop_cls(model, g + 1e-12))
        model.zero_grad(set_to_none=True)
    trace.relevancy = torch.stack(rel_rows) if rel_rows else None
    trace.gradient = torch.stack(grad_rows) if grad_rows else None


def _attribution_point(model) -> torch.nn.Module | None:
    """The integrator's per-token LayerNorm over the encoder features, if it has one: gradient × input is read
    at its output. A LayerNorm is blind to its input's scale, so the gradient reaching the raw features is
    orthogonal to them (∂f(x/|x|)/∂x · x = 0) and gradient · feature is ~0 at every patch, whatever the
    model looks at; after the norm, scale matters again and gradient × input estimates what removing a
    patch's token would change. None: read at the raw features."""
    dim = model.integrator.context.vision_dim
    for module in model.integrator.modules():
        if isinstance(module, torch.nn.LayerNorm) and tuple(module.normalized_shape) == (dim,):
            return module
    return None


# ---------------------------------------------------------------------------------------------- views

def _heads(a: torch.Tensor, head: int | str) -> torch.Tensor:
    """(…, heads, Q, K) → (…, Q, K) by one head, mean or max."""
    if head == "mean":
        return a.mean(dim=-3)
    if head == "max":
        return a.max(dim=-3).values
    if isinstance(head, int) and 0 <= head < a.shape[-3]:
        return a.select(-3, head)
    raise ConfigError(f"head must be mean, max or 0..{a.shape[-3] - 1}, got {head!r}")


def _layers(trace: AttentionTrace, layers: Sequence[int] | int | None) -> list[int]:
    if layers is None:
        return list(range(trace.entry_layer, trace.num_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not -trace.num_layers <= i < trace.num_layers]
    if bad or not layers:
        raise ConfigError(f"layers must be in 0..{trace.num_layers - 1}, got {layers}")
    return [i % trace.num_layers for i in layers]


def rollout(trace: AttentionTrace, head: int | str = "mean", layers: Sequence[int] | None = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): (L, L) attention flow through the residual stream."""
    L = trace.attentions.shape[-1]
    flow = torch.eye(L)
    for i in _layers(trace, layers):
        a = 0.5 * _heads(trace.attentions[i], head) + 0.5 * torch.eye(L)
        flow = (a / a.sum(dim=-1, keepdim=True)) @ flow
    return flow


def token_scores(trace: AttentionTrace, token: int = -1, method: str = "attention", head: int | str = "mean",
                 layers: Sequence[int] | int | None = None) -> torch.Tensor:
    """(L,) how much the query producing answer `token` draws on every sequence position."""
    q = trace.query_position(token)
    if method == "attention":
        chosen = trace.attentions[_layers(trace, layers)]
        return _heads(chosen, head)[:, q].mean(dim=0)
    if method == "rollout":
        return rollout(trace, head, layers)[q]
    if method == "relevancy":
        if trace.relevancy is None:
            raise ConfigError("Relevancy was not computed: trace with relevancy=True")
        return trace.relevancy[token].clone()
    raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def image_map(trace: AttentionTrace, token: int = -1, method: str = "attention", head: int | str = "mean",
              layers: Sequence[int] | int | None = None, image: int = 0) -> torch.Tensor:
    """(h, w) distribution over the image's grid patches of what produced answer `token`."""
    h, w = trace.grid
    trace.image_positions(image)  # a clear error for an image the prompt does not have
    if method == "gradient":
        if trace.gradient is None:
            raise ConfigError("Gradients were not computed: trace with relevancy=True")
        return _normalise(trace.gradient[token, image]).reshape(h, w)
    if trace.cross:  # gated cross-attention: the image enters through the blocks, not the sequence
        if method != "attention":
            raise ConfigError("Gated cross-attention reaches the image only through its cross-attention blocks, "
                              "not through the sequence: use method='attention' (their maps) or 'gradient'")
        return _normalise(_cross_attention_map(trace, token, head, layers, image)).reshape(h, w)
    patch_map = trace.patch_maps[image]
    if patch_map is None:
        raise ConfigError(f"The {trace.integrator} integrator has no attention path from its visual tokens to the "
                          "image patches: use method='gradient'")
    scores = token_scores(trace, token, method, head, layers)[trace.image_positions(image)]
    return _normalise(scores @ patch_map).reshape(h, w)


def _cross_attention_map(trace, token, head, layers, image) -> torch.Tensor:
    if trace.latent_maps is None:
        raise ConfigError("No latent→patch attention was recorded for this gated cross-attention model")
    q = trace.query_position(token)
    blocks = sorted(trace.cross)
    if layers is not None:
        wanted = set(_layers(trace, layers))
        blocks = [b for b in blocks if b in wanted] or blocks
    num_latents = trace.latent_maps.shape[1]
    total = None
    for b in blocks:
        row = _heads(trace.cross[b], head)[q]  # (images·latents,)
        part = row[image * num_latents:(image + 1) * num_latents] @ trace.latent_maps[image]
        weight = abs(trace.gates.get(b, 1.0)) or 1e-6  # a closed gate lets nothing through
        total = part * weight if total is None else total + part * weight
    return total


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(min=0)
    s = x.sum()
    return x / s if s > 0 else torch.full_like(x, 1.0 / x.numel())


def modality_share(trace: AttentionTrace, token: int | None = None, head: int | str = "mean") -> list[dict]:
    """Per layer: the share of attention that went to image tokens and to text tokens, from the answer's
    queries (one token, or the mean over all answer tokens)."""
    queries = [trace.query_position(token)] if token is not None else [p - 1 for p in trace.answer_positions]
    image_mask = torch.zeros(trace.attentions.shape[-1], dtype=torch.bool)
    for start, count in trace.image_spans:
        image_mask[start:start + count] = True
    rows = []
    for layer in range(trace.num_layers):
        a = _heads(trace.attentions[layer], head)[queries]  # (Q, L)
        total = a.sum(dim=-1).clamp_min(1e-12)
        image = (a[:, image_mask].sum(dim=-1) / total).mean().item()
        rows.append({"layer": layer, "image": image, "text": 1.0 - image})
    return rows


def prompt_attention(trace: AttentionTrace, token: int = -1, method: str = "attention", head: int | str = "mean",
                     layers: Sequence[int] | int | None = None) -> list[tuple[str, float]]:
    """Which prompt positions the answer token drew on: (label, share) for every position before it."""
    q = trace.query_position(token)
    scores = token_scores(trace, token, method, head, layers)[: q + 1]
    scores = scores / scores.sum().clamp_min(1e-12)
    return [(trace.tokens[i], float(s)) for i, s in enumerate(scores)]


# ---------------------------------------------------------------------------------------------- which views exist

LOGIT_LENS = "logit lens"
VIEW_PREFERENCE = ("relevancy", "attention", "rollout", "gradient")
"""The default view is the first of these a family has: gradient-weighted relevancy is specific to the answer
token and follows attention through every layer; raw attention next; rollout spreads over everything;
the gradient view reaches every family but ignores the attention paths."""


@dataclass
class AvailableViews:
    """Which views exist for one model's integrator family, derived from what its pass exposes."""

    integrator: str
    views: list[str]
    """The image-map views (`image_map` methods) that render for this family, in `METHODS` order."""
    default: str
    """The most informative of `views` (the first in `VIEW_PREFERENCE`)."""
    absent: dict[str, str]
    """View (a method, or `LOGIT_LENS`) → one sentence on why this family does not have it."""
    figures: dict[str, str]
    """Companion figure ("modality share") → why it does not apply to this family; absent when it does."""
    lens: str | None
    """What the logit lens reads for this family (None when it has nothing to read: see `absent`)."""

    def explanation(self) -> str:
        """One line for the views offered, then one sentence per reason a view is absent (shared reasons once)."""
        lines = [f"Views for {self.integrator}: " + ", ".join(f"{v} (default)" if v == self.default else v
                                                           for v in self.views) + "."]
        by_reason: dict[str, list[str]] = {}
        for view, reason in self.absent.items():
            by_reason.setdefault(reason, []).append(view)
        lines += [f"No {_or(views)}: {reason}." for reason, views in by_reason.items()]
        if self.lens:
            lines.append(f"The logit lens reads {self.lens}.")
        return "\n".join(lines)


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


_VIEWS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""integrator → its AvailableViews: the family's views do not change while the model lives."""


def available_views(model_or_trace) -> AvailableViews:
    """The views that exist for a model (one short probe pass on a blank image, remembered per model) or for a
    trace already recorded, with the reason for each absent one and the best default.

    Derived from the pass, not from integrator names: whether visual tokens sit in the LLM's sequence, whether
    they have a path back to the patches (`Integrator.patch_map`), and which `AttentionRecord` fields the
    integrator filled (gated cross-attention's text→latent maps, in-LLM visual prompts).
    """
    if isinstance(model_or_trace, AttentionTrace):
        return _views_of_trace(model_or_trace)
    model = model_or_trace
    key = model.integrator
    if key not in _VIEWS_OF:
        _VIEWS_OF[key] = _views_of_trace(_probe_trace(model))
    return _VIEWS_OF[key]


def _probe_trace(model) -> AttentionTrace:
    from PIL import Image

    size = int(model.encoder.image_size)
    blank = Image.new("RGB", (size, size), (128, 128, 128))
    return trace_attention(model, [{"role": "user", "content": "<image>\n?"}], [blank], answer="a")


def _views_of_trace(trace: AttentionTrace) -> AvailableViews:
    name = trace.integrator or "this"
    in_sequence = bool(trace.image_spans) and trace.image_spans[0][1] > 0
    mapped = in_sequence and trace.patch_maps[0] is not None
    if not in_sequence:
        no_path = (f"{name} puts no visual tokens in the LLM's sequence (the image enters inside the layers), so the "
                   "answer's attention has no path to the patches; the gradient view reaches them")
    else:
        no_path = (f"{name}'s visual tokens have no recorded path back to the image patches; "
                   "the gradient view reaches them")
    absent: dict[str, str] = {}
    if trace.cross:
        beside = ("gated cross-attention reaches the image through its blocks beside the sequence, while rollout and "
                  "relevancy follow attention along the sequence")
        absent.update(rollout=beside, relevancy=beside)
        if trace.latent_maps is None:
            absent["attention"] = f"{name} recorded no latent→patch attention to compose its blocks' maps with"
    elif not mapped:
        absent.update(attention=no_path, rollout=no_path, relevancy=no_path)
    if not trace.images:
        absent["gradient"] = "the prompt has no image"
    views = [m for m in METHODS if m not in absent]
    lens = None
    if trace.visual_prompts:
        lens = f"the vectors {name} feeds the image through inside its layers (one row per layer it adapts)"
    elif in_sequence:
        count = trace.image_spans[0][1]
        lens = f"the {count} visual token{'s' if count > 1 else ''} of the image in the sequence, layer by layer"
        if trace.cross:
            lens += ": media markers, whose later layers take in the image through the cross-attention blocks"
    else:
        absent[LOGIT_LENS] = (f"{name} keeps no vector of the image at the LLM's width, in the sequence or in the "
                              "layers, for the LM head to decode")
    figures = {}
    if not in_sequence:
        figures["modality share"] = (f"{name} puts no visual tokens in the sequence: the answer's attention goes to "
                                     "text only, and the image acts inside the layers")
    default = next((v for v in VIEW_PREFERENCE if v in views), views[0] if views else "")
    return AvailableViews(integrator=name, views=views, default=default, absent=absent, figures=figures, lens=lens)
