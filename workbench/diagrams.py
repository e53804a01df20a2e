"""The architecture as a picture: image → encoder → integrator → LLM, with the token counts that pass between
them, trainable parts highlighted and frozen ones grey, and modules that live inside the LLM (gated
cross-attention, LLaMA-Adapter, LaVIN, PEFT) drawn in the LLM's layer stack at the layers where they sit.

Two steps, so a front end can build the model on the meta device, read it and let it go before drawing:
`architecture(model, stages)` reads the facts (plain data), `architecture_figure(facts)` draws them (plotly).
"""
from __future__ import annotations

from typing import Any

TRAINABLE = "#f28e2b"
FROZEN = "#d3d3d3"
INPUT = "#ffffff"
INTEGRATOR_EDGE = "#1f4e9c"
PEFT_EDGE = "#7b3294"
PARTS = ("encoder", "integrator", "llm", "peft")


def architecture(model, stages=None) -> dict[str, Any]:
    """What the diagram shows, read from a (meta-device or real) model: sizes, token counts, the LLM layers
    that hold integrator or PEFT modules, and what trains. With `stages` (a run's resolved StageSpecs), a part
    trains if some stage trains it, and each part names those stages; without, `requires_grad` decides."""
    from .peft_modules import peft_layers, virtual_tokens

    report = {r["component"]: r for r in model.parameter_report()}
    llm_config = model.llm.config.get_text_config() if hasattr(model.llm.config, "get_text_config") \
        else model.llm.config
    context = model.integrator.context
    parts: dict[str, dict[str, Any]] = {
        "encoder": {"name": model.config.encoder.name, "grid": list(context.grid), "tokens": context.num_input_tokens,
                    "has_cls": bool(context.has_cls), "features": context.vision_dim},
        "integrator": {"name": model.config.integrator.name,
                       "placement": getattr(model.integrator, "placement", "prefix"),
                       "tokens": model.num_visual_tokens, "width": context.llm_hidden,
                       "layers": model.integrator.llm_layers(), "entry_layer": getattr(model, "entry_layer", 0)},
        "llm": {"name": model.config.llm.name, "layers": int(llm_config.num_hidden_layers),
                "width": context.llm_hidden},
    }
    if model.config.peft.method != "none":
        parts["peft"] = {"name": model.config.peft.method, "layers": peft_layers(model.llm),
                         "virtual_tokens": virtual_tokens(model.llm)}
    for name, part in parts.items():
        row = report.get(name, {"total": 0, "trainable": 0})
        part.update(params=row["total"], trainable=row["trainable"] > 0, stages=[])
    if stages:
        for part in parts.values():
            part["trainable"] = False
        for stage in stages:
            trains = {"encoder": stage.train_encoder, "integrator": stage.train_integrator,
                      "llm": stage.llm == "full", "peft": stage.llm == "peft"}
            for name, part in parts.items():
                if trains[name]:
                    part["trainable"] = True
                    part["stages"].append(stage.name)
    return {"image_size": int(model.encoder.image_size), "parts": parts,
            "stages": [{"name": s.name, "trains": [n for n in parts if s.name in parts[n]["stages"]]}
                       for s in stages or []]}


