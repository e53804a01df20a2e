"""Library helpers the course notebooks use (and the app may): CSV → LLaVA conversion, the toy farm set,
watching a queue of background runs, comparing finished runs, exporting a run's model."""
import copy
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from workbench import frontend
from workbench.config import DataSpec, RunConfig, StageSpec, TrainingSpec
from workbench.data.llava import load_llava_json
from workbench.data.loaders import load_dataset_spec
from workbench.data.table import CAPTION_PROMPT, load_image_table, table_to_llava
from workbench.errors import ConfigError
from conftest import image_beside

REPO = Path(__file__).resolve().parents[1]
FARM = REPO / "examples" / "data" / "toy_farm"


# ---------------------------------------------------------------- the toy farm set

@pytest.mark.parametrize("split,count", [("train", 156), ("test", 39)])
def test_toy_farm_loads_with_zero_bad_rows(split, count):
    data = load_llava_json(FARM / f"{split}.json", on_error="raise")
    assert data.report.num_skipped == 0 and len(data) == count
    assert all(Path(s.images[0]).is_file() for s in data)
    assert {s.meta["question_type"] for s in data} <= {"name", "category", "colour", "caption"}
    assert {s.meta["split"] for s in data} == {split}


def test_toy_farm_is_small_and_credited():
    size = sum(p.stat().st_size for p in FARM.rglob("*") if p.is_file())
    assert size < 1_000_000
    readme = (FARM / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Twemoji" in readme and "toy" in readme


def test_toy_farm_csv_converts_to_the_committed_reference(tmp_path):
    for split in ("train", "test"):
        out, report = table_to_llava(FARM / "questions.csv", tmp_path / f"{split}.json", split=split)
        assert report.num_skipped == (2 if split == "train" else 0)
        ours, reference = json.loads(out.read_text()), json.loads((FARM / f"{split}.json").read_text())
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference):
            assert (a["id"], a["conversations"], a["meta"]) == (b["id"], b["conversations"], b["meta"])
            assert Path(a["image"]).name.endswith(Path(b["image"]).name)  # copied next to the new JSON


# ---------------------------------------------------------------- image,question,answer CSV

def _csv(tmp_path, lines):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.csv"


def test_image_table_counts_bad_rows_and_makes_captions(tmp_path):
    path = _csv(tmp_path, ["image,question,answer,question_type",
                           "red.png,What colour is it?,red,colour",
                           "red.png,,A red square.,caption",
                           "gone.png,What colour is it?,red,colour",
                           "red.png,What colour is it?,,colour",
                           "red.png,What colour is it?,red,colour,extra"])
    data = load_image_table(path)
    assert len(data) == 2
    assert data.report.skipped == {"missing image": 1, "empty answer": 1, "malformed row": 1}
    vqa, caption = data[0], data[1]
    assert vqa.messages[0]["content"] == "<image>\nWhat colour is it?" and vqa.meta["question_type"] == "colour"
    assert caption.messages[0]["content"] == "<image>\n" + CAPTION_PROMPT and caption.meta["answer"] == "A red square."
    with pytest.raises(ConfigError, match="line 4"):
        load_image_table(path, on_error="raise")
    assert len(load_dataset_spec("image-table", csv_path=str(path))) == 2


def test_image_table_names_missing_columns(tmp_path):
    with pytest.raises(ConfigError, match="missing answer"):
        load_image_table(_csv(tmp_path, ["image,question", "red.png,What?"]))
    with pytest.raises(ConfigError, match="no split column"):
        load_image_table(_csv(tmp_path, ["image,answer", "red.png,red"]), split="train")


def test_table_to_llava_output_loads_cleanly(tmp_path):
    path = _csv(tmp_path, ["image,question,answer", "red.png,What colour is it?,red", "gone.png,What?,x"])
    out, report = table_to_llava(path, tmp_path / "out" / "data.json")
    assert report.kept == 1 and report.num_skipped == 1
    data = load_llava_json(out, on_error="raise")
    assert len(data) == 1 and data[0].meta["answer"] == "red" and Path(data[0].images[0]).is_file()


