"""Registries, LLM loading and offline behaviour: unknown names list valid ones; the hub never hangs."""
import time

import pytest
import torch

from workbench import hub
from workbench.config import EncoderSpec, IntegratorSpec, LLMSpec
from workbench.encoders import ENCODERS, build_encoder
from workbench.errors import ConfigError, OfflineError, UnknownComponentError
from workbench.integrators import INTEGRATORS, IntegratorContext, build_integrator
from workbench.llm import LLMS, load_llm, resolve_dtype


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(UnknownComponentError) as e:
        build_encoder(EncoderSpec(name="mobilenet"))  # exact names only: no substring matches
    assert "mobilenet_v2" in str(e.value) and "efficientnet_lite0" in str(e.value)


def test_unknown_integrator_lists_valid_names():
    ctx = IntegratorContext(vision_dim=8, num_input_tokens=4, grid=(2, 2), has_cls=False, llm_hidden=16)
    with pytest.raises(UnknownComponentError, match="Valid integrator names: .*linear.*mlp"):
        build_integrator(IntegratorSpec(name="qformerr"), ctx)


def test_unknown_llm_lists_valid_names():
    with pytest.raises(UnknownComponentError, match="Valid LLM names: .*smollm2-135m-instruct"):
        load_llm(LLMSpec(name="smollm3"))


def test_registries_carry_metadata_for_front_ends():
    assert INTEGRATORS.info("mlp")["family"] == "dense projector"
    assert ENCODERS.info("mobilenet_v2")["offline"] is True
    assert LLMS.info("smollm2-135m-instruct")["offline"] is True
    assert LLMS.info("qwen2.5-0.5b-instruct")["offline"] is False


@pytest.mark.parametrize("name, depth, expected", [("linear", None, 1), ("mlp", 1, 1), ("mlp", 3, 3)])
def test_projector_shapes_and_depth(name, depth, expected):
    ctx = IntegratorContext(vision_dim=12, num_input_tokens=9, grid=(3, 3), has_cls=False, llm_hidden=20)
    options = {"depth": depth} if depth else {}
    integ = build_integrator(IntegratorSpec(name=name, options=options), ctx)
    assert integ(torch.randn(2, 9, 12)).shape == (2, 9, 20)
    assert integ.num_tokens == 9
    assert sum(isinstance(m, torch.nn.Linear) for m in integ.modules()) == expected


def test_local_llm_directory_loads_frozen_in_fp32(tiny_llm_dir):
    model, tokenizer = load_llm(LLMSpec(name=str(tiny_llm_dir), device="cpu"))
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None


def test_dtype_choice():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_missing_local_directory_and_gguf_are_config_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_llm(LLMSpec(name=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="GGUF file not found"):
        load_llm(LLMSpec(name=str(tmp_path / "model.gguf")))


def test_cuda_requested_without_cuda_is_explained():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_llm(LLMSpec(name="smollm2-135m-instruct", device="cuda"))


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OfflineError) as e:
        load_llm(LLMSpec(name="some-org/some-model"))
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message and "not available offline" in message and "smollm2-135m-instruct" in message


def test_unreachable_hub_is_detected_within_seconds(monkeypatch):
    """Nothing listens on loopback port 443 here, so the probe is refused: offline, quickly."""
    monkeypatch.delenv("WORKBENCH_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HUB_HOST", "127.0.0.1")
    monkeypatch.setattr(hub, "_reachable", None)
    start = time.monotonic()
    with pytest.raises(OfflineError):
        load_llm(LLMSpec(name="qwen2.5-0.5b-instruct"))
    assert time.monotonic() - start < 5
    monkeypatch.setattr(hub, "_reachable", None)


def test_hub_id_shape():
    assert hub.looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not hub.looks_like_hub_id("smollm3") and not hub.looks_like_hub_id("a/b/c")


def test_cnn_encoder_layer_choice_and_errors():
    deep = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64))
    shallow = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64, layer=-3))
    assert deep.grid == (2, 2) and shallow.feature_dim != deep.feature_dim
    with pytest.raises(ConfigError, match="out of range"):
        build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", layer=40))
    with pytest.raises(ConfigError, match="Unknown torchvision model"):
        build_encoder(EncoderSpec(name="torchvision", model="resnet9000"))


def test_torchvision_download_offline_is_refused(monkeypatch):
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    with pytest.raises(OfflineError, match="mobilenet_v2"):
        build_encoder(EncoderSpec(name="torchvision", model="resnet18", pretrained="DEFAULT"))


def test_frozen_encoder_stays_in_eval_and_unfrozen_trains():
    enc = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64))
    enc.train()
    assert not enc.training and enc.frozen
    enc.freeze(False).train()
    assert enc.training and not enc.frozen


def test_preprocess_squares_any_aspect():
    from PIL import Image

    for aspect in ("pad", "resize", "crop"):
        enc = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64, image_aspect=aspect))
        x = enc.preprocess([Image.new("RGB", (100, 30)), Image.new("RGB", (20, 90))])
        assert x.shape == (2, 3, 64, 64)


def test_fingerprint_changes_with_layer_and_preprocessing():
    a = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64))
    b = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64, layer=-2))
    c = build_encoder(EncoderSpec(name="torchvision", model="mobilenet_v3_small", image_size=64, image_aspect="crop"))
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3
