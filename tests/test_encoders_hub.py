"""open_clip and transformers encoder backends, exercised end to end on tiny random models saved to disk.

No network: every model is built here, saved, and loaded back through the real loading code, so the
tests check that weights really load (features equal the source model's own block outputs), that
layer / CLS / grid handling is right, and that hub-only requests fail fast when offline.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image

from workbench.config import EncoderSpec
from workbench.encoders import build_encoder
from workbench.errors import ConfigError, OfflineError, UnknownComponentError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                   image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                 vocab_size=100, max_position_embeddings=16)
OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
OC_NAME = "wb-test-tiny-vit"


@pytest.fixture
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Point the hub cache at an empty folder so nothing a developer downloaded changes the outcome."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# ---------------------------------------------------------------- transformers: tiny models on disk

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                              SiglipVisionConfig, SiglipVisionModel)

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip_vision = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).eval()
    clip_vision.save_pretrained(root / "clip_vision")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "clip_vision")
    clip_full = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=16)).eval()
    clip_full.save_pretrained(root / "clip_full")
    processor.save_pretrained(root / "clip_full")
    siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()
    siglip.save_pretrained(root / "siglip")  # no preprocessor_config.json: SigLIP defaults apply
    return {"root": root, "clip_vision": clip_vision, "clip_full": clip_full, "siglip": siglip}


def _hidden(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


def test_clip_vision_tower_shapes_layers_and_weights(hf_dirs, pixels):
    path = str(hf_dirs["root"] / "clip_vision")
    enc = build_encoder(EncoderSpec(name="clip", model=path))
    assert enc.grid == (4, 4) and enc.feature_dim == 32 and enc.image_size == 32 and enc.has_cls
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    with torch.no_grad():
        last = enc(pixels)
    assert last.shape == (2, 16, 32)
    reference = _hidden(hf_dirs["clip_vision"], pixels)
    torch.testing.assert_close(last, reference[-1][:, 1:])  # raw last block output, no post_layernorm

    with_cls = build_encoder(EncoderSpec(name="clip", model=path, use_cls=True))
    assert with_cls(pixels).shape == (2, 17, 32) and with_cls.num_tokens == 17
    torch.testing.assert_close(with_cls(pixels), reference[-1])

    penultimate = build_encoder(EncoderSpec(name="clip", model=path, layer=-2))(pixels)
    first_block = build_encoder(EncoderSpec(name="clip", model=path, layer=0))(pixels)
    assert not torch.allclose(penultimate, last)
    torch.testing.assert_close(penultimate, first_block)  # 2 blocks: -2 and 0 are both block 0's output
    torch.testing.assert_close(penultimate, reference[1][:, 1:])

    for layer in (2, -3):
        with pytest.raises(ConfigError, match=r"-2 … 1"):
            build_encoder(EncoderSpec(name="clip", model=path, layer=layer))


def test_clip_full_checkpoint_loads_only_the_vision_tower(hf_dirs, pixels):
    enc = build_encoder(EncoderSpec(name="clip", model=str(hf_dirs["root"] / "clip_full"), use_cls=True))
    assert not any(name.startswith("text") or ".text_model." in name for name, _ in enc.named_parameters())
    torch.testing.assert_close(enc(pixels), _hidden(hf_dirs["clip_full"].vision_model, pixels)[-1])


def test_siglip_has_no_cls(hf_dirs, pixels):
    path = str(hf_dirs["root"] / "siglip")
    enc = build_encoder(EncoderSpec(name="siglip", model=path, use_cls=True))
    assert not enc.has_cls and enc.grid == (4, 4) and enc.mean == (0.5, 0.5, 0.5)
    feats = enc(pixels)
    assert feats.shape == (2, 16, 32)
    torch.testing.assert_close(feats, _hidden(hf_dirs["siglip"], pixels)[-1])
    assert build_encoder(EncoderSpec(name="hf_vision", model=path, layer=-2))(pixels).shape == (2, 16, 32)


def test_hf_other_resolution_interpolates_positions(hf_dirs):
    enc = build_encoder(EncoderSpec(name="clip", model=str(hf_dirs["root"] / "clip_vision"), image_size=48))
    assert enc.grid == (6, 6) and enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)


def test_hf_bad_sources(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError, match="no_such_model"):
        build_encoder(EncoderSpec(name="clip", model=str(missing)))
    with pytest.raises(ConfigError, match="needs encoder.model"):
        build_encoder(EncoderSpec(name="hf_vision"))


# ---------------------------------------------------------------- open_clip: tiny model on disk

@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    config = root / f"{OC_NAME}.json"
    config.write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model(OC_NAME).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    torch.save(state, root / "tiny.pt")
    return {"root": root, "config": str(config), "model": model}


def _oc_spec(oc, ckpt="tiny.safetensors", **kw) -> EncoderSpec:
    return EncoderSpec(name="open_clip", model_config=oc["config"],
                       pretrained=str(oc["root"] / ckpt) if ckpt else None, **kw)


def _block_outputs(model, pixels):
    """Each resblock's output, caught by hooks on the source model (seq-first layouts transposed)."""
    outs = []
    transformer = model.visual.transformer
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o if transformer.batch_first else o.transpose(0, 1)))
             for blk in transformer.resblocks]
    with torch.no_grad():
        model.encode_image(pixels)
    for h in hooks:
        h.remove()
    return outs