# ---------------------------------------------------------------- watching a queue of runs

class _FakeRegistry:
    """Runs that finish `steps` polls after they start: enough to check the scheduling."""

    def __init__(self, ids, steps=2):
        self.status = {i: "created" for i in ids}
        self.polls = {i: 0 for i in ids}
        self.steps = steps
        self.started = []

    def get(self, run_id):
        if self.status[run_id] == "running":
            self.polls[run_id] += 1
            if self.polls[run_id] > self.steps:
                self.status[run_id] = "completed"
        return {"id": run_id, "status": self.status[run_id]}

    def start(self, run_id):
        assert self.status[run_id] == "created"
        self.status[run_id] = "running"
        self.started.append(run_id)


@pytest.fixture()
def fake_progress(monkeypatch):
    monkeypatch.setattr(frontend, "run_progress", lambda registry, run_id, log_lines=3: {
        "id": run_id, "status": registry.status[run_id]})


def test_watch_runs_starts_one_at_a_time_and_reports(fake_progress):
    registry = _FakeRegistry(["a", "b", "c"])
    seen = []
    final = frontend.watch_runs(registry, ["a", "b", "c"], parallel=1, poll=0, on_update=seen.append)
    assert [p["status"] for p in final] == ["completed"] * 3 and registry.started == ["a", "b", "c"]
    assert all(sum(p["status"] == "running" for p in update) <= 1 for update in seen)


def test_watch_runs_parallel_timeout_and_interrupt(fake_progress):
    registry = _FakeRegistry(["a", "b", "c"], steps=10**6)
    progress = frontend.watch_runs(registry, ["a", "b", "c"], parallel=2, timeout=0, poll=0)
    assert [p["status"] for p in progress] == ["running", "running", "created"]  # watching stopped, runs go on

    def interrupt(_):
        raise KeyboardInterrupt

    assert frontend.watch_runs(registry, ["a"], poll=0, on_update=interrupt) == [{"id": "a", "status": "running"}]
    with pytest.raises(ConfigError):
        frontend.watch_runs(registry, ["a"], parallel=0)


# ---------------------------------------------------------------- comparing and exporting real runs

