"""The command line, in-process: readable errors with exit code 2, tables and answers on stdout."""
import pytest

from workbench.cli import main
from workbench.config import save_model_config
from conftest import image_beside


@pytest.fixture()
def tiny_config_file(tiny_config, tmp_path):
    return save_model_config(tiny_config, tmp_path / "tiny.yaml")


def test_info_prints_the_parameter_table(tiny_config_file, capsys):
    assert main(["info", str(tiny_config_file)]) == 0
    out = capsys.readouterr().out
    assert "integrator" in out and "trainable %" in out and "visual tokens per image" in out


def test_info_on_a_saved_model_directory(tiny_model, tmp_path, capsys):
    path = tiny_model.save_pretrained(tmp_path / "saved")
    assert main(["info", str(path)]) == 0
    assert "total" in capsys.readouterr().out


def test_chat_answers_one_question(tiny_config_file, example_image, capsys):
    assert main(["chat", "--config", str(tiny_config_file), "--image", str(example_image),
                 "--max-new-tokens", "5", "what color is the shape?"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_refuses_a_bad_image_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["chat", "--image", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jpg" in err and "Traceback" not in err


def test_unknown_component_in_config_is_one_readable_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("encoder:\n  name: resnet_magic\n")
    assert main(["info", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Unknown encoder 'resnet_magic'" in err and "mobilenet_v2" in err and len(err.splitlines()) == 1


def test_assets_lists_every_embedded_asset(capsys):
    code = main(["assets", "--json"])
    import json

    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"smollm2-135m-instruct", "mobilenet_v2", "efficientnet_lite0", "easy-vqa"} <= names
    assert code == (0 if all(r["available"] for r in rows) else 1)


def test_train_runs_and_eval_from_the_command_line(tiny_config, example_image, tmp_path, capsys):
    import copy
    import json

    from workbench.config import DataSpec, RunConfig, StageSpec, TrainingSpec, save_run_config

    rows = [{"id": str(i), "image": image_beside(tmp_path),
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": "red"}]} for i in range(4)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    run = RunConfig(name="cli", model=copy.deepcopy(tiny_config), stages=[StageSpec(name="align", epochs=1)],
                    data=DataSpec(kind="llava", options={"json_path": str(data)}),
                    training=TrainingSpec(batch_size=2, cache_features=False))
    config = save_run_config(run, tmp_path / "run.yaml")
    runs = str(tmp_path / "runs")
    assert main(["train", str(config), "--runs", runs]) == 0
    assert main(["runs", "list", "--runs", runs]) == 0
    listing = capsys.readouterr().out
    assert "completed" in listing
    run_id = listing.strip().splitlines()[-1].split()[0]
    options = json.dumps({"json_path": str(data)})
    assert main(["eval", run_id, "--runs", runs, "--data", "llava", "--options", options]) == 2  # llava has no split
    assert "split" in capsys.readouterr().err
    assert main(["eval", run_id, "--runs", runs, "--data", "llava", "--split", "", "--options", options]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "on 4 questions" in out
    assert "efficiency:" in out and "% trainable" in out and "peak memory" in out
    report = json.loads((tmp_path / "runs" / run_id / "eval-llava-vqa.json").read_text())
    assert report["peak_memory_mb"] > 0 and report["samples_per_s"] > 0 and 0 < report["trainable_pct"] < 100
    assert main(["eval", run_id, "--runs", runs, "--data", "llava", "--split", "", "--options", options,
                 "--precision", "fp32"]) == 0
    assert main(["eval", run_id, "--runs", runs, "--data", "llava", "--split", "", "--options", options,
                 "--task", "captions"]) == 0
    assert "CIDEr-D" in capsys.readouterr().out


def test_any_integrator_is_picked_on_the_command_line(tiny_config_file, capsys):
    assert main(["info", str(tiny_config_file), "--integrator", "qformer",
                 "--set", "integrator.options.num_queries=8"]) == 0
    out = capsys.readouterr().out
    assert "integrator  qformer {'num_queries': 8}: 9 visual tokens per image" in out  # + the whole-image token
    assert main(["info", str(tiny_config_file), "--set", "model.integrator.name=avg_pool",
                 "--set", "integrator.options={num_tokens: 1}"]) == 0
    assert "1 visual tokens per image" in capsys.readouterr().out
    text = tiny_config_file.read_text()
    assert "name: mlp\n  options: {}" in text
    tiny_config_file.write_text(text.replace("name: mlp\n  options: {}", "name: mlp\n  options: {depth: 3}"))
    assert main(["info", str(tiny_config_file), "--integrator", "linear"]) == 0  # mlp's depth is not carried over
    assert main(["info", str(tiny_config_file)]) == 0 and "'depth': 3" in capsys.readouterr().out


def test_bad_overrides_are_one_readable_line(tiny_config_file, tiny_model, tmp_path, capsys):
    for argv in (["--set", "no-equals-sign"], ["--integrator", "magic"], ["--set", "integrator.nope=1"]):
        assert main(["info", str(tiny_config_file), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
    saved = tiny_model.save_pretrained(tmp_path / "saved")
    assert main(["info", str(saved), "--integrator", "mlp"]) == 2
    assert "not a saved model directory" in capsys.readouterr().err


def test_components_lists_every_registry_and_costs_integrators(tiny_config_file, capsys):
    import json

    from workbench.integrators import INTEGRATORS

    assert main(["components", "integrators", "--for", str(tiny_config_file), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["integrators"]}
    assert set(rows) == set(INTEGRATORS.names()) and len(rows) >= 10
    for name, row in rows.items():
        assert row["family"] and row["follows"] and row["paradigms"] and row["placement"] in ("prefix", "in_llm")
        if "error" not in row:
            assert row["trainable_params"] > 0
            # prefix integrators put visual tokens in the sequence; in-LLM ones may put none there
            assert row["visual_tokens"] > 0 or row["placement"] == "in_llm", row
    assert rows["mlp"]["visual_tokens"] == 4  # the tiny encoder's 2×2 grid
    assert rows["qformer"]["visual_tokens"] == 17 and rows["gated_xattn"]["placement"] == "in_llm"
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    for heading in ("encoders:", "integrators:", "llms:", "peft:", "paradigms:", "data:"):
        assert heading in out
    assert "mobilenet_v2" in out and "smollm2-135m-instruct" in out and "lora" in out and "two-stage" in out
    assert "image-table" in out


def test_attention_writes_the_views(tiny_model, example_image, tmp_path, capsys):
    import json

    saved = tiny_model.save_pretrained(tmp_path / "saved")
    out = tmp_path / "views"
    assert main(["attention", str(saved), "what color is the shape?", "--image", str(example_image),
                 "--answer", "red", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "answer: red" in text and "attention on image tokens per layer" in text
    for name in ("attention.png", "rollout.png", "relevancy.png", "gradient.png", "attention.html",
                 "modality_share.html", "prompt_attention.html", "attention.json", "plotly.min.js"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "attention.json").read_text())
    grid = summary["grid"]
    assert len(summary["maps"]["attention"]) == grid[0] and abs(sum(map(sum, summary["maps"]["rollout"])) - 1) < 1e-4
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["attention", str(saved), "what?", "--image", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err
