"""The VLLM Workbench in the browser: build a model, look at data, train in the background, watch, chat, look inside.

Layout and callbacks only: every number, model and figure comes from workbench's public API
(`workbench.frontend`, `workbench.jobs`, `workbench.chat`, `workbench.attention`, `workbench.evaluation`).
Training runs in its own process (the run registry), so closing the browser or restarting the app loses
nothing: the Runs and Train views re-attach to whatever is in the registry.

Run: .venv/bin/python -m workbench.app (or apps/workbench_app.py) [--host 127.0.0.1] [--port 7860] [--share] [--runs DIR]
Binds to 127.0.0.1. Anything that exposes it (another --host, --share) requires a username and password
(WORKBENCH_APP_AUTH="user:password", or --auth-file with one user:password line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import gradio as gr

from workbench import frontend
from workbench.data.prompting import SHORT_ANSWER_SYSTEM_PROMPT
from workbench.errors import WorkbenchError

REPO = Path(__file__).resolve().parent.parent

EXAMPLES = REPO / "examples" / "images"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_UPLOAD = "50mb"
WITHHELD = "same model, images withheld"
DEFAULT_DATA_OPTIONS = {"easy-vqa": {"split": "train"}, "emoji-captions": {},
                        "llava": {"json_path": "path/to/data.json", "image_folder": "path/to/images"},
                        "captions": {"folder_or_file": "path/to/folder"}, "image-table": {"csv_path": "path/to/questions.csv"},
                        "hf": {"name_or_path": "org/dataset", "split": "train"},
                        "task-captions": {"source": {"kind": "easy-vqa", "options": {"split": "train"}}}}
"""Starting points for the loader options box; the kinds themselves come from the data registry."""
EVAL_DATA_OPTIONS = {**{k: {o: v for o, v in opts.items() if o != "limit"} for k, opts in DEFAULT_DATA_OPTIONS.items()},
                     "easy-vqa": {"split": "test"}}
"""The same templates for the Evaluate tab: held-out questions, and its own question limit instead of the loader's."""
CUSTOM = "custom (from the Build tab)"
CHAT_MAX_BATCH = 16
"""Answers generated together by default (a class asking at once: one batch instead of a queue)."""
CHAT_MAX_QUEUE = 64


def _fail(e: Exception):
    """A readable message in the UI, never a stack trace."""
    if isinstance(e, gr.Error):
        raise e
    if isinstance(e, WorkbenchError):
        raise gr.Error(str(e).splitlines()[0]) from None
    raise gr.Error(f"Unexpected error ({type(e).__name__}): {str(e).splitlines()[0] if str(e) else ''}") from None


