"""The Gradio app through its callbacks (the same functions the browser triggers), plus a served-page smoke test:
build and describe, preview data, launch a background run and watch it finish, chat about an image, explain
the answer, evaluate; bad input becomes a readable gr.Error; exposing the app needs credentials."""
import json
import socket
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest

REPO = Path(__file__).resolve().parents[1]


import workbench.app as app_module  # noqa: E402


@pytest.fixture()
def wb(tmp_path):
    return app_module.Workbench(tmp_path / "runs")


def dropdown_values(app: gr.Blocks, label: str) -> list:
    """The values a dropdown of the built app offers."""
    dropdown = next(b for b in app.blocks.values() if isinstance(b, gr.Dropdown) and b.label == label)
    return [value for _, value in dropdown.choices]


def form(wb, integrator: str, peft: str = "none", **values) -> list:
    """The option forms' values as the browser sends them: defaults, with `values` typed into the chosen
    integrator's (or PEFT method's) fields."""
    from workbench.options import to_form

    return [values.get(f.option.name, to_form(f.option, f.option.default))
            if (f.kind, f.owner) in (("integrator", integrator), ("peft", peft)) else to_form(f.option, f.option.default)
            for f in wb.fields]


CUSTOM = (app_module.CUSTOM, None, 0, "none", 8, "", "", "", "easy-vqa", "{}")
"""The recipe part of `launch`'s inputs when the custom (Build tab) flow is picked."""


def _drain(generator):
    out = None
    for out in generator:
        pass
    return out


def test_build_describes_any_integrator(wb, tiny_llm_dir, monkeypatch):
    from workbench.model import VisionLanguageModel

    built = []
    real = VisionLanguageModel.from_config.__func__
    monkeypatch.setattr(VisionLanguageModel, "from_config",
                        classmethod(lambda cls, config, device=None: built.append(device) or real(cls, config, device)))
    figure, diagram, table, summary = wb.describe(4, "mobilenet_v2", "qformer", str(tiny_llm_dir), "lora",
                                                  *form(wb, "qformer", "lora", num_queries=8, r=4))
    assert built == ["meta"]  # each click builds shapes only: no weights loaded, no GPU memory taken
    assert "9 visual token(s)" in diagram and "lora" in diagram  # 8 queries + the whole-image token
    assert any(a.name == "tokens integrator→llm" and a.text.startswith("9 visual tokens") for a in figure.layout.annotations)
    assert [row[0] for row in table][:2] == ["encoder", "integrator"] and table[-1][0] == "total"
    assert "**9 visual tokens**" in summary and "attention abstractor" in summary and "fits" in summary
    for bad, message in (({"num_queries": 0}, "'num_queries' of integrator 'qformer' must be at least 1"),
                         ({"num_queries": 2.5}, "'num_queries' of integrator 'qformer' must be int"),
                         ({"input_norm": "sideways"}, "must be one of layer, batch, none, true, false"),
                         ({"dropout": 1.5}, "'dropout' of integrator 'qformer' must be at most 1")):
        with pytest.raises(gr.Error, match=message):
            wb.describe(4, "mobilenet_v2", "qformer", str(tiny_llm_dir), "none", *form(wb, "qformer", **bad))
    with pytest.raises(gr.Error, match="'r' of PEFT method lora must be at least 1"):
        wb.describe(4, "mobilenet_v2", "mlp", str(tiny_llm_dir), "lora", *form(wb, "mlp", "lora", r=0))
    with pytest.raises(gr.Error, match="Unknown encoder"):
        wb.describe(4, "resnet_magic", "mlp", str(tiny_llm_dir), "none", *form(wb, "mlp"))


def test_config_save_and_load_round_trip(wb, tiny_llm_dir):
    values = form(wb, "resampler", "lora", num_latents=4, input_norm="batch", layers="0, 1", target_modules="q_proj")
    path = wb.save_config("mobilenet_v2", "resampler", str(tiny_llm_dir), "lora", *values)
    saved = Path(path).read_text()
    assert "num_latents: 4" in saved and "num_layers" not in saved  # only what differs from the defaults
    assert wb.load_config(path) == ("mobilenet_v2", "resampler", str(tiny_llm_dir), "lora", *values)
    with pytest.raises(gr.Error, match="Choose a YAML"):
        wb.load_config(None)


def test_data_preview_shows_samples_and_counts(wb):
    gallery, counts, conversations = wb.preview("easy-vqa", '{"split": "test", "limit": 50}')
    assert len(gallery) == 6 and Path(gallery[0][0]).is_file() and "50 usable samples" in counts
    assert conversations[0][0]["role"] == "user"
    with pytest.raises(gr.Error):
        wb.preview("llava", '{"json_path": "/nowhere/data.json"}')


