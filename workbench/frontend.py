"""What the front ends show, computed here once: the Gradio app and the notebooks call these functions and hold
no model logic of their own (the command line uses them too).

- `catalog`: what can be picked (registries with metadata), integrators costed for a given encoder + LLM.
- `describe_model` / `describe_config`: parameter table, visual tokens, memory estimate against the device, a
  diagram and the architecture facts `diagrams.architecture_figure` draws (`describe_config` builds on the meta
  device: no weights loaded).
- `preview_data`: a few samples of a dataset and its bad-row report.
- `evaluation_data` / `evaluate_with_baseline`: any data kind scored with its task's metric, beside the text-only
  baseline (tables and bars: `evaluation_figures`).
- `run_rows` / `run_progress` / `curves_figure`: the runs list, one run's live progress, loss/lr/eval curves.
- `ModelCache`: the model a front end is chatting with or explaining, loaded once.
- `watch_runs`: start queued background runs as slots free and report their progress until they end.
- `run_summary` / `evaluate_runs` / `comparison_figure`: several finished runs side by side (accuracy by
  question type, trainable parameters, time, memory), for the paradigm and integrator comparisons.
- `export_model`: a run's trained model out of the workbench (zip by default; hf-llava, merged), via export.py.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

KINDS = ("encoders", "integrators", "llms", "peft", "paradigms", "data")


def catalog(kinds: tuple[str, ...] | list[str] = KINDS, model=None) -> dict[str, list[dict]]:
    """Registries with their metadata. With `model`, integrators are costed for its encoder + LLM."""
    from .data import DATASETS
    from .encoders import ENCODERS
    from .integrators import integrator_catalog
    from .llm import LLMS
    from .paradigms import PARADIGMS
    from .peft_modules import METHODS

    out: dict[str, list[dict]] = {}
    for kind in kinds:
        if kind == "integrators":
            out[kind] = integrator_catalog(model.integrator.context if model is not None else None)
        elif kind == "peft":
            out[kind] = [{"name": m} for m in METHODS]
        elif kind in ("encoders", "llms", "paradigms", "data"):
            registry = {"encoders": ENCODERS, "llms": LLMS, "paradigms": PARADIGMS, "data": DATASETS}[kind]
            out[kind] = [{"name": e.name, **{k: v for k, v in e.info.items()
                                             if isinstance(v, (str, int, float, bool, list))}}
                         for e in registry.entries()]
        else:
            raise ConfigError(f"Unknown component kind '{kind}'. Valid kinds: {', '.join(KINDS)}")
    return out


def model_diagram(model) -> str:
    """One line per stage of the flow, with the shapes that pass between them."""
    c = model.config
    h, w = model.encoder.grid
    tokens = model.num_visual_tokens
    placement = getattr(model.integrator, "placement", "prefix")
    peft = f" + {c.peft.method} modules" if c.peft.method != "none" else ""
    inside = " (modules inside the LLM's layers)" if placement == "in_llm" else ""
    return "\n".join([
        f"image ({model.encoder.image_size}×{model.encoder.image_size}, {c.encoder.image_aspect})",
        f"  └─► encoder {c.encoder.name}{' (frozen)' if model.encoder.frozen else ''}: "
        f"{h}×{w} grid × {model.encoder.feature_dim} features",
        f"       └─► integrator {c.integrator.name}{inside}: {tokens} visual token(s) per image "
        f"× {model.llm.get_input_embeddings().embedding_dim}",
        f"            └─► LLM {c.llm.name}{peft}: {model.llm.config.num_hidden_layers} layers → text",
    ])


def describe_model(model, batch_size: int = 16, seq_len: int = 128, precision: str = "no",
                   device=None, stages=None) -> dict[str, Any]:
    """Everything the Build view shows about a model: parameters per component, tokens, memory, diagram (as
    text, and as `architecture` facts that `diagrams.architecture_figure` draws).

    `device`: where it would train (default: where it is; for a model on the meta device, the device its
    config names). `stages`: a run's stages, so the drawing shows what each one trains."""
    from .diagrams import architecture
    from .training.memory import estimate_training_memory

    memory = estimate_training_memory(model, batch_size, seq_len, precision, device=device)
    return {"parameters": model.parameter_report(), "visual_tokens": model.num_visual_tokens,
            "grid": list(model.encoder.grid), "device": memory.device, "dtype": str(model.dtype),
            "memory": {**memory.as_dict(), "explanation": memory.explain()}, "diagram": model_diagram(model),
            "architecture": architecture(model, stages)}