def _options(text: str | None, what: str = "Loader options") -> dict:
    """A JSON options box's text as a dict, or one readable line saying what is wrong with it."""
    try:
        options = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise gr.Error(f"{what} are not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(options, dict):
        raise gr.Error(f'{what} must be a JSON object, e.g. {{"split": "train"}}')
    return options


def _label(row: dict) -> str:
    offline = row.get("offline")
    return f"{row['name']}" + (" (offline)" if offline is True else " (needs hub)" if offline is False else "")


class Workbench:
    """The app's state: the run registry and the loaded model; every callback goes through here."""

    def __init__(self, runs_dir: str | Path | None = None):
        from workbench.jobs import RunRegistry

        self.registry = RunRegistry(runs_dir)
        # bounds from the command line (main sets them) or the environment: what the Chat tab and start-up state
        self.cache = frontend.ModelCache(self.registry, os.environ.get("WORKBENCH_MODEL_MEMORY") or None,
                                         max_batch=int(os.environ.get("WORKBENCH_CHAT_MAX_BATCH", CHAT_MAX_BATCH)),
                                         max_queue=int(os.environ.get("WORKBENCH_CHAT_MAX_QUEUE", CHAT_MAX_QUEUE)),
                                         batch_window=float(os.environ.get("WORKBENCH_CHAT_BATCH_WINDOW", 0.1)),
                                         dtype=os.environ.get("WORKBENCH_SERVE_DTYPE", "auto"))
        self.catalog = frontend.catalog()
        from workbench.forms import option_fields

        self.fields = option_fields()
        """One form field per declared integrator and PEFT option; the Build tab lays them out in this order."""

    # ------------------------------------------------------------------ build
    def model_config(self, encoder: str, integrator: str, llm: str, peft: str, *form_values):
        """The Build tab's choices as a ModelConfig; `form_values`: one per `self.fields` (the option forms)."""
        from workbench.config import EncoderSpec, IntegratorSpec, LLMSpec, ModelConfig
        from workbench.forms import read_form

        options, peft_spec = read_form(self.fields, list(form_values), integrator, peft)
        config = ModelConfig(encoder=EncoderSpec(name=encoder), integrator=IntegratorSpec(name=integrator, options=options),
                             llm=LLMSpec(name=llm), peft=peft_spec, system_prompt=SHORT_ANSWER_SYSTEM_PROMPT)
        return config.validate()

    def describe(self, batch_size, encoder, integrator, llm, peft, *form_values):
        """The drawn architecture, its text tree, the parameter table and a summary (built on the meta device)."""
        from workbench.diagrams import architecture_figure

        try:
            config = self.model_config(encoder, integrator, llm, peft, *form_values)
            info = frontend.describe_config(config, batch_size=int(batch_size))  # meta device: no weights, no GPU
        except Exception as e:  # noqa: BLE001
            _fail(e)
        table = [[r["component"], f"{r['total']:,}", f"{r['trainable']:,}", f"{r['trainable_pct']:.2f}",
                  f"{r['share_pct']:.1f}"] for r in info["parameters"]]
        memory = info["memory"]
        verdict = "fits" if memory["fits"] else "**will not fit**"
        entry = next((r for r in self.catalog["integrators"] if r["name"] == integrator), {})
        about = (f"**{integrator}** — {entry.get('family', '')}, follows {entry.get('follows', '')}; "
                 f"suits {', '.join(entry.get('paradigms', []))}. {entry.get('description', '')}")
        summary = (f"{about}\n\n**{info['visual_tokens']} visual tokens** per image on a {info['grid'][0]}×{info['grid'][1]} "
                   f"grid · {info['device']}, {info['dtype']}\n\nTraining memory (batch {int(batch_size)}): "
                   f"{memory['explanation']} — {verdict}.")
        return architecture_figure(info["architecture"]), info["diagram"], table, summary

    def save_config(self, encoder, integrator, llm, peft, *form_values):
        from workbench.config import save_model_config

        try:
            config = self.model_config(encoder, integrator, llm, peft, *form_values)
            path = self.registry.root / "configs" / f"{encoder}-{integrator}-{llm.replace('/', '_')}.yaml"
            return str(save_model_config(config, path))
        except Exception as e:  # noqa: BLE001
            _fail(e)

    def load_config(self, file):
        """The Build tab's pickers and option forms showing a saved model (or run) config."""
        from workbench.config import load_model_config
        from workbench.forms import fill_form

        if file is None:
            raise gr.Error("Choose a YAML config file first")
        try:
            c = load_model_config(file)
            values = fill_form(self.fields, c.integrator, c.peft)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return (c.encoder.name, c.integrator.name, c.llm.name, c.peft.method, *values)

    def check_option(self, field_index: int, raw):
        """One option field checked as it is left: a wrong value is refused there, with the reason."""
        from workbench.options import from_form

        f = self.fields[field_index]
        try:
            from_form(f"{f.kind} '{f.owner}'", f.option, raw)
        except WorkbenchError as e:
            gr.Warning(str(e).splitlines()[0])

    # ------------------------------------------------------------------ data
    def preview(self, kind: str, options_json: str):
        options = _options(options_json)
        try:
            data = frontend.preview_data(kind, options, n=6)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        gallery = []
        for s in data["samples"]:
            text = " / ".join(f"{m['role']}: {m['content']}" for m in s["messages"]).replace("<image>\n", "")
            if s["images"] and isinstance(s["images"][0], str):
                gallery.append((s["images"][0], text[:200]))
        skipped = data["report"].get("skipped", {})
        counts = (f"**{data['count']:,} usable samples**" +
                  (f"; skipped: {', '.join(f'{k} {v}' for k, v in skipped.items())}" if skipped else "; no bad rows"))
        return gallery, counts, [s["messages"] for s in data["samples"]]

    # ------------------------------------------------------------------ train
    def recipe_choices(self) -> list[tuple[str, str]]:
        from workbench.recipes import recipe_catalog

        return [(CUSTOM, CUSTOM)] + [(r.label, r.key) for r in recipe_catalog(self.registry)]

    def show_recipe(self, key: str):
        """A picked recipe's summary and editable fields (the custom choice shows the Build-tab flow instead)."""
        from workbench.recipes import find_recipe, recipe_catalog, recipe_fields

        if key == CUSTOM:
            return ("Builds the run from the **Build** tab's pickers, the **Data** tab's dataset and the paradigm "
                    "below.", gr.update(visible=False), gr.update(visible=True), *[gr.update()] * 10)
        try:
            recipe = find_recipe(recipe_catalog(self.registry), key)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        f = recipe_fields(recipe.run)
        return (f"**{recipe.label}** — {recipe.summary}", gr.update(visible=True), gr.update(visible=False),
                f["stages"], f["budget"], f["peft_method"], f["peft_r"], f["peft_layers"], f["peft_targets"],
                f["llm"], f["data_kind"], json.dumps(f["data_options"]), f["batch_size"])

    def recipe_run(self, key, stages, budget, peft_method, peft_r, peft_layers, peft_targets, llm, kind,
                   data_options, name, batch_size, eval_every, text_only):
        """The picked recipe with the Train tab's edits, validated (one readable line when an edit is wrong)."""
        from workbench.recipes import apply_edits, find_recipe, recipe_catalog

        options = _options(data_options, "Recipe data options")
        recipe = find_recipe(recipe_catalog(self.registry), key)
        run = apply_edits(recipe.run, {"name": name, "llm": llm, "batch_size": batch_size, "stages": stages,
                                       "budget": budget, "peft_method": peft_method, "peft_r": peft_r,
                                       "peft_layers": peft_layers, "peft_targets": peft_targets, "data_kind": kind,
                                       "data_options": options})
        if eval_every is not None:
            run.training.eval_every = int(eval_every)
        run.text_only = bool(text_only)
        return run

    def launch(self, recipe, stages, budget, peft_method, peft_r, peft_layers, peft_targets, recipe_llm,
               recipe_kind, recipe_data_options, kind, data_options, paradigm, name, batch_size, lr, epochs,
               max_minutes, eval_every, text_only, encoder, integrator, llm, peft, *form_values):
        from workbench.config import DataSpec

        try:
            if recipe and recipe != CUSTOM:
                run = self.recipe_run(recipe, stages, budget, peft_method, peft_r, peft_layers, peft_targets,
                                      recipe_llm, recipe_kind, recipe_data_options, name, batch_size, eval_every,
                                      text_only)
            else:
                model = self.model_config(encoder, integrator, llm, peft, *form_values)
                data = DataSpec(kind=kind, options=_options(data_options))
                eval_data = DataSpec(kind="easy-vqa", options={"split": "test"}) if kind == "easy-vqa" else None
                run = frontend.run_config(model, data, paradigm, name, batch_size, lr, epochs, max_minutes, eval_every,
                                          text_only, eval_data)
            run_id = self.registry.create(run)
            self.registry.start(run_id)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return run_id, gr.update(choices=self.run_ids(), value=run_id)

    def run_ids(self) -> list[str]:
        return [r["id"] for r in self.registry.list()]

    def progress(self, run_id: str | None):
        from workbench.evaluation_figures import by_type_text, format_score, metric_name

        if not run_id:
            return "No run selected.", None, [], ""
        try:
            p = frontend.run_progress(self.registry, run_id)
        except Exception as e:  # noqa: BLE001
            return f"Cannot read run {run_id}: {e}", None, [], ""
        bar = ""
        if p["fraction"] is not None:
            filled = int(30 * p["fraction"])
            bar = f"`{'█' * filled}{'░' * (30 - filled)}` {100 * p['fraction']:.0f}% · ETA {frontend.format_eta(p['eta_s'])}"
        status = p["status"] + (f" — {p['reason']}" if p["reason"] else "")
        numbers = " · ".join(f"{k} {v:.4g}" for k, v in (("loss", p["loss"]), ("lr", p["lr"]),
                                                          ("samples/s", p["samples_per_s"]),
                                                          ("memory MB", p["memory_mb"])) if v is not None)
        text = (f"**{run_id}**: {status}\n\n{bar}\n\nstage {p['stage'] or '—'}, step {p['step'] or 0} · {numbers}"
                f"\n\nhistory: {frontend.history_text(p['history'])}")
        evals = [[e["step"], f"{metric_name(e['metric'])} {format_score(e['score'], e['metric'])}",
                  by_type_text(e["by_type"], e["metric"])] for e in p["evals"]]
        curves = frontend.curves_figure({run_id: self.registry.run_dir(run_id)})
        return text, curves, evals, p["log"]

    def cancel(self, run_id):
        try:
            return f"{run_id}: {self.registry.cancel(run_id)['status']}"
        except Exception as e:  # noqa: BLE001
            _fail(e)

    def resume(self, run_id):
        try:
            return f"{run_id}: resumed (pid {self.registry.resume(run_id)})"
        except Exception as e:  # noqa: BLE001
            _fail(e)

    # ------------------------------------------------------------------ runs
    def runs_table(self):
        rows = frontend.run_rows(self.registry)
        table = [[r["id"], r["status"] + (f" ({r['reason']})" if r["reason"] else ""), r["paradigm"],
                  f"{r['encoder']} + {r['integrator']} + {r['llm']}" + (f" + {r['peft']}" if r["peft"] != "none" else ""),
                  "" if r["best_accuracy"] is None else f"{r['best_accuracy']:.3f}",
                  "" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
                  + ("" if r.get("trainable_pct") is None else f" ({r['trainable_pct']:.2f}%)")] for r in rows]
        ids = [r["id"] for r in rows]
        return table, gr.update(choices=ids), gr.update(choices=["default"] + ids)

    def overlay(self, run_ids: list[str]):
        if not run_ids:
            return None
        return frontend.curves_figure({r: self.registry.run_dir(r) for r in run_ids})

    def delete(self, run_id: str):
        try:
            self.registry.delete(run_id)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return f"deleted {run_id}"

    def export(self, run_id, fmt):
        """A finished run out of the workbench (workbench.export): where it went, and the model card it carries."""
        if not run_id:
            raise gr.Error("Pick a run to export")
        try:
            with self.cache.lock:  # one model in memory at a time on a small machine
                path = frontend.export_model(self.registry, run_id, fmt)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        if path.is_dir():
            card = (path / "README.md").read_text(encoding="utf-8")
        else:
            import zipfile

            with zipfile.ZipFile(path) as zf:
                card = zf.read("model/README.md").decode("utf-8")
        body = card.split("---", 2)[2] if card.startswith("---") else card  # the YAML metadata stays in the file
        return f"Exported **{fmt}** to `{path}`", body

    # ------------------------------------------------------------------ chat
    def check_image(self, path):
        """An uploaded or picked image, checked before anything uses it; the preview shows what will be sent."""
        from workbench.images import load_image

        if not path:
            return None
        try:
            return load_image(path)
        except Exception as e:  # noqa: BLE001
            raise gr.Error(f"Refused: {str(e).splitlines()[0]}") from None

    def chat(self, source, image, text, history, session_state, max_new_tokens, temperature, top_p):
        """Stream one answer; concurrent users' answers are generated together (the cache's batcher)."""
        from workbench.chat import ChatSession, GenerationSettings
        from workbench.images import load_image

        if not text or not text.strip():
            raise gr.Error("Type a question first")
        try:
            if image is not None:
                load_image(image)  # refuse a bad upload with a clear message before anything else
            model = self.cache.get(source or "default")
        except Exception as e:  # noqa: BLE001
            _fail(e)
        state = session_state or {}
        if state.get("source") != source or not history:  # an empty transcript is a new conversation, as shown
            if state.get("session") is not None:
                state["session"].model = None  # the old session must not keep its model (and its GPU memory)
            state = {"source": source, "session": ChatSession(model)}
        session = state["session"]
        session.model = model  # lent for this answer only: the cache owns the model
        session.settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                              top_p=float(top_p))
        history = list(history or [])
        # the user's turn shows the image asked about (gradio's chatbot takes a file path in the message)
        history.append({"role": "user", "content": [{"path": str(image)}, text] if image is not None else text})
        history.append({"role": "assistant", "content": ""})
        pieces = session.send(text, [image] if image is not None else None, batcher=self.cache.batcher)
        try:
            for piece in pieces:
                history[-1]["content"] += piece
                yield history, state, None
        except Exception as e:  # noqa: BLE001
            _fail(e)
        finally:
            pieces.close()  # the tab closed mid-answer (gradio closes this generator): its row of the batch stops
            session.model = None  # a session kept in a browser tab must not pin an evicted model in memory
        state["last"] = {"question": session.messages[-2]["content"], "answer": session.messages[-1]["content"],
                         "images": list(session.images)}
        yield history, state, None

    # ------------------------------------------------------------------ attention
    @staticmethod
    def _last_question(session_state) -> tuple[list[dict], list, str]:
        last = (session_state or {}).get("last")
        if not last or not last["images"]:
            raise gr.Error("Ask a question about an image in Chat first: the attention view explains the last answer")
        images = last["images"][-1:] if last["question"].count("<image>") == 1 else last["images"]
        return [{"role": "user", "content": last["question"]}], images, last["answer"]

    def attention_views(self, source):
        """The views the chosen model's family has (the default preselected) and why the others are absent."""
        from workbench.attention import available_views

        try:
            with self.cache.lock:
                views = available_views(self.cache.get(source or "default"))
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return gr.update(choices=views.views, value=views.default), views.explanation().replace("\n", "  \n")

    def explain(self, source, session_state, token, head, method, layer):
        from workbench.attention import available_views, image_map, trace_attention
        from workbench.attention_figures import heatmap_figure, modality_share_figure, overlay_image, prompt_attention_figure

        messages, images, answer = self._last_question(session_state)
        head = int(head) if str(head).lstrip("-").isdigit() else head
        layers = None if int(layer) < 0 else [int(layer)]
        try:
            model = self.cache.get(source or "default")
            with self.cache.lock:
                views = available_views(model)
                asked, method = method, method if method in views.views else views.default
                trace = trace_attention(model, messages, images, answer=answer,
                                        relevancy=method in ("relevancy", "gradient"))
            token = max(-len(trace.answer_positions), min(int(token), len(trace.answer_positions) - 1))
            amap = image_map(trace, token, method, head, layers)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        tokens = ", ".join(f"{i}: {t!r}" for i, t in enumerate(trace.answer_tokens))
        note = f"Answer tokens — {tokens}. Showing token {token} ({trace.answer_tokens[token]!r}), {method}, head {head}, " \
               f"{'all layers' if layers is None else f'layer {layers[0]}'}."
        if asked != method:
            note += f" (No {asked} view for {views.integrator}: showing {method}.)"
        if trace.gates:
            note += " Gates: " + ", ".join(f"layer {k}: {v:.3f}" for k, v in sorted(trace.gates.items()))
        note += "\n\n" + views.explanation().replace("\n", "  \n")
        heads = ["mean", "max", *map(str, range(trace.num_heads))]  # the traced model's own head count
        return (overlay_image(trace.images[0], amap), heatmap_figure(trace, token, method, head),
                modality_share_figure(trace), prompt_attention_figure(trace, token, "attention", head, layers), note,
                gr.update(choices=heads, value=str(head) if str(head) in heads else "mean"),
                gr.update(choices=views.views, value=method))

    def logit_lens_view(self, source, session_state, layer):
        """The logit lens on the last question's image: each visual token's top words at a layer."""
        from workbench.attention import LOGIT_LENS, available_views
        from workbench.attention_figures import logit_lens_figure, note_figure
        from workbench.logit_lens import logit_lens

        messages, images, _ = self._last_question(session_state)
        try:
            model = self.cache.get(source or "default")
            with self.cache.lock:
                views = available_views(model)
                if views.lens is None:
                    reason = f"No logit lens for {views.integrator}: {views.absent[LOGIT_LENS]}"
                    return note_figure(reason, "Logit lens"), reason
                lens = logit_lens(model, messages, images[-1:])
            figure = logit_lens_figure(lens, int(layer))
        except Exception as e:  # noqa: BLE001
            _fail(e)
        shown = lens.layer_names[lens.layer_index(int(layer))]
        note = (f"Reads {views.lens}, through the LLM's final norm and LM head: each cell is a visual token labelled "
                f"with its most probable word at **{shown}** (hover for the top {lens.probs.shape[-1]}); the slider "
                f"moves through {', '.join(lens.layer_names[:1] + lens.layer_names[-1:])} and the layers between.")
        return figure, note

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, run_id, kind, options_json, limit, baseline, progress=gr.Progress()):
        """Any data kind scored with its task's metric (accuracy by question type, or BLEU-4 / CIDEr-D) beside a
        text-only baseline: a text-only run (trained without images) or, by default, the same model with the
        images withheld — how much the image actually adds. Returns the table, the bars and a summary line."""
        from workbench.evaluation_figures import metric_name, score_table, scores_figure

        if not run_id:
            raise gr.Error("Pick a run")
        options = _options(options_json, "Evaluation data options")
        try:
            data = frontend.evaluation_data(kind, options)  # a bad path fails here, before a model loads
            progress(0, desc="evaluating")
            with self.cache.lock:
                reference = None if not baseline or baseline == "none" else "same" if baseline == WITHHELD \
                    else (lambda: self.cache.get(baseline))
                result, reference = frontend.evaluate_with_baseline(self.cache.get(run_id), data, int(limit),
                                                                    reference)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        efficiency = (f"**{result['task']}**, scored by {metric_name(result['metric'])} · {result['count']} questions "
                      f"in {result['seconds']:.0f} s ({result['samples_per_s']:.1f}/s) · "
                      f"{result['trainable_pct']:.2f}% trainable ({result['trainable_params']:,} parameters)"
                      + ("" if reference is None else " · baseline: the same questions without the images"
                         + ("" if baseline == WITHHELD else f", asked of {baseline}")))
        return score_table(result, reference), scores_figure(result, reference), efficiency