def test_train_watch_chat_explain_evaluate(wb, tiny_llm_dir, example_image, llava_data, tmp_path):
    data = llava_data
    run_id, update = wb.launch(*CUSTOM, "llava", json.dumps({"json_path": str(data)}), "single-stage", "app run", 4,
                               1e-3, 1, 0, 0, False, "mobilenet_v2", "mlp", str(tiny_llm_dir), "none", *form(wb, "mlp"))
    assert update["value"] == run_id
    row = wb.registry.wait(run_id, timeout=240)
    assert row["status"] == "completed", row
    text, curves, evals, log = wb.progress(run_id)
    assert "completed" in text and "100%" in text and curves is not None and log
    table, _, sources = wb.runs_table()
    assert table[0][0] == run_id and table[0][1] == "completed" and run_id in sources["choices"]
    assert wb.overlay([run_id]) is not None

    history, state, cleared = _drain(wb.chat(run_id, str(example_image), "what color is the shape?", [], {},
                                             5, 0.0, 1.0))
    assert history[-1]["role"] == "assistant" and history[-1]["content"] and cleared is None
    assert state["session"].model is None  # a session kept by a browser tab does not pin the model (GPU memory)
    overlay, heatmap, share, prompt, note, heads, views = wb.explain(run_id, state, 0, "mean", "attention", -1)
    assert overlay.size[0] == overlay.size[1] and heatmap is not None and "Answer tokens" in note
    assert heads["choices"] == ["mean", "max", "0", "1", "2", "3"]  # the tiny LLM's 4 heads, read from the trace
    overlay, *_ = wb.explain(run_id, state, -1, "max", "gradient", 0)
    assert overlay is not None

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(gr.Error, match="notes.png"):
        _drain(wb.chat(run_id, str(bad), "what is it?", history, state, 5, 0.0, 1.0))
    with pytest.raises(gr.Error, match="Type a question"):
        _drain(wb.chat(run_id, None, "  ", history, state, 5, 0.0, 1.0))
    with pytest.raises(gr.Error, match="Chat first"):
        wb.explain(run_id, {}, 0, "mean", "attention", -1)

    easy = ("easy-vqa", '{"split": "test"}')
    table, bars, efficiency = wb.evaluate(run_id, *easy, 8, app_module.WITHHELD, progress=lambda *a, **k: None)
    accuracy = table["data"]
    assert accuracy[0][0] == "overall" and accuracy[0][2].endswith("%") and "trainable" in efficiency
    assert "without the images" in efficiency and len(bars.data) == 2
    table, bars, efficiency = wb.evaluate(run_id, *easy, 8, "none", progress=lambda *a, **k: None)
    assert table["data"][0][2] == "" and "baseline" not in efficiency and len(bars.data) == 1
    assert wb.delete(run_id) == f"deleted {run_id}" and run_id not in wb.run_ids()


def test_direct_adaptation_without_peft_is_refused(wb, tiny_llm_dir):
    with pytest.raises(gr.Error, match="peft.method"):
        wb.launch(*CUSTOM, "easy-vqa", "{}", "direct", "", 4, 1e-3, 1, 0, 0, False, "mobilenet_v2", "mlp",
                  str(tiny_llm_dir), "none", *form(wb, "mlp"))


def test_exposing_the_app_needs_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORKBENCH_APP_AUTH", raising=False)
    assert app_module.main(["--host", "0.0.0.0", "--runs", str(tmp_path)]) == 2
    assert "WORKBENCH_APP_AUTH" in capsys.readouterr().err
    assert app_module.main(["--share", "--runs", str(tmp_path)]) == 2
    monkeypatch.setenv("WORKBENCH_APP_AUTH", "teacher:s3cret")
    assert app_module.read_auth(None) == ("teacher", "s3cret")
    bad = tmp_path / "auth"
    bad.write_text("no-colon")
    with pytest.raises(SystemExit, match="user:password"):
        app_module.read_auth(str(bad))