def test_open_clip_checkpoint_really_loads(oc, pixels):
    enc = build_encoder(_oc_spec(oc, use_cls=True))
    assert enc.grid == (4, 4) and enc.feature_dim == 32 and enc.image_size == 32 and enc.has_cls
    assert enc.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    blocks = _block_outputs(oc["model"], pixels)
    with torch.no_grad():
        feats = enc(pixels)
    assert feats.shape == (2, 17, 32)
    torch.testing.assert_close(feats, blocks[-1])
    torch.testing.assert_close(build_encoder(_oc_spec(oc, "tiny.pt", use_cls=True))(pixels), feats)
    assert not torch.allclose(build_encoder(_oc_spec(oc, None, use_cls=True))(pixels), feats)  # random weights

    no_cls = build_encoder(_oc_spec(oc))(pixels)
    assert no_cls.shape == (2, 16, 32)
    torch.testing.assert_close(no_cls, blocks[-1][:, 1:])
    penultimate = build_encoder(_oc_spec(oc, layer=-2))
    torch.testing.assert_close(penultimate(pixels), blocks[0][:, 1:])
    assert len(penultimate.visual.transformer.resblocks) == 1  # later blocks are not kept
    torch.testing.assert_close(build_encoder(_oc_spec(oc, layer=0))(pixels), blocks[0][:, 1:])
    for layer in (2, -3):
        with pytest.raises(ConfigError, match=r"-2 … 1"):
            build_encoder(_oc_spec(oc, layer=layer))


def test_open_clip_other_resolution_and_bad_checkpoint(oc, tmp_path):
    enc = build_encoder(_oc_spec(oc, image_size=48))  # positions interpolated from the 4×4 checkpoint
    assert enc.grid == (6, 6) and enc.image_size == 48 and enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    bad = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="bad.pt"):
        build_encoder(EncoderSpec(name="open_clip", model_config=oc["config"], pretrained=str(bad)))
    with pytest.raises(ConfigError, match="neither a checkpoint file nor"):
        build_encoder(EncoderSpec(name="open_clip", model_config=oc["config"], pretrained="no_such_tag"))


def test_open_clip_visual_only_checkpoint(oc, pixels, tmp_path):
    """A checkpoint of the image tower alone (bare keys) loads too."""
    from safetensors.torch import save_file

    path = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in oc["model"].visual.state_dict().items()}, str(path))
    enc = build_encoder(EncoderSpec(name="open_clip", model_config=oc["config"], pretrained=str(path)))
    torch.testing.assert_close(enc(pixels), build_encoder(_oc_spec(oc))(pixels))