def describe_config(config, batch_size: int = 16, seq_len: int = 128, precision: str = "auto") -> dict[str, Any]:
    """`describe_model` for a config without loading it: the model is built on the meta device (shapes and
    dtypes, no weights read, no memory taken), so the Build view can be clicked freely while runs hold the
    GPU. The memory estimate is against the device the config would train on, in the precision a run
    there would use (`precision` as training.precision: auto, fp32, bf16, fp16). `config`: a ModelConfig, or a
    RunConfig (its model, and its paradigm's stages in the architecture)."""
    from .llm import target_device, training_precision
    from .model import VisionLanguageModel

    stages = None
    if hasattr(config, "paradigm"):  # a run: its model, trained by its stages
        from .paradigms import resolve_stages

        stages, config = resolve_stages(config), config.model
    model = VisionLanguageModel.from_config(config, device="meta")
    try:
        return describe_model(model, batch_size, seq_len, training_precision(precision, target_device(config.llm)),
                              stages=stages)
    finally:
        del model
        release_memory()


def release_memory() -> None:
    """Give back what dropped models held (garbage collection, then the CUDA allocator's cache)."""
    from .llm import release_gpu_memory

    release_gpu_memory()


def preview_data(kind: str, options: dict | None = None, n: int = 4, seed: int = 0) -> dict[str, Any]:
    """`n` samples of a dataset (image paths, conversation) with its counts and skipped-row report."""
    from .data.loaders import load_dataset_spec

    data = load_dataset_spec(kind, **(options or {}))
    report = getattr(data, "report", None)
    picked = data.subset(n, seed=seed) if len(data) > n else data
    samples = [{"images": [str(im) if isinstance(im, (str, Path)) else im for im in s.images],
                "messages": s.messages} for s in picked]
    return {"count": len(data), "samples": samples,
            "report": report.as_dict() if report is not None else {}, "summary": report.summary() if report else ""}


def evaluation_data(kind: str, options: dict | None = None):
    """A dataset of any registered kind, loaded for evaluation: refused in one line when it holds no usable
    question (a wrong folder, every row bad), before any model is loaded."""
    from .data.loaders import load_dataset_spec

    if not isinstance(options, dict):
        raise ConfigError(f"Loader options must be a JSON object, e.g. {{\"split\": \"test\"}}; got {options!r}")
    data = load_dataset_spec(kind, **options)
    if len(data) == 0:
        report = getattr(data, "report", None)
        raise ConfigError(f"The {kind} data has no usable samples" + (f" ({report.summary()})" if report else ""))
    return data


def evaluate_with_baseline(model, data, limit: int | None = None, baseline="same") -> tuple[dict, dict | None]:
    """`evaluation.evaluate` on `data`, and the same questions asked without their images of `baseline`: "same"
    (this model), another model (a text-only run's), a function returning one (called only after the first
    evaluation, so a small machine holds one model at a time), or None (no baseline). The gap between the two
    scores is what the image adds."""
    from .evaluation import evaluate

    result = evaluate(model, data, limit=limit)
    if baseline is None:
        return result, None
    if isinstance(baseline, str) and baseline == "same":
        baseline = model
    del model
    from torch import nn

    if callable(baseline) and not isinstance(baseline, nn.Module):  # a model is callable too
        baseline = baseline()
    return result, evaluate(baseline, data, result["task"], limit=limit, text_only=True)