def build_app(runs_dir: str | Path | None = None) -> gr.Blocks:
    """The page: one function per tab, then the wiring that keeps the run lists of every tab current."""
    wb = Workbench(runs_dir)
    with gr.Blocks(title="VLLM Workbench") as app:
        gr.Markdown("# VLLM Workbench\nPick an image encoder, a modality integrator and an LLM; train; chat; look inside. "
                    "Everything marked *offline* runs on this machine without a network.")
        build_inputs = _build_tab(wb)
        data_kind, data_options = _data_tab(wb)
        run_pick, recipe, recipe_view = _train_tab(wb, build_inputs, data_kind, data_options)
        refresh, runs, compare, delete_pick, export_pick = _runs_tab(wb)
        source, chat_state = _chat_tab(wb)
        _attention_tab(wb, source, chat_state)
        eval_run = _evaluate_tab(wb)
        lists = [delete_pick, run_pick, eval_run]
        for event in (refresh.click, app.load):  # on Refresh and whenever the page opens
            event(lambda: gr.update(choices=wb.run_ids()), None, export_pick)
            event(wb.runs_table, None, [runs, compare, source])
            event(lambda: (gr.update(choices=wb.run_ids()),) * len(lists), None, lists)
        app.load(lambda: gr.update(choices=wb.recipe_choices()), None, recipe)  # saved runs are recipes too
        app.load(wb.show_recipe, recipe, recipe_view)
    app.workbench = wb
    return app


