"""The logit lens on visual tokens: which vocabulary words each visual token reads as, layer by layer.

The logit lens (nostalgebraist, 2020) decodes an intermediate hidden state through the LLM's own final norm and
LM head, as if the model stopped there. Applied to the image's vectors it says what the LLM makes of each patch:
"this patch reads as *red* by layer 20". What is read depends on how the family brings the image in:
- visual tokens in the sequence (projectors, pooling, convolutional and attention abstractors, LaVIN's prefix):
  the residual stream at their positions, at the input embeddings (layer 0) and after every decoder layer;
- one media marker per image (gated cross-attention): the marker's stream, which takes in the resampled image
  through the cross-attention blocks (its latents live at the resampler's width and cannot be decoded);
- vectors outside the sequence at the LLM's width (LLaMA-Adapter's adaption prompts with the image feature
  added, `AttentionRecord.visual_prompts`): each adapted layer's prompts.
Tokens whose patch map is fixed by the architecture keep the encoder's (possibly downsampled) grid and are shown
over it; query-based tokens (Q-Former, resampler) and prompts are shown as a row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import _recording, available_views, LOGIT_LENS
from .errors import ConfigError


@dataclass
class LogitLens:
    """Top-k words of every visual vector at every layer, for one image."""

    layer_names: list[str]
    """One label per read-out: "embeddings" and "layer i" (after decoder layer i), or the adapted layers."""
    token_labels: list[str]
    words: list[list[list[str]]]
    """[layer][token][k]: the k most probable vocabulary words."""
    probs: torch.Tensor
    """(layers, tokens, k) their probabilities."""
    ids: torch.Tensor
    """(layers, tokens, k) their vocabulary ids."""
    layout: tuple[int, int] | None
    """(rows, cols) when the tokens keep the image's grid (row-major), None for a row of queries/prompts."""
    summary: list[int] = field(default_factory=list)
    """Tokens outside the grid (a kept CLS token, which summarises the whole image)."""
    reads: str = ""
    """What was decoded, in words."""
    image: object | None = None
    """The image as the encoder saw it (square), for drawing the grid over it."""

    def top_words(self, layer: int) -> list[str]:
        return [w[0] for w in self.words[self.layer_index(layer)]]

    def layer_index(self, layer: int) -> int:
        """A read-out index (negative counts from the last), checked."""
        n = len(self.layer_names)
        if not -n <= layer < n:
            raise ConfigError(f"layer must be in 0..{n - 1} ({self.layer_names[0]} … {self.layer_names[-1]}), got {layer}")
        return layer % n


def token_layout(patch_map: torch.Tensor | None, fixed: bool, grid: tuple[int, int]
                 ) -> tuple[tuple[int, int] | None, list[int]]:
    """((rows, cols) of the grid the visual tokens keep, or None; the tokens outside it) from their (tokens, h·w)
    patch map over the encoder's (h, w) grid.

    Only a map fixed by the architecture places tokens; a token whose row is uniform (CLS) summarises the image.
    Grid tokens are laid out by the centroids of their patch maps: distinct row centroids × distinct column
    centroids, or a square (a grid upsampled from fewer patches repeats centroids), and their order must be
    row-major (centroids growing along rows and along columns)."""
    if patch_map is None or not fixed:
        return None, []
    h, w = grid
    uniform = (patch_map - 1.0 / (h * w)).abs().amax(dim=1) < 1e-6
    summary = uniform.nonzero().flatten().tolist()
    rows = patch_map[~uniform]
    k = rows.shape[0]
    if k == 0:
        return None, summary
    ys = torch.arange(h).repeat_interleave(w).float()
    xs = torch.arange(w).repeat(h).float()
    cy, cx = (rows @ ys).round(decimals=3), (rows @ xs).round(decimals=3)
    R, C = len(cy.unique()), len(cx.unique())
    if R * C != k:
        side = math.isqrt(k)
        if side * side != k:
            return None, summary
        R = C = side
    row_major = bool((cy.reshape(R, C).diff(dim=0) >= 0).all() and (cx.reshape(R, C).diff(dim=1) >= 0).all())
    return ((R, C) if row_major else None), summary


def _final_norm(llm) -> torch.nn.Module:
    decoder = getattr(llm, "model", None)
    if decoder is None and callable(getattr(llm, "get_decoder", None)):
        decoder = llm.get_decoder()
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    if norm is None:
        raise ConfigError(f"The logit lens needs the LLM's final norm; '{type(llm).__name__}' has none it can find")
    return norm


