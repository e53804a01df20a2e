"""One `evaluate()` for every task: metrics against hand-computed values (BLEU-4, CIDEr-D, accuracy by question
type, multiple choice), the task picked from the data, a caption stage's best model chosen by CIDEr-D, and every
front end (command line, course helpers, trainer, app, benchmarks) going through it."""
import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench import evaluation
from workbench.caption_metrics import bleu4, cider_d, cider_d_scores
from workbench.config import DataSpec
from workbench.data.samples import Sample, SampleDataset
from workbench.errors import ConfigError
from workbench.evaluation import choice_matches, evaluate, infer_task

REPO = Path(__file__).resolve().parents[1]


def _sample(question, answer, **meta):
    return Sample([{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
                  ["unused.png"], {"answer": answer, **meta})


class Scripted:
    """Answers from a script, one list per generate call: the metric, not the model, is under test."""

    training, num_visual_tokens, device = False, 4, torch.device("cpu")
    config = SimpleNamespace(image_token="<image>")

    def __init__(self, *script):
        self.script, self.calls = list(script), []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def parameter_report(self):
        return [{"component": "total", "total": 100, "trainable": 10, "trainable_pct": 10.0}]

    def generate(self, prompts, images, max_new_tokens):
        self.calls.append({"prompts": prompts, "images": images, "max_new_tokens": max_new_tokens})
        return self.script[len(self.calls) - 1][:len(prompts)]


# ------------------------------------------------------------------ metrics by hand
def test_bleu4_known_values():
    assert bleu4(["a red circle on a white background"], [["a red circle on a white background"]]) == pytest.approx(1.0)
    assert bleu4(["blue square"], [["a red circle on a white background"]]) == 0.0
    # 7/8 unigrams (one 'the' clipped), 5/7 bigrams, 3/6 trigrams, 2/5 4-grams; longer than the reference: no penalty
    pred, ref = "the red circle is on the white paper", "the red circle is on white paper"
    expected = math.exp((math.log(7 / 8) + math.log(5 / 7) + math.log(3 / 6) + math.log(2 / 5)) / 4)
    assert bleu4([pred], [[ref]]) == pytest.approx(expected)


def test_bleu4_is_corpus_level():
    # counts add up over the corpus: 6/7 unigrams, 3/5 bigrams, 2/3 trigrams, 1/1 4-grams, 7 words against 7.
    # (The mean of sentence BLEUs would be 0.5: the second caption alone has no matching bigram.)
    preds, refs = ["a big red circle", "a blue square"], [["a big red circle"], ["a green square"]]
    expected = math.exp((math.log(6 / 7) + math.log(3 / 5) + math.log(2 / 3) + math.log(1)) / 4)
    assert bleu4(preds, refs) == pytest.approx(expected)


def test_brevity_penalty_and_multiple_references():
    short = bleu4(["a red circle on"], [["a red circle on a white background"]])
    assert short == pytest.approx(math.exp(1 - 7 / 4))
    assert bleu4(["a red circle on"], [["nothing alike", "a red circle on"]]) == pytest.approx(1.0)


def test_cider_d_by_hand():
    # Two images. Weights are tf × (log 2 − log df): "a" and "circle" are in both references (weight 0), every
    # other n-gram in one or none (weight log 2). "a red circle" equals its reference: cosine 1 for n = 1, 2, 3 and
    # no 4-grams. "a blue square" shares {blue} of {blue, square} (cosine 1/√2) and {a blue} of two bigrams (1/2).
    scores = cider_d_scores(["a red circle", "a blue square"], [["a red circle"], ["a blue circle"]])
    assert scores == pytest.approx([10 * (1 + 1 + 1 + 0) / 4, 10 * (1 / math.sqrt(2) + 1 / 2) / 4])
    # one word shorter than the reference: the Gaussian length penalty exp(−1² / 2σ²), σ = 6
    # "a red": unigrams {red} against {red} (cosine 1), bigram {a red} against {a red, red circle} (1/√2)
    shorter = cider_d_scores(["a red", "a blue circle"], [["a red circle"], ["a blue circle"]])[0]
    assert shorter == pytest.approx(10 * (1 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72))


def test_cider_orders_captions_sensibly():
    refs = [["a red circle"], ["a blue triangle"], ["a green rectangle"]]
    perfect = cider_d(["a red circle", "a blue triangle", "a green rectangle"], refs)
    partial = cider_d(["a red triangle", "a blue circle", "a green circle"], refs)
    wrong = cider_d(["the sky", "some water", "an apple"], refs)
    assert perfect > partial > wrong == 0.0
    assert perfect == pytest.approx(10.0 * (1 + 1 + 1 + 0) / 4, rel=1e-6)


def test_choice_by_letter_or_text():
    options = ["circle", "triangle", "rectangle"]
    assert [choice_matches(p, options, "triangle") for p in ("B", "(b) triangle", "triangle.", "circle", "D")] == \
        [True, True, True, False, False]
    assert choice_matches("A", options, "a") and choice_matches("a circle", options, "A")  # "a circle" is text


# ------------------------------------------------------------------ evaluate() per task
def test_vqa_accuracy_by_question_type():
    data = SampleDataset([_sample("is it red?", "yes", question_type="yes/no"),
                          _sample("is it blue?", "no", question_type="yes/no"),
                          _sample("what colour?", "red", question_type="color"),
                          _sample("what shape?", "circle", question_type="shape")])
    model = Scripted(["Yes.", "yes", "Red, I think", "square"])
    result = evaluate(model, data)
    assert result["task"] == "vqa" and result["metric"] == "accuracy"
    assert result["score"] == result["accuracy"] == pytest.approx(2 / 4)
    assert result["by_type"] == {"color": 1.0, "shape": 0.0, "yes/no": 0.5}
    assert result["count"] == 4 and result["examples"][1] == {"question": "<image>\nis it blue?", "answer": "no",
                                                              "prediction": "yes", "correct": False}
    assert model.calls[0]["max_new_tokens"] == evaluation.ANSWER_TOKENS["vqa"]
    assert result["trainable_pct"] == 10.0 and result["visual_tokens"] == 4 and result["seconds"] >= 0


def test_captions_bleu_and_cider():
    data = SampleDataset([_sample("describe it.", "a red circle", caption="a red circle"),
                          _sample("describe it.", "a blue circle", captions=["a blue circle", "one blue ring"])])
    preds = ["a red circle", "a blue square"]
    result = evaluate(Scripted(preds), data)
    refs = [["a red circle"], ["a blue circle", "one blue ring"]]
    assert result["task"] == "captions" and result["metric"] == "cider"
    assert result["score"] == result["cider"] == pytest.approx(cider_d(preds, refs))
    assert result["bleu4"] == pytest.approx(bleu4(preds, refs)) and result["by_type"] == {}
    assert result["examples"][1]["references"] == refs[1]


def test_multiple_choice_accuracy():
    options = ["circle", "triangle", "rectangle"]
    data = SampleDataset([_sample("which shape? A circle B triangle C rectangle", a, choices=options,
                                  question_type=t) for a, t in (("triangle", "shape"), ("B", "shape"), ("circle", "x"))])
    result = evaluate(Scripted(["B", "triangle.", "(c)"]), data)
    assert result["task"] == "multiple_choice" and result["score"] == pytest.approx(2 / 3)
    assert result["by_type"] == {"shape": 1.0, "x": 0.0}


def test_task_from_the_data_and_text_only():
    assert infer_task([_sample("q", "yes"), _sample("q", "red")]) == "vqa"
    assert infer_task([_sample("q", "a cat", caption="a cat")] * 2 + [_sample("q", "yes")]) == "captions"
    data = SampleDataset([_sample("what colour?", "red")])
    model = Scripted(["red"], ["a red thing"])
    assert evaluate(model, data, text_only=True)["visual_tokens"] == 0
    assert model.calls[0]["prompts"] == [[{"role": "user", "content": "what colour?"}]]
    assert model.calls[0]["images"] == [[]]
    result = evaluate(model, data, "captions", max_new_tokens=3)  # a named task overrides the data's
    assert result["task"] == "captions" and model.calls[1]["max_new_tokens"] == 3
    with pytest.raises(ConfigError, match="tasks: vqa, captions, multiple_choice"):
        evaluate(model, data, "ranking")


def test_a_saved_model_folder_and_a_data_spec(tiny_model, llava_data, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "saved")
    result = evaluate(folder, DataSpec(kind="llava", options={"json_path": str(llava_data)}), limit=3,
                      batch_size=2, max_new_tokens=2, precision="fp32")
    assert result["task"] == "vqa" and result["count"] == 3 and 0.0 <= result["score"] <= 1.0
    assert evaluate(folder, "llava", options={"json_path": str(llava_data)}, limit=2, max_new_tokens=1)["count"] == 2


def test_caption_evaluation_runs_on_a_model(tiny_model, example_image):
    data = SampleDataset([Sample([{"role": "user", "content": "<image>\ndescribe the image ."},
                                  {"role": "assistant", "content": "a red circle"}], [example_image],
                                 {"caption": "a red circle"})] * 3)
    tiny_model.train()
    result = evaluate(tiny_model, data, batch_size=2, max_new_tokens=4)
    assert result["task"] == "captions" and result["count"] == 3
    assert 0.0 <= result["bleu4"] <= 1.0 and result["cider"] >= 0.0
    assert tiny_model.training  # evaluated in eval mode, then put back as it was


# ------------------------------------------------------------------ the trainer picks its best model by the task
def test_caption_stage_best_model_is_chosen_by_cider(tiny_model, example_image, tmp_path):
    from workbench.config import RunConfig, StageSpec, TrainingSpec
    from workbench.training.metrics import read_metrics
    from workbench.training.trainer import Trainer

    captions = ["a red circle on a white background", "a blue square on a black background",
                "a green triangle on a grey background", "a yellow star on a pink background"]

    def dataset(n):
        return SampleDataset([Sample([{"role": "user", "content": "<image>\ndescribe the image ."},
                                      {"role": "assistant", "content": c}], [example_image], {"caption": c})
                              for c in (captions * n)[:n]])

    # Neither script gets a caption exactly right, so exact-match accuracy is 0 at every evaluation and the first
    # would stay "best"; CIDEr-D sees that the second evaluation's captions are nearly right.
    garbage = ["nothing to see"] * 4
    close = [c.replace("background", "page") for c in captions]
    calls, saved, save = [], [], tiny_model.save_pretrained

    def generate(prompts, images, max_new_tokens):
        calls.append(len(prompts))
        return [garbage, close, garbage][len(calls) - 1][:len(prompts)]

    def save_pretrained(path, *args, **kwargs):
        saved.append((Path(path).name, len(calls)))  # which evaluation the saved model had just had
        return save(path, *args, **kwargs)

    tiny_model.generate, tiny_model.save_pretrained = generate, save_pretrained
    run = RunConfig(model=tiny_model.config, stages=[StageSpec(name="align", epochs=1)],
                    training=TrainingSpec(batch_size=4, eval_every=1, log_every=1, cache_features=False,
                                          warmup_ratio=0.0))
    trainer = Trainer(run, tmp_path / "run", model=tiny_model, datasets={"align": dataset(8)},
                      eval_dataset=dataset(4))
    assert trainer.train()["status"] == "completed"
    evals = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert [e["metric"] for e in evals] == ["cider"] * 3 and "accuracy" not in evals[0]
    assert evals[0]["score"] == 0.0 < evals[1]["score"] and evals[1]["score"] == evals[1]["cider"]
    assert [n for name, n in saved if name == "best"] == [1, 2]  # the close captions replaced the first best


# ------------------------------------------------------------------ every front end goes through evaluate()
@pytest.fixture()
def fake_evaluate(monkeypatch):
    calls = []

    def fake(model_or_dir, data, task=None, **kwargs):
        calls.append({"model": model_or_dir, "data": data, "task": task, **kwargs})
        return {"task": "vqa", "metric": "accuracy", "score": 0.5, "accuracy": 0.5, "by_type": {"color": 0.5},
                "count": 2, "examples": [], "text_only": kwargs.get("text_only", False), "seconds": 1.0,
                "samples_per_s": 2.0, "total_params": 100, "trainable_params": 10, "trainable_pct": 10.0,
                "visual_tokens": 4, "device": "cpu"}

    monkeypatch.setattr(evaluation, "evaluate", fake)
    return calls


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_front_end_calls_evaluate(fake_evaluate, tiny_model, tmp_path, monkeypatch, capsys):
    from workbench import frontend
    from workbench.cli import main
    from workbench.training.trainer import Trainer

    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    data = SampleDataset([_sample("what colour?", "red")])

    # 1. workbench eval
    assert main(["eval", str(model_dir), "--data", "easy-vqa", "--limit", "5", "--precision", "fp32"]) == 0
    assert "accuracy 0.5000 on 2 questions" in capsys.readouterr().out
    call = fake_evaluate[-1]
    assert call["model"] == model_dir and call["data"] == DataSpec(kind="easy-vqa", options={"split": "test"})
    assert call["limit"] == 5 and call["precision"] == "fp32"
    assert json.loads((model_dir / "eval-easy-vqa-vqa.json").read_text())["peak_memory_mb"] >= 0

    # 2. frontend.evaluate_runs (the notebooks' comparisons)
    registry = SimpleNamespace(run_dir=lambda run_id: tmp_path)
    monkeypatch.setattr(frontend, "run_summary", lambda r, run_id: {
        "id": run_id, "status": "completed", "text_only": True, "trainable_pct": None, "trainable_params": 5})
    (row,) = frontend.evaluate_runs(registry, ["r1"], data)
    assert fake_evaluate[-1]["model"] == model_dir and fake_evaluate[-1]["text_only"] is True
    assert row["accuracy"] == 0.5 and row["trainable_pct"] == 5.0 and row["eval_s"] == 1.0

    # 3. the trainer's evaluation (best model, early stopping)
    logged = []
    trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext), model=tiny_model,
                              run=SimpleNamespace(training=SimpleNamespace(batch_size=2), text_only=False),
                              _log=lambda kind, **row: logged.append(row))
    assert Trainer._evaluate(trainer, data, 0, 7) == 0.5
    assert fake_evaluate[-1]["model"] is tiny_model and logged[-1]["score"] == 0.5 and logged[-1]["step"] == 7

    # 4 and 5. the app's Evaluate tab: the model, and the same model with the images withheld
    app = _load("workbench_app_eval_test", REPO / "workbench" / "app.py")
    wb = app.Workbench(tmp_path / "runs")
    wb.cache = SimpleNamespace(lock=contextlib.nullcontext(), get=lambda run_id: tiny_model)
    before = len(fake_evaluate)
    table, _, efficiency = wb.evaluate("r1", "easy-vqa", '{"split": "test"}', 8, app.WITHHELD,
                                       progress=lambda *a, **k: None)
    assert [c.get("text_only", False) for c in fake_evaluate[before:]] == [False, True]
    assert table["data"][0] == ["overall", "50.0%", "50.0%"] and "10.00% trainable" in efficiency

    # 6. the benchmarks' evaluation of a saved model
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    runs = _load("bench_runs_eval_test", REPO / "bench" / "_runs.py")
    result = runs.evaluate(model_dir, 100, text_only=True)
    assert fake_evaluate[-1]["model"] == model_dir and fake_evaluate[-1]["limit"] == 100
    assert result["eval_s"] == 1.0 and "examples" not in result
    assert len(fake_evaluate) == 6
    sys.modules.pop("_common", None)