def run_config(model, data, paradigm: str, name: str = "", batch_size: int = 16, lr: float | None = None,
               epochs: float | None = 1.0, max_minutes: float | None = None, eval_every: int = 0, text_only: bool = False,
               eval_data=None, stages=None):
    """A validated RunConfig from the choices a front end offers, applied to the paradigm's recipe (or to
    `stages`, e.g. an example config's own).

    `lr` is the first stage's integrator learning rate; later stages keep their ratio to it (two-stage's
    instruct stage runs 5x lower than its alignment stage), and LLM learning rates stay the recipe's. None keeps
    the recipe's rates, as `epochs=None` keeps its epochs. `max_minutes` is spread over the stages
    (`paradigms.spread_budget`).
    """
    from .config import RunConfig, TrainingSpec
    from .paradigms import resolve_stages, spread_budget

    run = RunConfig(name=name or f"{paradigm}-{model.integrator.name}", model=model, paradigm=paradigm, data=data,
                    eval_data=eval_data, text_only=bool(text_only), stages=list(stages or []),
                    training=TrainingSpec(batch_size=int(batch_size), eval_every=int(eval_every)))
    stages = resolve_stages(run)
    scale = float(lr) / stages[0].lr if lr and stages[0].lr else 1.0
    for s in stages:
        s.lr = s.lr * scale
        if epochs is not None:
            s.epochs = float(epochs)
        if not max_minutes:
            s.max_minutes = None
    if max_minutes:
        spread_budget(stages, float(max_minutes))
    run.stages = stages
    return run.validate()


def run_rows(registry) -> list[dict[str, Any]]:
    """The runs list: status (true even for dead processes), paradigm, components, best metric, trainable %."""
    from .training.metrics import read_metrics

    rows = []
    for r in registry.list():
        run_dir = registry.run_dir(r["id"])
        metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        evals = [m["accuracy"] for m in metrics if m["kind"] == "eval" and "accuracy" in m]
        stages = [m for m in metrics if m["kind"] == "stage"]
        try:
            model = registry.config(r["id"]).model
            parts = (model.encoder.name, model.integrator.name, model.llm.name, model.peft.method)
        except Exception:  # noqa: BLE001 -- a run whose config can no longer be read still lists
            parts = ("?", "?", "?", "?")
        trainable, trainable_pct = _trainable(stages)
        rows.append({"id": r["id"], "name": r["name"], "status": r["status"], "reason": r.get("reason") or "",
                     "paradigm": r["paradigm"], "encoder": parts[0], "integrator": parts[1], "llm": parts[2],
                     "peft": parts[3], "best_accuracy": max(evals) if evals else None,
                     "trainable_params": trainable, "trainable_pct": trainable_pct,
                     "created": r["created"]})
    return rows


def _trainable(stages: list[dict]) -> tuple[int | None, float | None]:
    """(trainable parameters, % of all) of a run's largest stage, from its `stage` log rows: two-stage runs
    train the integrator, then the whole LLM, and the larger is what the run costs."""
    counted = [s for s in stages if s.get("trainable_params")]
    if not counted:
        return None, None
    top = max(counted, key=lambda s: s["trainable_params"])
    total = top.get("total_params")
    return top["trainable_params"], 100.0 * top["trainable_params"] / total if total else None


def run_progress(registry, run_id: str, log_lines: int = 20) -> dict[str, Any]:
    """One run's live state for a progress view: stage, step, fraction done, ETA, last metrics, log tail."""
    from .training.metrics import read_metrics

    row = registry.get(run_id)
    path = registry.run_dir(run_id) / "metrics.jsonl"
    metrics = read_metrics(path) if path.is_file() else []
    stages = [m for m in metrics if m["kind"] == "stage"]
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    last = train[-1] if train else {}
    fraction = eta = None
    if last and stages:
        from .paradigms import resolve_stages

        n_stages = max(1, len(stages), len(resolve_stages(registry.config(run_id))))
        done_stages = len(stages) - 1
        within = last.get("batch", 0) / max(1, last.get("batches", 1))
        fraction = min(1.0, (done_stages + within) / n_stages)
        elapsed = last["time"] - stages[0]["time"]
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
    if row["status"] == "completed":
        fraction, eta = 1.0, 0.0
    return {"id": run_id, "status": row["status"], "reason": row.get("reason") or "",
            "stage": stages[-1]["name"] if stages else None, "step": last.get("step"), "fraction": fraction,
            "eta_s": eta, "loss": last.get("loss"), "lr": last.get("lr"), "samples_per_s": last.get("samples_per_s"),
            "memory_mb": last.get("memory_mb"),
            "evals": [{"step": e.get("step"), "metric": e.get("metric", "accuracy"),
                       "score": e.get("score", e.get("accuracy")), "accuracy": e.get("accuracy"),
                       "by_type": e.get("by_type")} for e in evals],
            "log": registry.log_tail(run_id, lines=log_lines), "history": registry.history(run_id)}