def decode(model, hidden: torch.Tensor, top_k: int = 5, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, H) hidden states → (…, k) probabilities and vocabulary ids, through the LLM's final norm and LM head."""
    from .peft_modules import base_llm

    llm = base_llm(model.llm)
    norm, head = _final_norm(llm), llm.get_output_embeddings()
    param = next(head.parameters())
    flat = hidden.reshape(-1, hidden.shape[-1])
    k = min(top_k, head.out_features if hasattr(head, "out_features") else top_k)
    values, indices = [], []
    with torch.no_grad():
        for rows in flat.split(chunk):  # a vocabulary-wide softmax per row: chunks keep the memory small
            probs = head(norm(rows.to(device=param.device, dtype=param.dtype))).float().softmax(dim=-1)
            top = probs.topk(k, dim=-1)
            values.append(top.values.cpu())
            indices.append(top.indices.cpu())
    shape = (*hidden.shape[:-1], k)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)


def _layer_states(model, batch, features) -> tuple[list[torch.Tensor], object]:
    """The residual stream entering the first decoder layer and leaving each one: (layers + 1) × (L, H)."""
    from .integrators.llm_layers import _hidden_of, decoder_layers
    from .peft_modules import base_llm

    layers = decoder_layers(base_llm(model.llm), LOGIT_LENS)
    states: list[torch.Tensor] = []

    def before(module, args, kwargs):
        if not states:
            states.append(_hidden_of(args, kwargs)[0].detach())

    def after(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        _, inputs = model.run_llm(batch, features)
    finally:
        for h in handles:
            h.remove()
    return states, inputs


def logit_lens(model, messages: list[dict], images: Sequence = (), image: int = 0, top_k: int = 5) -> LogitLens:
    """Decode every visual vector of image `image` at every layer into its top-k words (one pass over the prompt;
    an answer is not needed: under causal attention what follows cannot change the visual tokens' states)."""
    from .images import load_image

    views = available_views(model)
    if views.lens is None:
        raise ConfigError(f"No logit lens for {views.integrator}: {views.absent[LOGIT_LENS]}")
    images = [load_image(im) for im in images]
    if not 0 <= image < len(images):
        raise ConfigError(f"Image {image} does not exist: the prompt has {len(images)} image(s)")
    batch = model.prepare_batch([list(messages)], [images], add_generation_prompt=True)
    was_training = model.training
    model.eval()
    try:
        with _recording(model.integrator), torch.no_grad():
            features = model.encode_images(batch["pixel_values"])
            states, inputs = _layer_states(model, batch, features)
            record = model.integrator.last_attention
            prompts = {layer: p[0] for layer, p in sorted(record.visual_prompts.items())}
            patch_map = model.integrator.patch_map()
    finally:
        model.train(was_training)
    fixed = patch_map is not None and patch_map.dim() == 2
    square = model.encoder.square_view(images[image])
    if prompts:
        vectors = torch.stack(list(prompts.values()))  # (adapted layers, prompts, H)
        names = [f"layer {layer}" for layer in prompts]
        labels = [f"prompt {p}" for p in range(vectors.shape[1])]
        layout, summary, reads = None, [], f"{views.integrator}'s visual prompts inside each adapted layer"
    else:
        L = inputs.inputs_embeds.shape[1]
        start, count = inputs.image_spans[0][image]
        entry = model.entry_layer  # below it the slots hold placeholders: read the tokens from where they enter
        entering = inputs.inputs_embeds[0, -L:] if entry else states[0][-L:]
        vectors = torch.stack([entering[start:start + count]] + [s[-L:][start:start + count]
                                                                 for s in states[entry + 1:]])  # (layers + 1, tokens, H)
        names = [f"entering layer {entry}" if entry else "embeddings"] + [
            f"layer {i}" for i in range(entry, len(states) - 1)]
        labels = [f"token {t}" for t in range(count)]
        if patch_map is not None and patch_map.dim() == 3:
            patch_map = patch_map[image]
        layout, summary = token_layout(patch_map.float().cpu() if patch_map is not None else None, fixed,
                                       tuple(model.encoder.grid))
        reads = f"the {count} visual token(s) of image {image} in the sequence"
    probs, ids = decode(model, vectors, top_k)
    tok = model.tokenizer
    words = [[[tok.decode([int(i)]) for i in token] for token in layer] for layer in ids]
    return LogitLens(layer_names=names, token_labels=labels, words=words, probs=probs, ids=ids, layout=layout,
                     summary=summary, reads=reads, image=square)
