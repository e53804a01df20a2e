"""Every example config loads and validates; each builds and reports its parameter table — the offline ones
with the embedded weights, the online ones with random weights from local directories that stand in for the
hub (the models' real architecture configs, no weights), so their table shows the real sizes."""
import copy
import json
from pathlib import Path

import pytest

from workbench.config import load_run_config, load_yaml, model_config_from_dict
from workbench.paradigms import resolve_stages

from conftest import make_tokenizer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if "paradigm" in load_yaml(p) or "stages" in load_yaml(p)]

# The architecture configs (config.json) of the hub models the online examples name: published hyperparameters.
# An example naming another hub model fails below until its architecture is added here.
HUB_ARCHITECTURES = {
    "qwen2.5-0.5b-instruct": ("llm", 494_032_768, {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}),
    "openai/clip-vit-large-patch14-336": ("encoder", 303_507_456, {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "patch_size": 14, "image_size": 336, "hidden_act": "quick_gelu",
        "projection_dim": 768, "layer_norm_eps": 1e-5}),
    "google/siglip-so400m-patch14-384": ("encoder", 428_225_600, {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 384,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    data = load_yaml(path)
    if path in RUN_CONFIGS:
        run = load_run_config(path)
        try:
            stages = resolve_stages(run)
        except Exception as e:  # the direct paradigm needs PEFT modules configured
            pytest.fail(f"{path.name}: {e}")
        assert stages
    else:
        model_config_from_dict(data)


def _model_config(path):
    return load_run_config(path).model if path in RUN_CONFIGS else model_config_from_dict(load_yaml(path))


def _is_online(config) -> bool:
    from workbench.encoders import ENCODERS
    from workbench.llm import LLMS

    encoder_offline = ENCODERS.info(config.encoder.name).get("offline", False)
    llm_offline = config.llm.name in LLMS and LLMS.info(config.llm.name).get("offline", False)
    return not (encoder_offline and llm_offline)


def _check_table(model, name):
    rows = {r["component"]: r for r in model.parameter_report()}
    assert {"encoder", "integrator", "llm", "total"} <= set(rows), name
    assert all(rows[c]["total"] > 0 for c in ("encoder", "integrator", "llm")), name
    assert rows["total"]["total"] == sum(r["total"] for c, r in rows.items() if c != "total")
    return rows


@pytest.mark.e2e
@pytest.mark.parametrize("path", [p for p in CONFIGS if not _is_online(_model_config(p))], ids=lambda p: p.name)
def test_offline_example_builds_with_the_embedded_weights(path):
    from workbench.model import VisionLanguageModel

    config = _model_config(path)
    config.llm.device = "cpu"
    model = VisionLanguageModel.from_config(config)
    rows = _check_table(model, path.name)
    assert rows["llm"]["total"] == 134_515_008  # SmolLM2-135M, embedded
    from workbench.integrators import INTEGRATORS

    prefix = INTEGRATORS.info(config.integrator.name)["placement"] == "prefix"
    assert model.num_visual_tokens > 0 or not prefix  # a prefix integrator puts visual tokens in the sequence


def _stand_in(source: str, root: Path) -> tuple[str, int]:
    """A local directory holding `source`'s architecture config (plus a tokenizer for an LLM), no weights."""
    if source not in HUB_ARCHITECTURES:
        pytest.fail(f"an example names hub model {source!r}: add its architecture to HUB_ARCHITECTURES")
    kind, size, config = HUB_ARCHITECTURES[source]
    folder = root / source.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if kind == "llm":
        make_tokenizer().save_pretrained(folder)
    return str(folder), size


@pytest.mark.e2e
@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_online(_model_config(p))], ids=lambda p: p.name)
def test_online_example_builds_with_random_weights_and_real_sizes(path, tmp_path):
    from workbench.encoders import ENCODERS
    from workbench.llm import LLMS
    from workbench.model import VisionLanguageModel

    config = copy.deepcopy(_model_config(path))
    sizes = {}
    if not ENCODERS.info(config.encoder.name).get("offline", False):
        config.encoder.model, sizes["encoder"] = _stand_in(config.encoder.model, tmp_path)
        config.encoder.weights = "random"
    if not (config.llm.name in LLMS and LLMS.info(config.llm.name).get("offline", False)):
        config.llm.name, sizes["llm"] = _stand_in(config.llm.name, tmp_path)
        config.llm.weights, config.llm.device, config.llm.dtype = "random", "cpu", "bfloat16"
    model = VisionLanguageModel.from_config(config)
    rows = _check_table(model, path.name)
    for part, size in sizes.items():
        assert abs(rows[part]["total"] - size) <= 0.02 * size, (part, rows[part]["total"], size)