def _build_tab(wb: Workbench) -> list:
    """Encoder, integrator, LLM and PEFT pickers with the parameter table; returns the pickers."""
    cat = wb.catalog
    encoders = [(_label(r), r["name"]) for r in cat["encoders"]]
    integrators = [(f"{r['name']} — {r.get('family', '')}", r["name"]) for r in cat["integrators"]]
    llms = [(_label(r), r["name"]) for r in cat["llms"]]
    peft = [r["name"] for r in cat["peft"]]
    with gr.Tab("Build"):
        with gr.Row():
            encoder = gr.Dropdown(encoders, value="mobilenet_v2", label="Image encoder")
            integrator = gr.Dropdown(integrators, value="mlp", label="Modality integrator")
            llm = gr.Dropdown(llms, value="smollm2-135m-instruct", label="LLM", allow_custom_value=True)
            peft_method = gr.Dropdown(peft, value="none", label="PEFT modules in the LLM")
        fields, integrator_groups, peft_groups = _option_forms(wb, integrator.value, peft_method.value)
        batch = gr.Number(16, label="Batch size (for the memory estimate)", precision=0)
        with gr.Row():
            describe_btn = gr.Button("Build and describe", variant="primary")
            save_btn = gr.Button("Save config")
            load_file = gr.File(label="Load config (YAML)", file_types=[".yaml", ".yml"], height=80)
        summary = gr.Markdown()
        architecture = gr.Plot(label="Architecture: orange trains, grey stays frozen", elem_id="architecture")
        diagram = gr.Code(label="How the parts connect (as text)", language=None)
        params = gr.Dataframe(headers=["component", "total", "trainable", "trainable %", "share %"],
                              label="Parameters per component", interactive=False)
        saved = gr.Textbox(label="Saved to", interactive=False)
    build_inputs = [encoder, integrator, llm, peft_method, *fields]
    integrator.change(lambda name: [gr.update(visible=n == name) for n in integrator_groups], integrator,
                      list(integrator_groups.values()))
    peft_method.change(lambda name: [gr.update(visible=n == name) for n in peft_groups], peft_method,
                       list(peft_groups.values()))
    describe_btn.click(wb.describe, [batch] + build_inputs, [architecture, diagram, params, summary])
    save_btn.click(wb.save_config, build_inputs, saved)
    load_file.upload(wb.load_config, load_file, build_inputs)

    return build_inputs


