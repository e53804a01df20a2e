"""Figures for the attention views (plotly for the app and notebooks, PNG for reports), from an AttentionTrace.

Kept apart from attention.py so computing maps needs no plotting library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .attention import AttentionTrace, available_views, image_map, modality_share, prompt_attention

_COLORSCALE = "Inferno"


def _upsample(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map → (H, W) for drawing over the image (bilinear, mass-preserving up to scale)."""
    t = amap[None, None].float()
    up = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0]
    return up.numpy()


def _colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 along a dark-purple → orange → yellow ramp (inferno-like)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    frac = (x - i)[..., None]
    return (stops[i] * (1 - frac) + stops[i + 1] * frac).astype(np.uint8)


def overlay_image(image: Image.Image, amap: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The map blended over the image as a PIL image (PNG export, thumbnails)."""
    image = image.convert("RGB")
    heat = _upsample(amap, image.size)
    heat = heat / heat.max() if heat.max() > 0 else heat
    colored = Image.fromarray(_colormap(heat))
    return Image.blend(image, colored, alpha)


def save_overlay_png(image: Image.Image, amap: torch.Tensor, path: str | Path, alpha: float = 0.55) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_image(image, amap, alpha).save(path)
    return path


def heatmap_figure(trace: AttentionTrace, token: int = -1, method: str = "attention", head: int | str = "mean",
                   image: int = 0, opacity: float = 0.55, title: str | None = None, max_heads: int = 16):
    """Plotly figure: the image with the map over it, a slider over layers (all layers first) and a menu
    over answer tokens × heads (mean, max and each head) for method "attention"; other methods show one
    view per answer token. Maps stay at grid resolution (smoothed when drawn), so the figure stays small."""
    import plotly.graph_objects as go

    views = available_views(trace)
    if method not in views.views:
        return note_figure(f"No {method} view for {views.integrator}: {views.absent.get(method, 'not offered')}",
                           title or f"{method}: not available")
    picture = trace.images[image] if trace.images else None
    width, height = picture.size if picture is not None else (trace.grid[1] * 32, trace.grid[0] * 32)
    h, w = trace.grid
    layer_views = [("all layers", None)]
    if method == "attention":
        layer_views += [(f"layer {i}", [i]) for i in range(trace.num_layers)]
    heads: list[int | str] = ["mean", "max", *range(min(trace.num_heads, max_heads))] if method in ("attention", "rollout") else [head]
    tokens = list(range(len(trace.answer_positions)))
    token_index = tokens[token] if tokens else 0

    def grids(t: int, hd) -> list[list[list[float]]]:
        return [image_map(trace, t, method, hd, layers, image).tolist() for _, layers in layer_views]

    fig = go.Figure()
    if picture is not None:
        fig.add_trace(go.Image(z=np.asarray(picture.convert("RGB")), hoverinfo="skip"))
    offset = len(fig.data)
    for k, z in enumerate(grids(token_index, head)):
        fig.add_trace(go.Heatmap(z=z, x0=width / w / 2, dx=width / w, y0=height / h / 2, dy=height / h,
                                 zsmooth="best", colorscale=_COLORSCALE, opacity=opacity, visible=k == 0,
                                 colorbar={"title": "share"}, hovertemplate="share %{z:.4f}<extra></extra>"))
    n = len(layer_views)
    if n > 1:
        steps = [{"method": "update", "label": label,
                  "args": [{"visible": [True] * offset + [j == k for j in range(n)]}]}
                 for k, (label, _) in enumerate(layer_views)]
        fig.update_layout(sliders=[{"active": 0, "steps": steps, "currentvalue": {"prefix": "view: "}}])
    buttons = []
    for t in tokens:
        for hd in heads:
            buttons.append({"method": "restyle", "label": f"token {t} {trace.answer_tokens[t]!r}, head {hd}",
                            "args": [{"z": grids(t, hd)}, list(range(offset, offset + n))]})
    if len(buttons) > 1:
        active = next((i for i, b in enumerate(buttons) if b["label"].startswith(f"token {token_index} ")
                       and b["label"].endswith(f"head {head}")), 0)
        fig.update_layout(updatemenus=[{"buttons": buttons, "active": active, "x": 0, "y": 1.12,
                                        "xanchor": "left"}])
    answer_token = trace.answer_tokens[token] if trace.answer_positions else ""
    fig.update_layout(title=title or f"{method}: answer token {answer_token!r}, head {head}",
                      yaxis={"autorange": "reversed", "scaleanchor": "x", "visible": False, "range": [height, 0]},
                      xaxis={"visible": False, "range": [0, width]}, margin={"l": 10, "r": 10, "t": 90, "b": 10})
    return fig


def modality_share_figure(trace: AttentionTrace, token: int | None = None, head: int | str = "mean"):
    """Plotly stacked bars: per layer, the share of the answer's attention on image vs text tokens."""
    import plotly.graph_objects as go

    reason = available_views(trace).figures.get("modality share")
    if reason:
        return note_figure(reason, "Where the answer's attention goes, per layer")
    rows = modality_share(trace, token, head)
    layers = [r["layer"] for r in rows]
    fig = go.Figure([go.Bar(x=layers, y=[r["image"] for r in rows], name="image tokens"),
                     go.Bar(x=layers, y=[r["text"] for r in rows], name="text tokens")])
    fig.update_layout(barmode="stack", title="Where the answer's attention goes, per layer",
                      xaxis_title="layer", yaxis_title="share of attention", yaxis_range=[0, 1])
    return fig


def prompt_attention_figure(trace: AttentionTrace, token: int = -1, method: str = "attention",
                            head: int | str = "mean", layers: Sequence[int] | None = None):
    """Plotly bars over the prompt positions (visual tokens grouped into one bar per image)."""
    import plotly.graph_objects as go

    labels, values = [], []
    for label, share in prompt_attention(trace, token, method, head, layers):
        if label.startswith("<image ") and labels and labels[-1] == label.split(":")[0] + ">":
            values[-1] += share
            continue
        labels.append(label.split(":")[0] + ">" if label.startswith("<image ") else label)
        values.append(share)
    fig = go.Figure(go.Bar(x=list(range(len(labels))), y=values, text=labels, hovertext=labels))
    fig.update_layout(title="Which prompt positions the answer token drew on", yaxis_title="share",
                      xaxis={"tickvals": list(range(len(labels))), "ticktext": labels, "tickangle": -60})
    return fig


def note_figure(text: str, title: str = ""):
    """A figure that says, in words, why a view does not apply: an empty panel, never an error."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=_wrap(text), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14}, align="center")
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, height=260,
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "<br>".join(textwrap.wrap(text, width))


def logit_lens_figure(lens, layer: int = -1, title: str | None = None):
    """Plotly figure of the logit lens: each visual token labelled with its top word at a layer, coloured by that
    word's probability, over the image's patch grid when the tokens keep it (else a row of queries/prompts);
    hover shows the top-k words; a slider moves through the layers (the chosen one first)."""
    import plotly.graph_objects as go

    start = lens.layer_index(layer)
    grid_tokens = [t for t in range(len(lens.token_labels)) if t not in lens.summary]
    rows, cols = lens.layout if lens.layout else (1, len(lens.token_labels))
    order = grid_tokens if lens.layout else list(range(len(lens.token_labels)))
    picture = lens.image if lens.layout else None
    width, height = picture.size if picture is not None else (cols * 80, rows * 80)

    def cells(i: int, values):
        return [[values(i, order[r * cols + c]) for c in range(cols)] for r in range(rows)]

    def hover(i: int, t: int) -> str:
        top = ", ".join(f"{w!r} {p:.2f}" for w, p in zip(lens.words[i][t], lens.probs[i, t].tolist()))
        return f"{lens.token_labels[t]}: {top}"

    fig = go.Figure()
    if picture is not None:
        fig.add_trace(go.Image(z=np.asarray(picture.convert("RGB")), hoverinfo="skip"))
    offset = len(fig.data)
    for i in range(len(lens.layer_names)):
        fig.add_trace(go.Heatmap(
            z=cells(i, lambda i, t: float(lens.probs[i, t, 0])), zmin=0, zmax=1,
            text=cells(i, lambda i, t: lens.words[i][t][0].strip() or repr(lens.words[i][t][0])),
            customdata=cells(i, hover), texttemplate="%{text}", textfont={"size": 14},
            hovertemplate="%{customdata}<extra></extra>", colorscale=_COLORSCALE,
            opacity=0.6 if picture is not None else 1.0, visible=i == start, colorbar={"title": "top-1 p"},
            x0=width / cols / 2, dx=width / cols, y0=height / rows / 2, dy=height / rows))
    n = len(lens.layer_names)
    steps = [{"method": "update", "label": name,
              "args": [{"visible": [True] * offset + [j == k for j in range(n)]}]}
             for k, name in enumerate(lens.layer_names)]
    fig.update_layout(sliders=[{"active": start, "steps": steps, "currentvalue": {"prefix": "read at: "}}])
    summary = "" if not lens.summary else " · outside the grid: " + "; ".join(
        hover(start, t) for t in lens.summary)
    fig.update_layout(title=title or f"Logit lens: {lens.reads}{summary}",
                      yaxis={"autorange": "reversed", "scaleanchor": "x", "visible": False, "range": [height, 0]},
                      xaxis={"visible": False, "range": [0, width]}, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return fig
