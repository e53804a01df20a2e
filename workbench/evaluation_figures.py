"""Evaluation results for people: scores as percentages (accuracy) or in their own unit (BLEU-4, CIDEr-D), a
table of each question type beside the text-only baseline, and the same as grouped bars.

They take what `evaluation.evaluate` returns (and the trainer logs), so the app, the notebooks and the Train
tab's history read the same numbers the same way.
"""
from __future__ import annotations

import math
from typing import Any

METRIC_NAMES = {"accuracy": "accuracy", "cider": "CIDEr-D", "bleu4": "BLEU-4"}
"""How each metric is named on screen."""
PERCENT = ("accuracy",)
"""Metrics that are fractions of questions, shown as percentages; the caption metrics are not."""
MODEL_COLOR, BASELINE_COLOR = "#f28e2b", "#9e9e9e"


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def format_score(value: float | None, metric: str = "accuracy") -> str:
    """`97.5%` for accuracy, `0.412` for BLEU-4 or CIDEr-D; `—` for a missing score."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}%" if metric in PERCENT else f"{value:.3f}"


def by_type_text(by_type: dict[str, float] | None, metric: str = "accuracy") -> str:
    """Per question type in one line: `color 97.5% · shape 88.0%` (empty when the data has no types)."""
    return " · ".join(f"{k} {format_score(v, metric)}" for k, v in sorted((by_type or {}).items()))


def _headline(result: dict) -> list[tuple[str, str]]:
    """(row label, metric) of the overall rows: accuracy, or both caption metrics (CIDEr-D selects models)."""
    if result.get("task") == "captions":
        return [(f"all ({metric_name('cider')})", "cider"), (f"all ({metric_name('bleu4')})", "bleu4")]
    return [("overall", result.get("metric", "accuracy"))]


def score_table(result: dict, reference: dict | None = None) -> dict[str, Any]:
    """The rows of an evaluation beside its baseline, formatted: `{"headers": [...], "data": [[...]]}` (what a
    Gradio Dataframe takes). Overall first, then each question type in the headline metric."""
    metric = result.get("metric", "accuracy")
    rows = [(label, result.get(m), None if reference is None else reference.get(m), m)
            for label, m in _headline(result)]
    types = sorted(set(result.get("by_type") or {}) | set((reference or {}).get("by_type") or {}))
    rows += [(t, (result.get("by_type") or {}).get(t), None if reference is None else (reference.get("by_type") or {}).get(t),
              metric) for t in types]
    data = [[label, format_score(value, m), "" if reference is None else format_score(base, m)]
            for label, value, base, m in rows]
    kind = "question type" if result.get("task") != "captions" else "caption group"
    return {"headers": [kind, metric_name(metric), "text-only baseline"], "data": data}


def scores_figure(result: dict, reference: dict | None = None, title: str | None = None,
                  model_label: str = "with the image", baseline_label: str = "text-only baseline"):
    """Grouped bars of the headline metric, overall and per question type: the model beside its baseline, so
    what the image adds is the gap between the two bars. Accuracy is drawn in percent."""
    import plotly.graph_objects as go

    metric = result.get("metric", "accuracy")
    percent = metric in PERCENT
    types = sorted(result.get("by_type") or {})
    labels = ["overall", *types]

    def values(r):
        return [r.get(metric)] + [(r.get("by_type") or {}).get(t) for t in types]

    fig = go.Figure()
    for name, r, color in ((model_label, result, MODEL_COLOR), (baseline_label, reference, BASELINE_COLOR)):
        if r is None:
            continue
        ys = values(r)
        fig.add_trace(go.Bar(name=name, x=labels, marker_color=color,
                             y=[None if v is None else (100 * v if percent else v) for v in ys],
                             text=[format_score(v, metric) for v in ys], textposition="outside"))
    top = max([v for tr in fig.data for v in tr.y if v is not None] or [1.0])
    fig.update_layout(barmode="group", height=380, margin={"l": 50, "r": 20, "t": 50, "b": 40},
                      title=title or f"{metric_name(metric)} by question type" + (
                          " beside the text-only baseline" if reference is not None else ""),
                      yaxis={"title": f"{metric_name(metric)}{' (%)' if percent else ''}",
                             "range": [0, 110 if percent else 1.2 * top]}, legend={"orientation": "h"})
    return fig
