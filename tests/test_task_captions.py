"""Captions derived from a VQA dataset's own question-answer pairs (the alignment data of two-stage on a task)."""
import pytest

from workbench.config import DataSpec, load_run_config
from workbench.data.easyvqa import load_easy_vqa
from workbench.data.loaders import load_dataset_spec
from workbench.data.samples import Sample
from workbench.data.task_captions import _question_answer, load_task_captions
from workbench.errors import ConfigError

SOURCE = {"kind": "easy-vqa", "options": {"split": "train", "limit": 300}}


def test_every_pair_is_described_once_with_its_own_image():
    qa = load_easy_vqa("train", limit=300)
    truth = {}
    for s in qa:
        truth.setdefault(s.images[0], []).append(f"{s.meta['question']} {s.meta['answer']}.")
    captions = load_task_captions(SOURCE, pairs_per_caption=3)
    seen = {}
    for c in captions:
        assert c.messages[0]["content"].startswith("<image>\n") and len(c.images) == 1
        text = c.messages[1]["content"]
        parts = [p.strip() + "." for p in text.rstrip(".").split(".")]
        assert 1 <= len(parts) <= 3
        seen.setdefault(c.images[0], []).extend(parts)
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in truth.items()}
    assert captions.report.kept == 300 and captions.report.used == len(captions)
    assert len(load_task_captions(SOURCE, pairs_per_caption=3, limit=5)) == 5


def test_it_loads_from_a_run_config_as_a_stage_dataset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("paradigm: two-stage\n"
                    "stages:\n"
                    "  - {name: align, data: {kind: task-captions, options: {source: {kind: easy-vqa, options: "
                    "{split: train, limit: 50}}}}, llm: frozen}\n"
                    "  - {name: instruct, llm: frozen}\n"
                    "data: {kind: easy-vqa, options: {split: train, limit: 50}}\n")
    run = load_run_config(path)
    spec = run.stages[0].data
    assert isinstance(spec, DataSpec) and len(load_dataset_spec(spec.kind, **spec.options)) > 0


def test_only_single_image_single_turn_pairs_are_used():
    one = Sample([{"role": "user", "content": "<image>\nwhat is it"}, {"role": "assistant", "content": "a cat."}],
                 ["x.png"])
    assert _question_answer(one) == ("what is it?", "a cat")
    two_turns = Sample(one.messages * 2, ["x.png"])
    two_images = Sample(one.messages, ["x.png", "y.png"])
    assert _question_answer(two_turns) is None and _question_answer(two_images) is None


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs source"),
    ({"source": "easy-vqa"}, "needs source"),
    ({"source": {"kind": "task-captions"}}, "cannot derive"),
    ({"source": {"kind": "nope"}}, "nope"),
    ({"source": {"kind": "easy-vqa", "options": [1]}}, "must be a mapping"),
    ({"source": SOURCE, "pairs_per_caption": 0}, "at least 1"),
    ({"source": SOURCE, "prompts": []}, "non-empty"),
])
def test_bad_options_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_task_captions(**kwargs)