def test_open_clip_hf_text_tower_needs_no_network(tmp_path, empty_hub_cache, monkeypatch):
    """Only the image tower is built for real, so a roberta text tower does not send open_clip to the hub."""
    cfg = dict(OPEN_CLIP_CFG, text_cfg={"hf_model_name": "wb-test/no-such-text-model", "hf_tokenizer_name": "x",
                                        "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler"})
    path = tmp_path / "wb-test-tiny-hftext.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    start = time.monotonic()
    enc = build_encoder(EncoderSpec(name="open_clip", model_config=str(path)))
    assert time.monotonic() - start < 5 and enc(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 32)


def test_open_clip_config_and_architecture_errors(oc, tmp_path):
    with pytest.raises(UnknownComponentError) as err:
        build_encoder(EncoderSpec(name="open_clip", model="ViT-Nope-99"))
    assert "ViT-Nope-99" in str(err.value) and "ViT-B-32" in str(err.value) and "RN50," not in str(err.value)
    with pytest.raises(ConfigError, match="only ViT towers"):
        build_encoder(EncoderSpec(name="open_clip", model="RN50"))
    with pytest.raises(ConfigError, match="not supported"):
        build_encoder(EncoderSpec(name="open_clip", model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
    with pytest.raises(ConfigError, match=OC_NAME):
        build_encoder(EncoderSpec(name="open_clip", model="ViT-B-32", model_config=oc["config"]))
    not_a_model = tmp_path / "x.json"
    not_a_model.write_text("{}")
    with pytest.raises(ConfigError, match="embed_dim"):
        build_encoder(EncoderSpec(name="open_clip", model_config=str(not_a_model)))


def test_open_clip_cached_tag_loads_offline(oc, pixels, empty_hub_cache, monkeypatch):
    """A tag whose weights are in the hub cache works offline; its mean/std come with it."""
    snapshot = empty_hub_cache / "models--acme--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (empty_hub_cache / "models--acme--tiny-clip" / "refs").mkdir()
    (empty_hub_cache / "models--acme--tiny-clip" / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_model.safetensors").write_bytes((oc["root"] / "tiny.safetensors").read_bytes())
    tag = {"hf_hub": "acme/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if t == "tiny_tag" else {})
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    enc = build_encoder(EncoderSpec(name="open_clip", model_config=oc["config"], pretrained="tiny_tag"))
    assert enc.mean == (0.5, 0.5, 0.5)
    torch.testing.assert_close(enc(pixels), build_encoder(_oc_spec(oc))(pixels))


# ---------------------------------------------------------------- offline: fail fast with one clear line

@pytest.mark.parametrize("spec", [
    EncoderSpec(name="open_clip", pretrained="laion2b_s34b_b79k"),
    EncoderSpec(name="clip", model="openai/clip-vit-base-patch32"),
    EncoderSpec(name="siglip"),
], ids=["open_clip-tag", "clip-hub-id", "siglip-default"])
def test_offline_hub_models_fail_fast(spec, empty_hub_cache, monkeypatch):
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OfflineError) as err:
        build_encoder(spec)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "\n" not in message and "not available offline" in message
    assert "mobilenet_v2" in message and "efficientnet_lite0" in message


# ---------------------------------------------------------------- shared behaviour

def test_preprocess_freeze_and_train_mode(oc, hf_dirs):
    images = [Image.new("RGB", (40, 20), "red"), Image.new("L", (17, 33), 128), Image.new("RGBA", (32, 32))]
    encoders = [build_encoder(_oc_spec(oc)), build_encoder(EncoderSpec(name="clip", model=str(hf_dirs["root"] / "clip_vision")))]
    for enc in encoders:
        for aspect in ("pad", "resize", "crop"):
            enc.spec.image_aspect = aspect
            batch = enc.preprocess(images)
            assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
        assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
        assert not enc.train().training and not any(m.training for m in enc.modules())
        assert enc(batch).shape == (3, 16, 32)
    trainable = build_encoder(_oc_spec(oc, frozen=False))
    assert not trainable.frozen and trainable.train().training
    assert all(p.requires_grad for p in trainable.parameters())