def test_the_app_serves_its_page_on_loopback(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = app_module.build_app(tmp_path / "runs")
    from workbench.data import DATASETS
    from workbench.integrators import INTEGRATORS

    assert dropdown_values(app, "Dataset") == DATASETS.names()  # every registered data kind, image-table too
    assert dropdown_values(app, "Modality integrator") == INTEGRATORS.names()
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert "VLLM Workbench" in page
    finally:
        app.close()


def test_uploads_are_checked_before_use(wb, example_image, tmp_path):
    assert wb.check_image(None) is None
    checked = wb.check_image(str(example_image))
    assert checked.size == (64, 64) and checked.mode == "RGB"
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(gr.Error, match="Refused: Not an image file.*notes.png"):
        wb.check_image(str(fake))


def test_progress_of_a_run_configured_by_its_paradigm_alone(tmp_path, tiny_config, example_image):
    """Runs started from the command line name a paradigm and no stages: the progress view still counts them."""
    import copy

    from workbench import frontend
    from workbench.config import DataSpec, RunConfig, TrainingSpec
    from workbench.jobs import RunRegistry
    from workbench.training.metrics import MetricsLog

    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(RunConfig(name="cli run", model=copy.deepcopy(tiny_config), paradigm="two-stage",
                                       data=DataSpec(kind="easy-vqa"), training=TrainingSpec()))
    log = MetricsLog(registry.run_dir(run_id) / "metrics.jsonl")
    log.write("stage", stage=0, name="align", batches=10)
    log.write("train", stage=0, step=5, batch=5, batches=10, loss=1.0, lr=1e-3, samples_per_s=2.0, memory_mb=10.0)
    p = frontend.run_progress(registry, run_id)
    assert p["stage"] == "align" and p["fraction"] == pytest.approx(0.25)  # half of the first of two stages
    assert frontend.format_eta(p["eta_s"]) != "—"
    rows = frontend.run_rows(registry)
    assert rows[0]["paradigm"] == "two-stage" and rows[0]["integrator"] == "mlp"


def test_running_app_reports_an_app_that_dies_at_start(tmp_path, monkeypatch):
    from workbench import app_process

    (tmp_path / "broken_app.py").write_text("import sys\nprint('cannot start: port taken')\nsys.exit(3)\n")
    monkeypatch.setattr(app_process, "APP_MODULE", "broken_app")
    with pytest.raises(RuntimeError, match=r"exit code 3\)[\s\S]*port taken"):
        with app_process.running_app(tmp_path / "runs", log_path=tmp_path / "app.log", timeout=30,
                                     env={"PYTHONPATH": str(tmp_path)}):
            pass


def test_concurrent_chats_are_answered_in_one_batch(wb, tiny_model, example_image, tmp_path):
    """Two browser tabs asking at once: one generate batch, each tab its own streamed answer and conversation."""
    import threading

    folder = tiny_model.save_pretrained(tmp_path / "tiny")
    wb.cache.get(str(folder))  # loaded before: both questions reach the batcher together
    wb.cache.batcher.batch_window = 1.0
    results, streamed = {}, {0: 0, 1: 0}

    def ask(i):
        history = state = None
        for history, state, _ in wb.chat(str(folder), str(example_image), "what color is the shape?", [], {}, 6,
                                         0.0, 1.0):
            streamed[i] += 1
        results[i] = (history, state)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert list(wb.cache.batcher.batches) == [2]
    for i in range(2):
        history, state = results[i]
        assert history[0]["content"][0] == {"path": str(example_image)}  # the asked-about image in the transcript
        assert history[-1]["role"] == "assistant" and history[-1]["content"] and streamed[i] >= 2
    assert results[0][1]["session"] is not results[1][1]["session"]
    history, state = results[0]
    history, state, _ = _drain(wb.chat(str(folder), None, "and its shape?", history, state, 4, 0.0, 1.0))
    assert len(state["session"].messages) == 4 and len(history) == 4  # the tab's conversation goes on
    history, state, _ = _drain(wb.chat(str(folder), str(example_image), "what shape?", [], state, 4, 0.0, 1.0))
    assert len(state["session"].messages) == 2  # an empty transcript (New chat, or an API call) starts afresh
    assert "Chat: up to 16 answers generated together" in wb.cache.bounds() and "GiB" in wb.cache.bounds()


def test_a_tab_closed_mid_answer_frees_its_row(wb, tiny_model, example_image, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "tiny")
    answer = wb.chat(str(folder), str(example_image), "what color is the shape?", [], {}, 200, 0.0, 1.0)
    history, left, _ = next(answer)  # the first words arrived, then the browser tab closed
    assert history[-1]["content"]
    answer.close()  # what gradio does to the event's generator
    deadline = time.time() + 30
    while wb.cache.batcher.generating and time.time() < deadline:
        time.sleep(0.01)
    assert wb.cache.batcher.generating == 0 and wb.cache.batcher.waiting == 0  # stopped long before 200 tokens
    assert left["session"].messages == []  # the abandoned answer did not enter the tab's conversation
    history, state, _ = _drain(wb.chat(str(folder), str(example_image), "and now?", [], left, 3, 0.0, 1.0))
    assert history[-1]["content"] and len(state["session"].messages) == 2  # the worker serves the next one


def test_every_options_box_refuses_bad_json_in_one_line(wb, tiny_llm_dir):
    for bad, message in (("{nope", "Loader options are not valid JSON"), ("[1, 2]", "must be a JSON object")):
        with pytest.raises(gr.Error, match=message):
            wb.preview("easy-vqa", bad)
        with pytest.raises(gr.Error, match=message):  # the custom launch's data options (was an "Unexpected error")
            wb.launch(*CUSTOM, "easy-vqa", bad, "single-stage", "", 4, 1e-3, 1, 0, 0, False, "mobilenet_v2", "mlp",
                      str(tiny_llm_dir), "none", *form(wb, "mlp"))
    with pytest.raises(gr.Error, match="Evaluation data options must be a JSON object"):
        wb.evaluate("some-run", "easy-vqa", '"test"', 8, "none", progress=lambda *a, **k: None)