@pytest.fixture()
def finished_run(tiny_config, example_image, tmp_path):
    from workbench.jobs import RunRegistry

    rows = [{"id": str(i), "image": image_beside(tmp_path), "meta": {"question_type": "colour"},
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": "red"}]} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    run = RunConfig(name="tiny", model=copy.deepcopy(tiny_config), stages=[StageSpec(name="align", epochs=1.0)],
                    data=DataSpec(kind="llava", options={"json_path": str(tmp_path / "data.json")}),
                    training=TrainingSpec(batch_size=2, log_every=1, warmup_ratio=0.0, cache_features=False))
    registry = RunRegistry(tmp_path / "runs")
    run_id = registry.create(run)
    pending = registry.create(copy.deepcopy(run))  # never started
    registry.start(run_id)
    assert registry.wait(run_id, timeout=180)["status"] == "completed", registry.log_tail(run_id)
    return registry, run_id, pending, load_llava_json(tmp_path / "data.json")


def test_run_summary_evaluate_runs_and_figure(finished_run):
    registry, run_id, pending, data = finished_run
    summary = frontend.run_summary(registry, run_id)
    assert summary["status"] == "completed" and summary["steps"] == 2 and summary["trainable_params"] > 0
    assert summary["wall_s"] > 0 and summary["train_s"] > 0 and summary["peak_mb"] > 0
    done, waiting = frontend.evaluate_runs(registry, [run_id, pending], data, batch_size=4, max_new_tokens=2)
    assert done["count"] == 4 and 0 <= done["accuracy"] <= 1 and set(done["by_type"]) == {"colour"}
    assert 0 < done["trainable_pct"] < 100 and done["visual_tokens"] > 0
    assert waiting["accuracy"] is None and waiting["status"] == "created"
    fig = frontend.comparison_figure([done, waiting])
    assert len(fig.data) == 1 and list(fig.data[0].x) == ["overall", "colour"]


def test_export_model_zips_inside_the_run_folder(finished_run, tmp_path):
    from workbench.model import VisionLanguageModel

    registry, run_id, pending, _ = finished_run
    path = frontend.export_model(registry, run_id)
    assert path.parent == registry.run_dir(run_id) / "export" and path.suffix == ".zip"
    with zipfile.ZipFile(path) as zf:
        assert "model/config.yaml" in zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    assert VisionLanguageModel.from_pretrained(tmp_path / "unzipped" / "model").num_visual_tokens > 0
    with pytest.raises(ConfigError, match="no saved model"):
        frontend.export_model(registry, pending)


def test_runs_list_reports_trainable_share(finished_run):
    registry, run_id, pending, _ = finished_run
    row = next(r for r in frontend.run_rows(registry) if r["id"] == run_id)
    assert row["trainable_params"] > 0 and 0 < row["trainable_pct"] < 100


# ---------------------------------------------------------------- front-end run configs keep the recipe's shape

def test_run_config_scales_learning_rates_and_keeps_given_stages(tiny_config):
    data = DataSpec(kind="easy-vqa", options={"split": "train"})
    default = frontend.run_config(copy.deepcopy(tiny_config), data, "two-stage", lr=None, epochs=None)
    assert [s.lr for s in default.stages] == [1e-3, 2e-4] and default.stages[1].lr_llm == 2e-5
    faster = frontend.run_config(copy.deepcopy(tiny_config), data, "two-stage", lr=5e-3, max_minutes=4)
    assert [s.lr for s in faster.stages] == pytest.approx([5e-3, 1e-3])  # instruct keeps its 5x lower rate
    assert faster.stages[1].lr_llm == 2e-5 and [s.max_minutes for s in faster.stages] == [2, 2]
    own = [StageSpec(name="align", data=DataSpec(kind="emoji-captions", options={"limit": 20}), lr=1e-3, epochs=2),
           StageSpec(name="instruct", llm="full", lr=2e-4, epochs=1)]
    run = frontend.run_config(copy.deepcopy(tiny_config), data, "two-stage", lr=None, epochs=None, stages=own)
    assert [(s.name, s.data.kind, s.epochs) for s in run.stages] == [
        ("align", "emoji-captions", 2), ("instruct", "easy-vqa", 1)]
    assert own[1].data is None  # the caller's stages are not modified
    own[0].max_minutes, own[1].max_minutes = 2, 8  # a recipe's own budgets keep their ratio when scaled
    scaled = frontend.run_config(copy.deepcopy(tiny_config), data, "two-stage", lr=None, epochs=None, stages=own,
                                 max_minutes=5)
    assert [s.max_minutes for s in scaled.stages] == [1, 4]


def test_progress_markdown_names_runs_and_shows_eta_only_while_running():
    from workbench.notebook import progress_markdown

    table = progress_markdown([
        {"id": "a", "status": "running", "reason": "", "stage": "adapt", "step": 12, "loss": 0.51234, "fraction": 0.25,
         "eta_s": 90},
        {"id": "b", "status": "failed", "reason": "killed", "stage": None, "step": None, "loss": None,
         "fraction": None, "eta_s": 10}], {"a": "direct"})
    lines = table.splitlines()
    assert lines[0].startswith("| run | status") and len(lines) == 4
    assert lines[2].startswith("| direct | running") and "0.512" in lines[2] and "25%" in lines[2]
    assert lines[2].split("|")[-2].strip() != "" and lines[3].split("|")[-2].strip() == ""  # ETA only while running
    assert "failed killed" in lines[3] and lines[3].startswith("| b |")
