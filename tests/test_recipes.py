"""The recipe catalog (examples and saved runs, summaries, measured accuracy) and edits applied to a recipe."""
import shutil
from pathlib import Path

import pytest

from workbench.config import DataSpec, RunConfig
from workbench.errors import ConfigError
from workbench.jobs import RunRegistry
from workbench.recipes import (EXAMPLES, apply_edits, default_recipe, find_recipe, measured_accuracy, recipe_catalog,
                               recipe_fields)

RESULTS = """# Benchmark results
## fast — one recipe against time

`workbench train examples/configs/fast.yaml` in its own process.

- date: 2026-12-01 11:05 UTC

| training time (min) | accuracy % | questions |
|---|---|---|
| 4.8 | 88.20 | 1000 |
| 15.1 | 99.69 | 9673 |
| text-only, 5 min | 69.20 | 1000 |
<!-- fast:end -->

Measured 2026-11-25 with `workbench train examples/configs/other.yaml --set x=1`:

| paradigm | config | accuracy % |
|---|---|---|
| direct | `examples/configs/named.yaml` | 77.60 |

| training time (min) | accuracy % |
|---|---|
| 3.0 | 50.0 |
"""


def test_accuracy_comes_from_the_results_tables_only():
    assert measured_accuracy(RESULTS, "fast.yaml") == "99.69% (fast, 2026-12-01)"
    assert measured_accuracy(RESULTS, "named.yaml") == "77.60% (bench/RESULTS.md, 2026-11-25)"
    assert measured_accuracy(RESULTS, "other.yaml") is None  # run with changes: not the recipe as it is
    assert measured_accuracy(RESULTS, "absent.yaml") is None


