"""Pictures where people look: the drawn architecture (token counts on the arrows, in-LLM modules inside the layer
stack where they sit, trainable parts highlighted) built on the meta device, evaluation scores as percentages and
bars beside the text-only baseline, and the app's Evaluate tab on any data kind (LLaVA JSON, captions)."""
import copy
import csv
import json

import gradio as gr
import pytest
from conftest import image_beside

import workbench.app as app_module
from workbench import frontend
from workbench.config import DataSpec, IntegratorSpec, PeftSpec, RunConfig
from workbench.diagrams import FROZEN, INTEGRATOR_EDGE, PEFT_EDGE, TRAINABLE, architecture, architecture_figure
from workbench.evaluation_figures import by_type_text, format_score, score_table, scores_figure

QUIET = {"progress": lambda *a, **k: None}


def _config(tiny_config, integrator="mlp", options=None, peft="none"):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options=options or {})
    config.peft = PeftSpec(method=peft)
    return config


def _shapes(fig) -> dict:
    return {s.name: s for s in fig.layout.shapes}


def _annotation(fig, name) -> str:
    return " ".join(a.text for a in fig.layout.annotations if a.name == name and a.text)


def test_prefix_model_drawn_with_its_token_counts(tiny_config, monkeypatch):
    from workbench.model import VisionLanguageModel

    built = []
    real = VisionLanguageModel.from_config.__func__
    monkeypatch.setattr(VisionLanguageModel, "from_config",
                        classmethod(lambda cls, config, device=None: built.append(device) or real(cls, config, device)))
    facts = frontend.describe_config(_config(tiny_config, "avg_pool", {"num_tokens": 1}))["architecture"]
    assert built == ["meta"]  # drawn from shapes alone: no weights loaded
    fig = architecture_figure(facts)
    shapes = _shapes(fig)
    layers = facts["parts"]["llm"]["layers"]
    assert layers == 2 and [f"llm layer {i}" in shapes for i in range(3)] == [True, True, False]
    assert "4 tokens (2×2)" in _annotation(fig, "tokens encoder→integrator")  # 64 px MobileNetV3: a 2×2 grid
    assert _annotation(fig, "tokens integrator→llm").startswith("1 visual token<br>")  # pooled to one token
    assert shapes["integrator"].fillcolor == TRAINABLE and shapes["encoder"].fillcolor == FROZEN
    assert shapes["llm layer 0"].fillcolor == FROZEN
    assert not [n for n in shapes if " in layer " in n]  # nothing of a prefix integrator inside the LLM


def test_visual_tokens_entering_above_the_embeddings_point_at_their_layer(tiny_config):
    config = _config(tiny_config)
    config.visual_entry_layer = -1
    facts = frontend.describe_config(config)["architecture"]
    assert facts["parts"]["integrator"]["entry_layer"] == 1
    fig = architecture_figure(facts)
    assert _annotation(fig, "tokens integrator→llm").endswith("enter at layer 1")
    assert "image slots" in _annotation(fig, "llm embeddings")
    flat = architecture_figure(frontend.describe_config(_config(tiny_config))["architecture"])
    assert "enter at layer" not in _annotation(flat, "tokens integrator→llm")


def test_in_llm_integrators_and_peft_are_drawn_inside_their_layers(tiny_config):
    for integrator, options, expected in (("gated_xattn", {"every": 2}, [0]), ("llama_adapter", {"num_layers": 1}, [1]),
                                          ("lavin_mma", {"layers": "all"}, [0, 1])):
        facts = frontend.describe_config(_config(tiny_config, integrator, options))["architecture"]
        assert facts["parts"]["integrator"]["layers"] == expected, integrator
        shapes = _shapes(architecture_figure(facts))
        inside = sorted(int(n.rsplit(" ", 1)[1]) for n in shapes if n.startswith("integrator in layer"))
        assert inside == expected, integrator
        assert all(shapes[f"integrator in layer {i}"].line.color == INTEGRATOR_EDGE for i in inside)
        assert shapes["integrator bracket"] is not None
    facts = frontend.describe_config(_config(tiny_config, "mlp", peft="lora"))["architecture"]
    fig = architecture_figure(facts)
    shapes = _shapes(fig)
    assert shapes["lora in layer 0"].line.color == PEFT_EDGE and shapes["lora in layer 1"].fillcolor == TRAINABLE
    assert "lora" in _annotation(fig, "llm title") and "all 2 layers" in _annotation(fig, "llm title")
    prompt = frontend.describe_config(_config(tiny_config, "mlp", peft="prompt_tuning"))["architecture"]
    assert prompt["parts"]["peft"]["layers"] == [] and prompt["parts"]["peft"]["virtual_tokens"] > 0
    assert "virtual tokens before layer 0" in _annotation(architecture_figure(prompt), "llm title")