def architecture_figure(facts: dict[str, Any], title: str | None = None):
    """The facts of `architecture` drawn as boxes and arrows (plotly). Shapes and annotations carry names
    (`encoder`, `llm layer 3`, `integrator in layer 3`, `lora in layer 3`, `tokens integrator→llm`…) so tests
    and notebooks can find what was drawn."""
    import plotly.graph_objects as go

    parts = facts["parts"]
    enc, integ, llm, peft = parts["encoder"], parts["integrator"], parts["llm"], parts.get("peft")
    fig = go.Figure()
    low, high = 0.8, 3.2  # the row of boxes the image flows through
    mid = (low + high) / 2

    def box(name, x0, x1, y0, y1, fill, text=None, edge="#444444", width=1.0, dash=None):
        fig.add_shape(type="rect", name=name, x0=x0, x1=x1, y0=y0, y1=y1, fillcolor=fill, layer="below",
                      line={"color": edge, "width": width, **({"dash": dash} if dash else {})})
        if text:
            fig.add_annotation(name=name, x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False,
                               font={"size": 12})

    def arrow(name, x0, y0, x1, y1, label):
        fig.add_annotation(name=name, x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=3, arrowsize=1.2, arrowwidth=1.6, text="")
        fig.add_annotation(name=name, x=(x0 + x1) / 2, y=max(y0, y1) + 0.35, text=label, showarrow=False,
                           font={"size": 11})

    def fill(part):
        return TRAINABLE if part["trainable"] else FROZEN

    def state(part):
        if not part["trainable"]:
            return "frozen"
        return "trains in " + ", ".join(part["stages"]) if part["stages"] else "trainable"

    box("image", 0.1, 1.5, low, high, INPUT, f"<b>image</b><br>{facts['image_size']}×{facts['image_size']} px")
    box("encoder", 2.6, 4.4, low, high, fill(enc), f"<b>encoder</b><br>{_short(enc['name'])}<br>"
        f"{_count(enc['params'])} · {state(enc)}", width=3 if enc["trainable"] else 1)
    inside = integ["placement"] == "in_llm"
    box("integrator", 5.5, 7.3, low, high, fill(integ), f"<b>integrator</b><br>{_short(integ['name'])}<br>"
        f"{_count(integ['params'])} · {state(integ)}" + ("<br>(modules inside the LLM)" if inside else ""),
        edge=INTEGRATOR_EDGE if inside else "#444444", width=3 if integ["trainable"] else 1)
    h, w = enc["grid"]
    arrow("tokens image→encoder", 1.5, mid, 2.6, mid, f"3×{facts['image_size']}²")
    grid = f"{h}×{w}" + (" + CLS" if enc["has_cls"] else "")
    arrow("tokens encoder→integrator", 4.4, mid, 5.5, mid, f"{enc['tokens']} tokens ({grid})<br>× {enc['features']}")

    # the LLM: input embeddings at the bottom, its layers stacked above, text out at the top
    x0, x1, top = 8.6, 11.6, 9.0
    box("llm", x0 - 0.15, x1 + 0.15, low - 0.2, top + 0.2, "rgba(0,0,0,0)", edge="#444444")
    n = max(1, llm["layers"])
    stack_low, step = low + 0.7, (top - low - 0.7) / n
    entry = integ.get("entry_layer", 0)  # visual tokens entering above the embeddings (visual_entry.py)
    box("llm embeddings", x0, x1, low, low + 0.5, INPUT,
        "input embeddings: text tokens + image slots" if entry else "input embeddings: visual + text tokens")
    arrow("tokens integrator→llm", 7.3, mid, x0 - 0.15, stack_low + (entry + 0.4) * step if entry else low + 0.25,
          f"{integ['tokens']} visual token{'' if integ['tokens'] == 1 else 's'}<br>× {integ['width']}"
          + (f"<br>enter at layer {entry}" if entry else ""))
    in_llm, adapted = set(integ["layers"]), set(peft["layers"]) if peft else set()
    for i in range(n):
        y0, y1 = stack_low + i * step, stack_low + (i + 0.8) * step
        box(f"llm layer {i}", x0, x1, y0, y1, fill(llm), width=0.5)
        if i in in_llm:
            box(f"integrator in layer {i}", x0 + 0.05, x0 + 1.35, y0, y1, fill(integ), edge=INTEGRATOR_EDGE, width=2)
        if i in adapted:
            box(f"{peft['name']} in layer {i}", x1 - 1.35, x1 - 0.05, y0, y1, fill(peft), edge=PEFT_EDGE, width=2)
    for i in sorted({0, n - 1}):
        fig.add_annotation(name=f"llm layer {i} label", x=x0 - 0.2, y=stack_low + (i + 0.4) * step,
                           text=f"layer {i}", showarrow=False, xanchor="right", font={"size": 10})
    if in_llm:  # a bracket from the integrator box to the layers that hold its modules
        first, last = min(in_llm), max(in_llm)
        ya, yb = stack_low + first * step, stack_low + (last + 0.8) * step
        fig.add_shape(type="line", name="integrator bracket", x0=x0 - 0.05, x1=x0 - 0.05, y0=ya, y1=yb,
                      line={"color": INTEGRATOR_EDGE, "width": 3})
        fig.add_shape(type="line", name="integrator link", x0=6.4, y0=high, x1=x0 - 0.05, y1=(ya + yb) / 2,
                      line={"color": INTEGRATOR_EDGE, "width": 1.5, "dash": "dot"})
    arrow("tokens llm→text", x1 + 0.15, top - 0.4, x1 + 0.9, top - 0.4, "text")
    lines = [f"<b>LLM</b> {_short(llm['name'])} · {n} layers × {llm['width']} · {_count(llm['params'])} · {state(llm)}"]
    if inside:
        lines.append(f"{integ['name']} modules in {_layers(integ['layers'], n)}")
    if peft:
        where = _layers(peft["layers"], n) if peft["layers"] else f"{peft['virtual_tokens']} virtual tokens before layer 0"
        lines.append(f"{peft['name']} ({_count(peft['params'])} · {state(peft)}) in {where}")
    fig.add_annotation(name="llm title", x=(x0 + x1) / 2, y=top + 0.35, text="<br>".join(lines), showarrow=False,
                       yanchor="bottom", font={"size": 12})

    for name, color, edge in (("trainable", TRAINABLE, "#444444"), ("frozen", FROZEN, "#444444"),
                              *([(f"{integ['name']} modules", FROZEN, INTEGRATOR_EDGE)] if inside else []),
                              *([(f"{peft['name']} modules", FROZEN, PEFT_EDGE)] if peft and peft["layers"] else [])):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                 marker={"symbol": "square", "size": 14, "color": color,
                                         "line": {"color": edge, "width": 2}}))
    stages = "; ".join(f"{s['name']}: {' + '.join(s['trains']) or 'nothing'}" for s in facts.get("stages", []))
    fig.update_layout(title=title or ("How the parts connect" + (f" — stages {stages}" if stages else "")),
                      xaxis={"visible": False, "range": [0, 13]}, yaxis={"visible": False, "range": [0, 11.4]},
                      plot_bgcolor="white", height=520, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      legend={"orientation": "h", "y": -0.02})
    return fig


def _count(n: int) -> str:
    """A parameter count for people: 1.2B, 135M, 8.4k."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit} params"
    return f"{n} params"


def _short(name: str, width: int = 26) -> str:
    """Long names (a local LLM folder) keep their end, which is the part that tells them apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _layers(layers: list[int], total: int) -> str:
    if len(layers) == total:
        return f"all {total} layers"
    shown = ", ".join(map(str, layers[:8])) + (", …" if len(layers) > 8 else "")
    return f"layer{'s' if len(layers) != 1 else ''} {shown}"