def _option_forms(wb: Workbench, integrator: str, peft: str):
    """One group of fields per integrator and per PEFT method, generated from their declared options (only the
    chosen ones show); returns the fields in `wb.fields` order and the groups by name."""
    from workbench.options import to_form

    fields, groups = [], {"integrator": {}, "peft": {}}
    for kind, title, chosen in (("integrator", "Integrator options", integrator), ("peft", "PEFT options", peft)):
        owners = dict.fromkeys(f.owner for f in wb.fields if f.kind == kind)
        for owner in owners:
            with gr.Group(visible=owner == chosen) as group:
                gr.Markdown(f"**{title}: {owner}**")
                with gr.Row():
                    for f in (f for f in wb.fields if f.kind == kind and f.owner == owner):
                        fields.append(_option_field(f.option, to_form(f.option, f.option.default)))
            groups[kind][owner] = group
    for i, field in enumerate(fields):
        if not isinstance(field, gr.Checkbox):  # a checkbox cannot hold a wrong value
            field.blur(lambda raw, i=i: wb.check_option(i, raw), field, None)
    return fields, groups["integrator"], groups["peft"]


def _option_field(option, value):
    """The input that suits an option's declared type, its help as the field's info line."""
    info = option.help or None
    if option.type == "bool":
        return gr.Checkbox(value, label=option.name, info=info)
    if option.type in ("int", "float") and not option.optional:
        return gr.Number(value, label=option.name, info=info, precision=0 if option.type == "int" else None,
                         minimum=option.minimum, maximum=option.maximum)
    if option.type == "choice":
        from workbench.options import to_form

        return gr.Dropdown([to_form(option, c) for c in option.choices], value=value, label=option.name, info=info)
    return gr.Textbox(value, label=option.name, info=info, placeholder="empty = default")


