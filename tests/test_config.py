import pytest
import yaml

from workbench.config import (EncoderSpec, IntegratorSpec, ModelConfig, from_dict, load_model_config,
                              model_config_from_dict, save_model_config, to_dict)
from workbench.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    config = ModelConfig(encoder=EncoderSpec(name="open_clip", model="ViT-B-32", layer=-2, use_cls=True),
                         integrator=IntegratorSpec(name="mlp", options={"depth": 3}))
    path = save_model_config(config, tmp_path / "c.yaml")
    assert load_model_config(path) == config


def test_run_config_with_model_section_is_accepted():
    config = model_config_from_dict({"model": {"integrator": {"name": "linear"}}, "paradigm": "two-stage"})
    assert config.integrator.name == "linear"


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        model_config_from_dict({"encoder": {"layr": -2}})
    assert "encoder.layr" in str(e.value) and "layer" in str(e.value)


@pytest.mark.parametrize("data, fragment", [
    ({"encoder": {"layer": "last"}}, "encoder.layer: expected an integer"),
    ({"llm": {"frozen": "yes"}}, "llm.frozen: expected true or false"),
    ({"encoder": "mobilenet_v2"}, "encoder: expected a mapping"),
    ({"llm": {"dtype": "fp8"}}, "llm.dtype"),
    ({"encoder": {"image_aspect": "stretch"}}, "image_aspect"),
])
def test_wrong_values_are_explained(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        model_config_from_dict(data)


def test_invalid_yaml_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("encoder:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*not valid YAML at line"):
        load_model_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "nope.yaml")


def test_float_strings_from_yaml_are_coerced():
    from dataclasses import dataclass

    @dataclass
    class T:
        lr: float = 0.0

    assert from_dict(T, {"lr": "1e-3"}).lr == pytest.approx(1e-3)
    assert to_dict(from_dict(T, {"lr": 2})) == {"lr": 2.0}


def test_run_config_overrides_from_the_command_line(tmp_path):
    from workbench.config import apply_overrides, load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("model:\n  integrator: {name: mlp}\ntraining: {batch_size: 16}\n")
    run = load_run_config(path, ["model.integrator.name=resampler", "training.batch_size=4",
                                 "model.integrator.options={num_latents: 8}", "name=my run"])
    assert run.model.integrator.name == "resampler" and run.model.integrator.options == {"num_latents": 8}
    assert run.training.batch_size == 4 and run.name == "my run"
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["training.batch_size"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.first=1"])
    stages = {"stages": [{"name": "align", "lr": 1e-3}, {"name": "tune"}]}
    assert apply_overrides(stages, ["stages.0.max_minutes=2", "stages.-1.lr=0.5"])["stages"] == [
        {"name": "align", "lr": 1e-3, "max_minutes": 2}, {"name": "tune", "lr": 0.5}]
    with pytest.raises(ConfigError, match="not an index of a list of 2"):
        apply_overrides(stages, ["stages.2.lr=1"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(stages, ["stages.first.lr=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_run_config(path, ["training.batch_size=many"])


def test_concurrent_writers_of_one_config_never_collide(tmp_path):
    """Every process of a multi-process run saves the run's config: writers sharing one temporary file would
    truncate or move it away from under each other (FileNotFoundError), and a reader could see half a file."""
    import threading

    from workbench.config import load_yaml, save_yaml

    path, errors = tmp_path / "run.yaml", []
    rows = {f"key{i}": list(range(50)) for i in range(10)}

    def writer(n):
        try:
            for k in range(30):
                save_yaml({**rows, "writer": n, "k": k}, path)
                assert set(load_yaml(path)) == set(rows) | {"writer", "k"}  # whole, never half-written
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]  # no temporary file left behind


def test_saved_files_get_the_usual_permissions(tmp_path):
    """The atomic write's temporary file must not leave the result private (mkstemp's 0600)."""
    import os

    from workbench.config import save_yaml

    mask = os.umask(0o022)
    try:
        path = save_yaml({"a": 1}, tmp_path / "run.yaml")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_removed_option_at_its_old_default_still_loads_and_any_other_value_is_refused(tmp_path):
    from workbench.config import RunConfig, StageSpec, load_run_config, save_run_config

    saved = to_dict(RunConfig(stages=[StageSpec(name="adapt", llm="frozen", lr=5e-4)]))
    saved["stages"][0]["loraplus_lr_ratio"] = 1.0  # what every run saved while LoRA+ was an option carries
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(saved))
    run = load_run_config(path)
    assert run.stages[0].lr == pytest.approx(5e-4)
    assert "loraplus_lr_ratio" not in to_dict(run)["stages"][0]
    save_run_config(run, path)
    assert "loraplus_lr_ratio" not in path.read_text()
    with pytest.raises(ConfigError) as e:
        load_run_config(path, ["stages.0.loraplus_lr_ratio=4"])
    message = str(e.value)
    assert "stages[0].loraplus_lr_ratio' was removed" in message and "RESULTS.md" in message
    assert "\n" not in message