@pytest.fixture()
def examples(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in ("fast_easyvqa.yaml", "two_stage_easyvqa.yaml", "default.yaml"):
        shutil.copy(EXAMPLES / name, folder / name)
    (folder / "broken.yaml").write_text("name: [unclosed\n")
    (folder / "typo.yaml").write_text("paradigm: direct\nmodel: {integrator: {name: mlp}}\ndata: {knd: easy-vqa}\n")
    return folder


def test_catalog_lists_examples_and_saved_runs_and_survives_broken_files(examples, tmp_path, tiny_config,
                                                                             llava_data):
    results = tmp_path / "RESULTS.md"
    results.write_text(RESULTS.replace("fast.yaml", "fast_easyvqa.yaml"))
    registry = RunRegistry(tmp_path / "runs")
    recipes = recipe_catalog(registry, examples, results)
    keys = [r.key for r in recipes]
    assert keys == ["examples/broken.yaml", "examples/fast_easyvqa.yaml", "examples/two_stage_easyvqa.yaml",
                    "examples/typo.yaml"]  # default.yaml is a bare model config: the Build tab's
    broken, fast, two, typo = recipes
    assert broken.run is None and "not valid YAML" in broken.summary
    assert typo.run is None and "knd" in typo.error
    assert default_recipe(recipes) == "examples/fast_easyvqa.yaml"
    assert fast.summary.startswith("direct: adapt trains integrator + lora (r=8 on q_proj, k_proj, v_proj, o_proj, "
                                   "gate_proj, up_proj, down_proj layers 22–29) · llama_adapter on mobilenet_v2")
    assert "budget 15 min" in fast.summary and "measured: 99.69%" in fast.summary
    assert "align trains integrator; instruct trains integrator + lora (r=8" in two.summary
    assert "align: task-captions (source=easy-vqa (split=train))" in two.summary and "measured: not measured" in two.summary
    with pytest.raises(ConfigError, match="cannot be launched"):
        find_recipe(recipes, "examples/broken.yaml")

    run = RunConfig(name="saved", model=tiny_config, paradigm="single-stage",
                    data=DataSpec(kind="llava", options={"json_path": str(llava_data)}))
    run_id = registry.create(run)
    saved = recipe_catalog(registry, examples, results)[-1]
    assert saved.key == f"run:{run_id}" and saved.run.name == "saved" and "(created)" in saved.label
    assert saved.summary.startswith("single-stage: align trains integrator · mlp on torchvision")


def test_edits_apply_to_a_copy_and_are_validated():
    fast = find_recipe(recipe_catalog(None), "examples/fast_easyvqa.yaml").run
    fields = recipe_fields(fast)
    assert fields["budget"] == 15 and fields["peft_layers"] == "22, 23, 24, 25, 26, 27, 28, 29"
    assert fields["stages"] == [["adapt", "integrator + lora (r=8 on q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                          "up_proj, down_proj layers 22–29)",
                                 "easy-vqa split=train", 20.0, 15.0, 0.001, 0.001]]
    edited = apply_edits(fast, {"name": "quick", "budget": 3, "peft_r": 4, "peft_layers": "0, 1",
                                "data_kind": "llava", "data_options": {"json_path": "d.json"}})
    assert edited.name == "quick" and edited.stages[0].max_minutes == 3 and edited.model.peft.r == 4
    assert edited.model.peft.layers == [0, 1] and "layers_to_transform" not in edited.model.peft.options
    assert edited.data.kind == "llava" and edited.eval_data is None  # the easy-VQA test split no longer fits
    assert fast.name == "fast-easyvqa" and fast.model.peft.r == 8  # the recipe itself is untouched
    rows = [["adapt", "", "", 2, 0, 5e-4, 1e-4]]
    edited = apply_edits(fast, {"stages": rows, "budget": 15})
    assert (edited.stages[0].epochs, edited.stages[0].max_minutes, edited.stages[0].lr) == (2, None, 5e-4)
    two = find_recipe(recipe_catalog(None), "examples/two_stage_easyvqa.yaml").run
    split = apply_edits(two, {"budget": 20})  # the recipe's own 2 + 8 minutes, scaled
    assert [s.max_minutes for s in split.stages] == [4, 16]
    for edits, message in (({"stages": [["adapt", "", "", -1, 0, 1e-3, 1e-3]]}, "epochs must be at least 0"),
                           ({"stages": [["adapt", "", "", "many", 0, 1e-3, 1e-3]]}, "epochs must be a number"),
                           ({"stages": rows * 2}, "1 stage"), ({"peft_r": 0}, "'r' of PEFT method lora"),
                           ({"peft_layers": "top"}, "must be int"), ({"peft_method": "lorax"}, "Unknown PEFT method"),
                           ({"batch_size": 2.5}, "whole number")):
        with pytest.raises(ConfigError, match=message):
            apply_edits(fast, edits)


def test_a_budgeted_benchmark_recipe_still_takes_data_overrides(monkeypatch):
    """bench/_runs.with_budget writes the resolved stages into the config; a stage on the run's own data must not
    freeze that data, or `recipe_at_budget.py --set data.…` trains on the recipe's data while saying otherwise."""
    import importlib.util

    from workbench.config import RunConfig, apply_overrides, from_dict
    from workbench.paradigms import resolve_stages

    bench = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_runs_budget_test", bench / "_runs.py")
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)

    def stages_after(name, overrides):
        config = apply_overrides(runs.with_budget(runs.read_yaml(EXAMPLES / name), 10), overrides)
        return resolve_stages(from_dict(RunConfig, config).validate())

    (adapt,) = stages_after("direct_lora_easyvqa.yaml", ["data.options.limit=123"])
    assert adapt.data.options.get("limit") == 123 and adapt.max_minutes == 10
    align, instruct = stages_after("two_stage_easyvqa.yaml", ["data.options.limit=7"])
    assert align.data.kind == "task-captions" and "limit" not in align.data.options  # its own data
    assert instruct.data.options.get("limit") == 7
    assert align.max_minutes + instruct.max_minutes == pytest.approx(10)