def _data_tab(wb: Workbench):
    with gr.Tab("Data"):
        with gr.Row():
            data_kind = gr.Dropdown([r["name"] for r in wb.catalog["data"]], value="easy-vqa", label="Dataset")
            data_options = gr.Textbox(json.dumps(DEFAULT_DATA_OPTIONS["easy-vqa"]), label="Loader options (JSON)")
        preview_btn = gr.Button("Preview")
        counts = gr.Markdown()
        gallery = gr.Gallery(label="Samples", columns=6, height=220)
        conversations = gr.JSON(label="Conversations")
    data_kind.change(lambda k: json.dumps(DEFAULT_DATA_OPTIONS.get(k, {})), data_kind, data_options)
    preview_btn.click(wb.preview, [data_kind, data_options], [gallery, counts, conversations])

    return data_kind, data_options


def _train_tab(wb: Workbench, build_inputs: list, data_kind, data_options):
    from workbench.peft_modules import METHODS
    from workbench.recipes import STAGE_COLUMNS, default_recipe, recipe_catalog

    paradigms = {r["name"]: r for r in wb.catalog["paradigms"]}
    with gr.Tab("Train"):
        with gr.Row():
            recipe = gr.Dropdown(wb.recipe_choices(), value=default_recipe(recipe_catalog(wb.registry)) or CUSTOM,
                                 label="Recipe", scale=2,
                                 info="an example config or a saved run's; custom builds from the Build tab")
            run_name = gr.Textbox(label="Run name (optional)")
        recipe_md = gr.Markdown()
        with gr.Group() as recipe_group:
            stages = gr.Dataframe(headers=STAGE_COLUMNS, datatype=["str", "str", "str", "number", "number", "number",
                                                                   "number"],
                                  type="array", interactive=True, static_columns=[0, 1, 2],
                                  label="Stages (epochs, minutes (0 = none) and learning rates are editable; a new "
                                        "overall budget is spread over the stages in proportion to their minutes)")
            with gr.Row():
                budget = gr.Number(0, label="Overall time budget (minutes, 0 = none)")
                recipe_llm = gr.Textbox(label="Recipe LLM", placeholder="an embedded name, a hub id or a local folder")
                peft_method = gr.Dropdown(list(METHODS), label="Recipe PEFT method")
                peft_r = gr.Number(8, label="PEFT rank", precision=0)
                peft_layers = gr.Textbox(label="PEFT layers", placeholder="layer indices, e.g. 22, 23; empty = all")
                peft_targets = gr.Textbox(label="PEFT target modules", placeholder="e.g. q_proj, v_proj; empty = usual")
            with gr.Row():
                recipe_kind = gr.Dropdown([r["name"] for r in wb.catalog["data"]], label="Recipe dataset")
                recipe_data = gr.Textbox(label="Recipe dataset options (JSON)", scale=2)
        with gr.Group(visible=False) as custom_group:
            paradigm = gr.Radio(list(paradigms), value="single-stage", label="Training paradigm")
            explanation = gr.Markdown(paradigms["single-stage"].get("explanation", ""))
            with gr.Row():
                lr = gr.Number(1e-3, label="Learning rate")
                epochs = gr.Number(1.0, label="Epochs per stage")
                minutes = gr.Number(5.0, label="Time budget (minutes, 0 = none)")
        with gr.Row():
            train_batch = gr.Number(16, label="Batch size", precision=0)
            eval_every = gr.Number(50, label="Evaluate every N steps", precision=0)
            text_only = gr.Checkbox(False, label="Text-only baseline (no images)")
        with gr.Row():
            launch_btn = gr.Button("Launch in the background", variant="primary")
            cancel_btn = gr.Button("Cancel (checkpoint, then stop)")
            resume_btn = gr.Button("Resume")
        run_pick = gr.Dropdown(wb.run_ids(), label="Run", allow_custom_value=True)
        launched = gr.Textbox(label="Status", interactive=False)
        progress_md = gr.Markdown()
        curves = gr.Plot(label="Loss, evaluation accuracy and learning rate")
        evals = gr.Dataframe(headers=["step", "score", "by type"], label="Evaluations", interactive=False)
        log = gr.Code(label="Log tail", language=None)
        timer = gr.Timer(2.0)
    recipe_view = [recipe_md, recipe_group, custom_group, stages, budget, peft_method, peft_r, peft_layers, peft_targets,
                   recipe_llm, recipe_kind, recipe_data, train_batch]
    recipe.change(wb.show_recipe, recipe, recipe_view)
    paradigm.change(lambda p: paradigms[p].get("explanation", ""), paradigm, explanation)
    launch_btn.click(wb.launch, [recipe, stages, budget, peft_method, peft_r, peft_layers, peft_targets, recipe_llm,
                                 recipe_kind, recipe_data, data_kind, data_options, paradigm, run_name, train_batch, lr,
                                 epochs, minutes, eval_every, text_only] + build_inputs, [launched, run_pick])
    cancel_btn.click(wb.cancel, run_pick, launched)
    resume_btn.click(wb.resume, run_pick, launched)
    timer.tick(wb.progress, run_pick, [progress_md, curves, evals, log])
    run_pick.change(wb.progress, run_pick, [progress_md, curves, evals, log])

    return run_pick, recipe, recipe_view


