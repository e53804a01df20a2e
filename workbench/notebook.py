"""Live views for Jupyter: the course notebooks watch background runs through these (one copy, not one per notebook).

Plotly figures displayed the usual way cannot be replaced through a display handle (each refresh would add a
new figure), so the curves go out as plain plotly display data, which a handle does replace in place.
"""
from __future__ import annotations

from typing import Any

from . import frontend


def figure_data(fig) -> dict:
    """A plotly figure as raw display data (`display(..., raw=True)`), replaceable in place through a handle."""
    import plotly.io as pio

    return pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())


def progress_markdown(progress: list[dict[str, Any]], labels: dict[str, str] | None = None) -> str:
    """A markdown status table of `frontend.run_progress` rows: run, status, stage, step, loss, done, ETA."""
    labels = labels or {}
    lines = ["| run | status | stage | step | loss | done | ETA |", "|---|---|---|---|---|---|---|"]
    for p in progress:
        done = "" if p.get("fraction") is None else f"{100 * p['fraction']:.0f}%"
        loss = "" if p.get("loss") is None else f"{p['loss']:.3f}"
        eta = frontend.format_eta(p.get("eta_s")) if p.get("status") == "running" else ""
        lines.append(f"| {labels.get(p['id'], p['id'])} | {p.get('status', '')} {p.get('reason') or ''} "
                     f"| {p.get('stage') or ''} | {p.get('step') or ''} | {loss} | {done} | {eta} |")
    return "\n".join(lines)


def watch_live(registry, run_ids: list[str], labels: dict[str, str] | None = None, parallel: int = 1,
               timeout_minutes: float = 60.0, poll: float = 3.0) -> list[dict[str, Any]]:
    """Start the queued runs (`parallel` at a time) and show live curves plus a status table, refreshed in place,
    until they end or the timeout. Interrupting the cell stops the watching, never the runs; call it again to
    go on watching (and to start runs still waiting). Returns the last progress rows."""
    from IPython.display import Markdown, display

    labels = labels or {}
    figure = display(figure_data(frontend.curves_figure({})), raw=True, display_id=True)
    status = display(Markdown("starting…"), display_id=True)
    seen: dict[str, Any] = {}

    def show(progress):
        status.update(Markdown(progress_markdown(progress, labels)))
        key = [(p["id"], p.get("step"), p.get("status")) for p in progress]
        if key != seen.get("key"):  # redraw the curves only when a run logged something new
            seen["key"] = key
            runs = {labels.get(i, i): registry.run_dir(i) for i in run_ids}
            figure.update(figure_data(frontend.curves_figure(runs)), raw=True)

    return frontend.watch_runs(registry, run_ids, parallel=parallel, timeout=timeout_minutes * 60, poll=poll,
                               on_update=show)