def history_text(history: list[dict]) -> str:
    """A run's states in order, for people: `created → running → died (killed by SIGKILL…) → queued (resumed)`."""
    return " → ".join(h["status"] + (f" ({h['reason']})" if h["reason"] else "") for h in history)


def format_eta(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def curves_figure(runs: dict[str, str | Path]):
    """Plotly figure of loss (and evaluation accuracy) against step for one or several runs, lr beneath."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .training.metrics import read_metrics

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06,
                        specs=[[{"secondary_y": True}], [{}]])
    for label, run_dir in runs.items():
        path = Path(run_dir) / "metrics.jsonl"
        metrics = read_metrics(path) if path.is_file() else []
        train = [m for m in metrics if m["kind"] == "train"]
        evals = [m for m in metrics if m["kind"] == "eval" and "accuracy" in m]  # caption scores are not fractions
        steps = [m["step"] for m in train]
        fig.add_trace(go.Scatter(x=steps, y=[m["loss"] for m in train], name=f"{label} loss", mode="lines"), 1, 1)
        if evals:
            fig.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e["accuracy"] for e in evals],
                                     name=f"{label} eval accuracy", mode="lines+markers"), 1, 1, secondary_y=True)
        fig.add_trace(go.Scatter(x=steps, y=[m["lr"] for m in train], name=f"{label} lr", mode="lines",
                                 line={"dash": "dot"}), 2, 1)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text="learning rate", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(height=480, margin={"l": 40, "r": 20, "t": 30, "b": 40}, legend={"orientation": "h"})
    return fig


class ModelCache:
    """The models a front end works with, loaded once per source ("default", a config, a run or a model folder).

    Loading SmolLM2 and an encoder takes seconds; chat and attention views reuse loaded models. Several runs stay
    loaded at once (a class chats with different runs), their frozen encoder and LLM held once
    (`model_pool.ModelPool`, within `memory_budget` bytes). `batcher` answers chat requests of every loaded
    model, batched per model; `lock` is held while it generates, so work that must not overlap generation on a
    CPU (attention views, evaluation, export) takes it too.
    """

    def __init__(self, registry=None, memory_budget: int | str | None = None, max_batch: int = 8,
                 max_queue: int = 64, batch_window: float = 0.05, dtype: str = "auto"):
        from .batching import GenerationBatcher
        from .model_pool import ModelPool

        self.registry = registry
        self.pool = ModelPool(memory_budget, dtype=dtype)
        self.lock = threading.RLock()
        self.batcher = GenerationBatcher(None, max_batch=max_batch, max_queue=max_queue, batch_window=batch_window,
                                         lock=self.lock)

    def model_dir(self, source: str) -> Path | None:
        """A run id, a run folder or a saved model folder → its saved model folder (None for "default")."""
        if source in ("", "default", None):
            return None
        path = Path(source)
        if not path.exists() and self.registry is not None:
            path = self.registry.run_dir(source)
        for candidate in (path / "model", path / "best", path):
            if (candidate / "config.yaml").is_file():
                return candidate
        from .training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(path) if path.is_dir() else None
        if ckpt is not None and (ckpt / "model" / "config.yaml").is_file():
            return ckpt / "model"  # a run still training: its latest checkpoint
        raise ConfigError(f"No saved model or checkpoint yet for '{source}'")

    def get(self, source: str = "default"):
        """The ready model for a source (loaded on first use; a run saved again since is reloaded)."""
        from .config import ModelConfig, load_model_config
        from .model import _resolve_inside

        folder = self.model_dir(source)
        if folder is None:
            return self.pool.get("default", ModelConfig())
        config = _resolve_inside(load_model_config(folder / "config.yaml"), folder)
        return self.pool.get(str(folder), config, folder, stamp=str((folder / "config.yaml").stat().st_mtime))

    def bounds(self) -> str:
        """What the app states about its limits: batching, queue and model memory."""
        return (f"Chat: {self.batcher.bounds()}. Models: kept loaded within {self.pool.budget / 2 ** 30:.1f} GiB "
                f"(runs sharing a frozen encoder and LLM hold them once); least recently used runs are dropped "
                f"first when over it; {self.dtype_text()}.")

    def dtype_text(self) -> str:
        from .llm import serving_dtype

        answered = serving_dtype("auto", "cpu", self.pool.dtype)
        if self.pool.dtype == "auto":
            where = "bfloat16 on this CPU (native bf16)" if answered == "bfloat16" else "float32 on this CPU"
            return f"models answer in {where}, or in bf16/fp16 on a GPU, unless a run's config names its dtype"
        return f"models answer in {self.pool.dtype}"


# ---------------------------------------------------------------- several runs: watch, summarise, compare, export
# Added for the course notebooks (paradigms and integrators compared, bring your own data): they launch several
# background runs and compare them, and should not each grow their own scheduling loop or table code.

def watch_runs(registry, run_ids: list[str], parallel: int = 1, timeout: float | None = None, poll: float = 2.0,
               on_update=None) -> list[dict[str, Any]]:
    """Start waiting runs ("created") as slots free, at most `parallel` training at once, and pass every run's
    `run_progress` to `on_update` each `poll` seconds until all have ended, `timeout` seconds pass or the user
    interrupts (Ctrl-C / the notebook's stop button). The runs train in their own processes either way: watching
    stops, training does not; call again to go on watching (and starting the rest). One run at a time finishes a
    set soonest on a small CPU (runs in parallel share its cores and their time budgets are wall-clock)."""
    from .jobs import ACTIVE

    if parallel < 1:
        raise ConfigError(f"parallel must be at least 1, got {parallel}")
    deadline = None if timeout is None else time.time() + timeout
    progress: list[dict[str, Any]] = []
    try:
        while True:
            rows = [registry.get(run_id) for run_id in run_ids]
            active = sum(r["status"] in ACTIVE for r in rows)
            for r in rows:
                if active >= parallel:
                    break
                if r["status"] == "created":
                    registry.start(r["id"])
                    active += 1
            progress = [run_progress(registry, run_id, log_lines=3) for run_id in run_ids]
            if on_update is not None:
                on_update(progress)
            if all(p["status"] not in (*ACTIVE, "created") for p in progress):
                return progress
            if deadline is not None and time.time() >= deadline:
                return progress
            time.sleep(poll)
    except KeyboardInterrupt:  # stop watching; the runs go on
        return progress


def run_summary(registry, run_id: str) -> dict[str, Any]:
    """What a comparison shows about one run, from its registry row and metrics log: wall time from launch to
    finish (process start and model loading included), training time (first stage to the end), optimizer steps,
    the largest trainable parameter count of its stages, and the training process's peak memory."""
    from .training.metrics import read_metrics

    row = registry.get(run_id)
    config = registry.config(run_id)
    metrics = read_metrics(registry.run_dir(run_id) / "metrics.jsonl")
    stages = [m for m in metrics if m["kind"] == "stage"]
    train = [m for m in metrics if m["kind"] == "train"]
    ends = [m for m in metrics if m["kind"] == "end"]
    steps = max([m["step"] for m in metrics if isinstance(m.get("step"), int)] or [0])
    return {"id": run_id, "name": row["name"], "status": row["status"], "reason": row.get("reason") or "",
            "paradigm": row["paradigm"], "integrator": config.model.integrator.name, "peft": config.model.peft.method,
            "text_only": config.text_only, "stages": len(stages), "steps": steps,
            **dict(zip(("trainable_params", "trainable_pct"), _trainable(stages))),
            "wall_s": row["finished"] - row["started"] if row.get("finished") and row.get("started") else None,
            "train_s": ends[-1]["time"] - stages[0]["time"] if ends and stages else None,
            "peak_mb": max([m.get("memory_mb") or 0.0 for m in train] or [0.0]) or None}


def evaluate_runs(registry, run_ids: list[str], data, batch_size: int = 32, max_new_tokens: int | None = None,
                  task: str | None = None) -> list[dict]:
    """Each finished run's saved model asked the same questions (`data`, a dataset) with `evaluation.evaluate`:
    its `run_summary` plus the task's score (`accuracy` for questions) overall and by question type, total
    parameters, trainable % and visual tokens per image. A text-only run is asked without the images, as it was
    trained. Runs that did not complete get no score."""
    from .evaluation import evaluate

    rows = []
    for run_id in run_ids:
        summary = run_summary(registry, run_id)
        model_dir = registry.run_dir(run_id) / "model"
        if summary["status"] != "completed" or not (model_dir / "config.yaml").is_file():
            rows.append({**summary, "accuracy": None, "score": None, "by_type": {}})
            continue
        result = evaluate(model_dir, data, task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          text_only=summary["text_only"], precision="auto")
        pct = summary["trainable_pct"]  # runs logged before total_params was: from the saved model's size
        if pct is None and summary["trainable_params"] and result["total_params"]:
            pct = 100.0 * summary["trainable_params"] / result["total_params"]
        rows.append({**summary, **{k: result[k] for k in ("task", "metric", "score", "by_type", "count", "examples",
                                                          "total_params", "visual_tokens")},
                     "accuracy": result.get("accuracy"), "eval_s": result["seconds"], "trainable_pct": pct})
        release_memory()
    return rows


def comparison_figure(rows: list[dict], label: str = "name", title: str = "Accuracy by question type"):
    """Grouped bars: accuracy overall and per question type, one group per question type, one bar per run."""
    import plotly.graph_objects as go

    types = sorted({t for r in rows for t in r.get("by_type", {})})
    fig = go.Figure()
    for r in rows:
        if r.get("accuracy") is None:
            continue
        values = [r["accuracy"]] + [r["by_type"].get(t) for t in types]
        fig.add_trace(go.Bar(name=str(r[label]), x=["overall", *types], y=values,
                             text=[f"{100 * v:.0f}%" if v is not None else "" for v in values], textposition="outside"))
    fig.update_layout(barmode="group", title=title, yaxis={"title": "accuracy", "range": [0, 1.1]}, height=420,
                      margin={"l": 40, "r": 20, "t": 50, "b": 40}, legend={"orientation": "h"})
    return fig


def export_model(registry, run_id: str, format: str = "workbench", out: str | Path | None = None,
                 zip: bool | None = None, **options) -> Path:
    """A run's trained model out of the workbench, through `workbench.export.export` (the one way to export; see
    there for the formats, each with a model card). The default keeps what this function always did: the run's
    `model/` folder as one zip file inside the run folder (`export/<run id>-model.zip`, holding `model/`); unzip it
    anywhere and `VisionLanguageModel.from_pretrained(folder)` loads it. `format="hf-llava"` or `"merged"` write a
    directory (default `export/<format>` in the run folder). An earlier export at the same place is replaced."""
    from .export import export

    run_dir = registry.run_dir(run_id)
    model_dir = run_dir / "model"
    if not (model_dir / "config.yaml").is_file():
        raise ConfigError(f"Run {run_id} has no saved model yet (no {model_dir / 'config.yaml'}): wait until it ends")
    if zip is None:
        zip = format == "workbench"
    if out is None and format == "workbench":
        out = run_dir / "export" / (f"{run_id}-model.zip" if zip else f"{run_id}-model")
    return export(run_dir, format, out, registry=registry, zip=zip, overwrite=True, **options).path