def _runs_tab(wb: Workbench):
    with gr.Tab("Runs"):
        refresh = gr.Button("Refresh")
        runs = gr.Dataframe(headers=["run", "status", "paradigm", "components", "best accuracy", "trainable"],
                            interactive=False, label="Runs (they keep training when the browser closes)")
        compare = gr.Dropdown([], multiselect=True, label="Overlay the curves of")
        overlay = gr.Plot()
        with gr.Row():
            delete_pick = gr.Dropdown([], label="Run to delete")
            delete_btn = gr.Button("Delete", variant="stop")
        deleted = gr.Textbox(label="", interactive=False)
        with gr.Row():
            export_pick = gr.Dropdown([], label="Run to export")
            export_format = gr.Radio(["hf-llava", "merged", "workbench"], value="hf-llava", label="Format",
                                     info="hf-llava: plain transformers (where the parts allow); merged: PEFT "
                                          "merged, LLM as a transformers folder; workbench: the model as a zip")
            export_btn = gr.Button("Export")
        exported = gr.Markdown()
        card = gr.Markdown(label="Model card")
    export_btn.click(wb.export, [export_pick, export_format], [exported, card])
    compare.change(wb.overlay, compare, overlay)
    delete_btn.click(wb.delete, delete_pick, deleted)

    return refresh, runs, compare, delete_pick, export_pick


def _chat_tab(wb: Workbench):
    examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
    with gr.Tab("Chat"):
        with gr.Row():
            source = gr.Dropdown(["default"] + wb.run_ids(), value="default", allow_custom_value=True,
                                 label="Model (default = untrained embedded model; or a run)")
        with gr.Row():
            with gr.Column(scale=1):
                # a File, not an Image component: the workbench checks the upload itself (type, bytes, pixels)
                # and refuses with a readable message instead of a decoder's error
                image = gr.File(label="Image (PNG, JPEG, …; at most 50 MB)", file_types=["image"], type="filepath",
                                elem_id="chat-image", height=90)
                preview = gr.Image(label="Preview", interactive=False, height=200)
                gr.Examples(examples, inputs=image, label="Example images")
                max_new = gr.Slider(1, 256, 64, step=1, label="Max new tokens")
                temperature = gr.Slider(0, 1.5, 0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, 1, step=0.05, label="Top-p")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=420)
                question = gr.Textbox(label="Message", placeholder="What color is the shape?")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    reset = gr.Button("New chat")
        chat_state = gr.State({})
        gr.Markdown(wb.cache.bounds(), elem_id="chat-bounds")
    image.change(wb.check_image, image, preview)
    chat_inputs = [source, image, question, chatbot, chat_state, max_new, temperature, top_p]
    # every waiting answer needs a running event: gradio lets as many run as the batcher batches and queues
    together = wb.cache.batcher.max_batch + wb.cache.batcher.max_queue
    send.click(wb.chat, chat_inputs, [chatbot, chat_state, question], concurrency_limit=together,
               concurrency_id="chat")
    question.submit(wb.chat, chat_inputs, [chatbot, chat_state, question], concurrency_limit=together,
                    concurrency_id="chat")
    reset.click(lambda: ([], {}, None, None), None, [chatbot, chat_state, image, preview])

    return source, chat_state


def _attention_tab(wb: Workbench, source, chat_state) -> None:
    with gr.Tab("Attention") as attention_tab:
        gr.Markdown("Explains the **last answer** in Chat: where on the image each answer token looked. "
                    "The views offered are those the chosen model's integrator family has.")
        with gr.Row():
            token = gr.Number(0, label="Answer token (0 = first, -1 = last)", precision=0)
            head = gr.Dropdown(["mean", "max"], value="mean", label="Head",
                               info="single heads appear once an answer is explained: the model's own count")
            method = gr.Dropdown(["gradient"], value="gradient", label="View",
                                 info="the views this model's family has; filled when the tab opens")
            layer = gr.Number(-1, label="Layer (-1 = all)", precision=0)
            explain_btn = gr.Button("Explain", variant="primary")
        note = gr.Markdown()
        with gr.Row():
            overlay_img = gr.Image(label="Map over the image", type="pil", height=300)
            heatmap = gr.Plot(label="By layer, token and head")
        with gr.Row():
            share = gr.Plot(label="Image vs text attention per layer")
            prompt_plot = gr.Plot(label="Prompt tokens the answer drew on")
        gr.Markdown("### Logit lens\nWhat each visual token of the last question's image reads as, layer by layer: "
                    "its hidden state decoded through the LLM's final norm and LM head.")
        with gr.Row():
            lens_layer = gr.Number(-1, label="Logit lens layer (0 = embeddings, -1 = last)", precision=0)
            lens_btn = gr.Button("Read the visual tokens")
        lens_note = gr.Markdown()
        lens_plot = gr.Plot(label="Logit lens: top word per visual token")
    attention_tab.select(wb.attention_views, [source], [method, note])
    explain_btn.click(wb.explain, [source, chat_state, token, head, method, layer],
                      [overlay_img, heatmap, share, prompt_plot, note, head, method])
    lens_btn.click(wb.logit_lens_view, [source, chat_state, lens_layer], [lens_plot, lens_note])