def test_a_run_config_highlights_what_its_stages_train(tiny_config):
    run = RunConfig(name="r", model=_config(tiny_config), paradigm="two-stage", data=DataSpec(kind="easy-vqa"))
    facts = frontend.describe_config(run)["architecture"]
    assert facts["parts"]["llm"]["stages"] == ["instruct"] and facts["parts"]["encoder"]["trainable"] is False
    fig = architecture_figure(facts)
    assert _shapes(fig)["llm layer 1"].fillcolor == TRAINABLE and "instruct: integrator + llm" in fig.layout.title.text
    single = architecture_figure(frontend.describe_config(RunConfig(name="s", model=_config(tiny_config),
                                                                    paradigm="single-stage",
                                                                    data=DataSpec(kind="easy-vqa")))["architecture"])
    assert _shapes(single)["llm layer 1"].fillcolor == FROZEN and "align: integrator" in single.layout.title.text


def test_without_stages_requires_grad_decides(tiny_model):
    assert architecture(tiny_model)["parts"]["llm"]["trainable"] is False
    tiny_model.set_trainable(llm=True, integrator=False)
    parts = architecture(tiny_model)["parts"]
    assert parts["llm"]["trainable"] is True and parts["integrator"]["trainable"] is False


VQA = {"task": "vqa", "metric": "accuracy", "accuracy": 0.975, "score": 0.975,
       "by_type": {"color": 1.0, "shape": 0.95}}
BASE = {"task": "vqa", "metric": "accuracy", "accuracy": 0.5, "score": 0.5, "by_type": {"color": 0.25, "shape": 0.75}}


def test_scores_in_percent_and_caption_metrics_in_their_unit():
    assert format_score(0.975) == "97.5%" and format_score(1.0) == "100.0%" and format_score(None) == "—"
    assert format_score(0.41234, "cider") == "0.412" and format_score(float("nan"), "bleu4") == "—"
    assert by_type_text({"shape": 0.95, "color": 1.0}) == "color 100.0% · shape 95.0%"
    assert by_type_text({"plain": 1.234}, "cider") == "plain 1.234" and by_type_text(None) == ""
    table = score_table(VQA, BASE)
    assert table["headers"] == ["question type", "accuracy", "text-only baseline"]
    assert table["data"] == [["overall", "97.5%", "50.0%"], ["color", "100.0%", "25.0%"], ["shape", "95.0%", "75.0%"]]
    assert [row[2] for row in score_table(VQA)["data"]] == ["", "", ""]
    captions = {"task": "captions", "metric": "cider", "cider": 0.8, "bleu4": 0.2, "score": 0.8, "by_type": {}}
    table = score_table(captions, {**captions, "cider": 0.1, "bleu4": 0.05})
    assert table["headers"][1] == "CIDEr-D"
    assert table["data"] == [["all (CIDEr-D)", "0.800", "0.100"], ["all (BLEU-4)", "0.200", "0.050"]]


def test_bars_per_question_type_beside_the_baseline():
    fig = scores_figure(VQA, BASE)
    model, baseline = fig.data
    assert list(model.x) == ["overall", "color", "shape"] and list(model.y) == pytest.approx([97.5, 100.0, 95.0])
    assert list(baseline.y) == pytest.approx([50.0, 25.0, 75.0]) and list(model.text)[0] == "97.5%"
    assert fig.layout.yaxis.range[1] > 100 and "(%)" in fig.layout.yaxis.title.text
    alone = scores_figure({"task": "captions", "metric": "cider", "cider": 2.5, "by_type": {}})
    assert len(alone.data) == 1 and list(alone.data[0].y) == [2.5] and alone.layout.yaxis.range[1] > 2.5


