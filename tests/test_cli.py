"""The command line, in-process: readable errors with exit code 2, tables and answers on stdout."""
import pytest

from workbench.cli import main
from workbench.config import save_model_config


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