def _evaluate_tab(wb: Workbench):
    kinds = [r["name"] for r in wb.catalog["data"]]
    with gr.Tab("Evaluate"):
        with gr.Row():
            eval_run = gr.Dropdown(wb.run_ids(), label="Run", allow_custom_value=True)
            eval_kind = gr.Dropdown(kinds, value="easy-vqa", label="Evaluation data")
            eval_options = gr.Textbox(json.dumps(EVAL_DATA_OPTIONS["easy-vqa"]), label="Evaluation data options (JSON)",
                                      scale=2)
        with gr.Row():
            limit = gr.Number(200, label="Questions", precision=0)
            eval_baseline = gr.Dropdown([WITHHELD, "none"] + wb.run_ids(), value=WITHHELD, allow_custom_value=True,
                                        label="Text-only baseline (a text-only run, or the same model)")
            eval_btn = gr.Button("Evaluate", variant="primary")
        efficiency = gr.Markdown()
        with gr.Row():
            scores = gr.Dataframe(headers=["question type", "accuracy", "text-only baseline"], interactive=False,
                                  label="Scores", scale=1)
            bars = gr.Plot(label="By question type, beside the baseline", elem_id="eval-bars", scale=2)
    eval_kind.change(lambda k: json.dumps(EVAL_DATA_OPTIONS.get(k, {})), eval_kind, eval_options)
    eval_btn.click(wb.evaluate, [eval_run, eval_kind, eval_options, limit, eval_baseline], [scores, bars, efficiency])

    return eval_run


def read_auth(auth_file: str | None) -> tuple[str, str] | None:
    raw = Path(auth_file).read_text().strip() if auth_file else os.environ.get("WORKBENCH_APP_AUTH", "")
    if not raw:
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise SystemExit("The credentials must look like user:password")
    return user, password


def main(argv: list[str] | None = None) -> int:
    from workbench.config import LLM_DTYPES

    parser = argparse.ArgumentParser(description="The VLLM Workbench in the browser")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("WORKBENCH_APP_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="a public Gradio link (needs credentials)")
    parser.add_argument("--auth-file", help="file with one user:password line (or set WORKBENCH_APP_AUTH)")
    parser.add_argument("--runs", help="runs directory (default: $WORKBENCH_RUNS or ./runs)")
    parser.add_argument("--chat-batch", type=int, help=f"answers generated together (default "
                        f"$WORKBENCH_CHAT_MAX_BATCH or {CHAT_MAX_BATCH})")
    parser.add_argument("--chat-queue", type=int, help=f"chat requests that may wait beyond those (default "
                        f"$WORKBENCH_CHAT_MAX_QUEUE or {CHAT_MAX_QUEUE}); more are refused as busy")
    parser.add_argument("--model-memory", help="memory for loaded models, e.g. 8GB (default $WORKBENCH_MODEL_MEMORY "
                        "or half the GPU memory / available RAM); least recently used runs are dropped first")
    parser.add_argument("--dtype", choices=LLM_DTYPES, help="the LLM dtype models answer in (default "
                        "$WORKBENCH_SERVE_DTYPE or auto: bf16 where the CPU or GPU computes it natively, unless a "
                        "run's config names its dtype)")
    args = parser.parse_args(argv)
    for flag, env in ((args.chat_batch, "WORKBENCH_CHAT_MAX_BATCH"), (args.chat_queue, "WORKBENCH_CHAT_MAX_QUEUE"),
                      (args.model_memory, "WORKBENCH_MODEL_MEMORY"), (args.dtype, "WORKBENCH_SERVE_DTYPE")):
        if flag is not None:
            os.environ[env] = str(flag)  # the Workbench reads its bounds from there
    from workbench.logs import quiet_libraries

    quiet_libraries()
    auth = read_auth(args.auth_file)
    exposed = args.share or args.host not in LOCAL_HOSTS
    if exposed and auth is None:
        print("error: --host/--share expose the workbench beyond this machine; set WORKBENCH_APP_AUTH=user:password "
              "or pass --auth-file", file=sys.stderr)
        return 2
    from workbench.llm import limit_gpu_share

    share = limit_gpu_share()  # chat, attention and evaluation leave the rest of the GPU to queued runs
    try:
        app = build_app(args.runs)
    except WorkbenchError as e:  # e.g. a malformed --model-memory
        print(f"error: {e}", file=sys.stderr)
        return 2
    app.queue(default_concurrency_limit=8)  # chat events have their own, larger limit (see _chat_tab)
    cache = app.workbench.cache
    print(f"VLLM Workbench on http://{args.host}:{args.port}" + (" (login required)" if auth else "")
          + (f"; it uses at most {share:.0%} of each GPU, training runs the rest" if share else ""))
    print(cache.bounds(), flush=True)
    import logging

    batching_log = logging.getLogger("workbench.batching")  # one line per batch in the app's log
    batching_log.setLevel(logging.INFO)
    batching_log.addHandler(logging.StreamHandler(sys.stdout))
    app.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
               max_threads=max(40, cache.batcher.max_batch + cache.batcher.max_queue + 16),
               max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES)], show_error=True)  # messages only, no tracebacks
    return 0


if __name__ == "__main__":
    sys.exit(main())