# ------------------------------------------------------------------ the app's Evaluate tab on any data

@pytest.fixture()
def wb(tmp_path):
    return app_module.Workbench(tmp_path / "runs")


@pytest.fixture()
def saved_model(tiny_model, tmp_path):
    return str(tiny_model.save_pretrained(tmp_path / "saved"))


def test_evaluate_llava_json_by_question_type(wb, saved_model, tmp_path):
    rows = [{"id": str(i), "image": image_beside(tmp_path / "data"), "meta": {"question_type": kind},
             "conversations": [{"from": "human", "value": f"<image>\nwhat {kind} is it?"},
                               {"from": "gpt", "value": answer}]}
            for i, (kind, answer) in enumerate([("color", "red"), ("shape", "circle")] * 3)]
    (tmp_path / "data" / "qa.json").write_text(json.dumps(rows))
    options = json.dumps({"json_path": str(tmp_path / "data" / "qa.json")})
    table, bars, summary = wb.evaluate(saved_model, "llava", options, 4, app_module.WITHHELD, **QUIET)
    assert table["headers"][1] == "accuracy" and [r[0] for r in table["data"]] == ["overall", "color", "shape"]
    assert all(cell.endswith("%") for row in table["data"] for cell in row[1:])
    assert [t.name for t in bars.data] == ["with the image", "text-only baseline"]
    assert list(bars.data[0].x) == ["overall", "color", "shape"]
    assert "**vqa**" in summary and "4 questions" in summary and "without the images" in summary
    with pytest.raises(gr.Error, match="not found"):
        wb.evaluate(saved_model, "llava", json.dumps({"json_path": str(tmp_path / "nowhere.json")}), 4, "none", **QUIET)
    with pytest.raises(gr.Error, match="not valid JSON"):
        wb.evaluate(saved_model, "llava", "{json_path", 4, "none", **QUIET)
    with pytest.raises(gr.Error, match="json_path"):  # a loader option it does not take: says what it takes
        wb.evaluate(saved_model, "llava", json.dumps({"folder": "x"}), 4, "none", **QUIET)


def test_evaluate_captions_by_cider_not_percent(wb, saved_model, tmp_path):
    folder = tmp_path / "pics"
    name = image_beside(folder)
    with open(folder / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows([[name, "a red circle"], [name, "a red round shape"], [name, "red circle on white"]])
    table, bars, summary = wb.evaluate(saved_model, "captions", json.dumps({"folder_or_file": str(folder)}), 3,
                                       "none", **QUIET)
    assert table["headers"][1] == "CIDEr-D" and table["data"][0][0] == "all (CIDEr-D)"
    assert table["data"][1][0] == "all (BLEU-4)" and not any(c.endswith("%") for r in table["data"] for c in r[1:])
    assert "**captions**" in summary and "CIDEr-D" in summary and len(bars.data) == 1


def test_train_tab_evaluations_read_as_percentages(wb, monkeypatch):
    progress = {"fraction": None, "status": "running", "reason": "", "loss": None, "lr": None, "samples_per_s": None,
                "memory_mb": None, "stage": "align", "step": 20, "history": [], "log": "",
                "evals": [{"step": 10, "metric": "accuracy", "score": 0.625, "by_type": {"shape": 0.5, "color": 0.75}},
                          {"step": 20, "metric": "cider", "score": 1.5, "by_type": {}}]}
    monkeypatch.setattr(frontend, "run_progress", lambda registry, run_id: progress)
    monkeypatch.setattr(frontend, "curves_figure", lambda runs: None)
    _, _, evals, _ = wb.progress("some-run")
    assert evals == [[10, "accuracy 62.5%", "color 75.0% · shape 50.0%"], [20, "CIDEr-D 1.500", ""]]


def test_every_data_options_template_is_what_its_loader_takes():
    import inspect

    from workbench.data import DATASETS

    for templates in (app_module.DEFAULT_DATA_OPTIONS, app_module.EVAL_DATA_OPTIONS):
        for kind, options in templates.items():
            assert set(options) <= set(inspect.signature(DATASETS.get(kind)).parameters), kind
