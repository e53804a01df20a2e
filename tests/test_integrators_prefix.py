"""Prefix integrators outside the LLM: dense projectors, attention abstractors (Q-Former, Perceiver resampler),
convolutional abstractors (C-Abstractor, LDP) and average pooling. Tiny widths throughout, so the file runs in
seconds. The contract tests take every registered prefix family (`families()`), a new one included."""
import copy
import dataclasses
import inspect
import math

import pytest
import torch
from safetensors.torch import load_model, save_model

from workbench.config import IntegratorSpec
from workbench.errors import ConfigError
from workbench.integrators import INTEGRATORS, IntegratorContext, build_integrator

D = 12  # vision width
H = 20  # LLM width


def ctx(h: int, w: int, cls: bool = False, vision_dim: int = D, llm_hidden: int = H) -> IntegratorContext:
    return IntegratorContext(vision_dim=vision_dim, num_input_tokens=h * w + int(cls), grid=(h, w), has_cls=cls,
                             llm_hidden=llm_hidden)


CONTEXTS = {"2x2": ctx(2, 2), "4x4": ctx(4, 4), "7x7": ctx(7, 7), "vit14+cls": ctx(14, 14, cls=True)}

OPTIONS = {  # small widths for speed where the defaults are large; any other family runs at its defaults
    "qformer": {"num_queries": 6, "num_layers": 4, "hidden_dim": 16, "num_heads": 2},
    "resampler": {"num_latents": 5, "num_layers": 2, "hidden_dim": 16, "num_heads": 2},
    "c_abstractor": {"num_tokens": 9, "depth": 1, "hidden_dim": 8},
    "avg_pool": {"num_tokens": 4},
}


def families() -> list[str]:
    """Every registered prefix family: what the contract tests below run on."""
    return INTEGRATORS.names(placement="prefix")


NAMES = families()
CONV = [n for n in NAMES if hasattr(INTEGRATORS.get(n), "receptive_field")]  # convolution / pooling families


def build(name: str, c: IntegratorContext, **extra):
    return build_integrator(IntegratorSpec(name=name, options={**OPTIONS.get(name, {}), **extra}), c)


@pytest.mark.parametrize("where", list(CONTEXTS))
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_token_count(name, where):
    c = CONTEXTS[where]
    torch.manual_seed(0)
    integ = build(name, c)
    out = integ(torch.randn(3, c.num_input_tokens, D))
    assert out.shape == (3, integ.num_tokens, H)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("where", list(CONTEXTS))
def test_token_counts_of_each_family(where):
    c = CONTEXTS[where]
    h, w = c.grid
    # the abstractors' whole-image token (global_token, on by default) comes on top of their own
    expected = {"linear": c.num_input_tokens, "mlp": c.num_input_tokens, "qformer": 6 + 1, "resampler": 5 + 1,
                "c_abstractor": 9 + 1, "ldp": math.ceil(h / 2) * math.ceil(w / 2), "avg_pool": 4}
    assert {name: build(name, c).num_tokens for name in expected} == expected


@pytest.mark.parametrize("name", NAMES)
def test_defaults_build_at_real_widths(name):
    """MobileNetV2 (1280 channels, 7×7) into SmolLM2-135M (576): the defaults are valid and sized sensibly, and
    the class carries what its registration declared."""
    integ = build_integrator(IntegratorSpec(name=name), ctx(7, 7, vision_dim=1280, llm_hidden=576))
    assert 0 < integ.num_tokens <= 49
    assert sum(p.numel() for p in integ.parameters()) < 6_000_000
    info = INTEGRATORS.info(name)
    assert info["placement"] == "prefix" == integ.placement and integ.registry_name == name
    assert info["follows"] and info["family"] == integ.family


def test_default_token_counts_at_real_widths():
    c = ctx(7, 7, vision_dim=1280, llm_hidden=576)
    expected = {"linear": 49, "mlp": 49, "qformer": 16 + 1, "resampler": 16 + 1, "c_abstractor": 16 + 1, "ldp": 16,
                "avg_pool": 16}  # + 1: the abstractors' whole-image token
    assert {name: build_integrator(IntegratorSpec(name=name), c).num_tokens for name in expected} == expected


def test_ldp_downsamples_each_side_by_its_stride_rounding_up():
    assert [build("ldp", c).num_tokens for c in (ctx(7, 7), ctx(14, 14, cls=True), ctx(2, 2), ctx(3, 5))] == [
        16, 49, 1, 6]
    assert build("ldp", ctx(7, 7), stride=1).num_tokens == 49
    assert build("ldp", ctx(7, 7), stride=3).num_tokens == 9
    for stride in (1, 3):
        integ = build("ldp", ctx(7, 7), stride=stride)
        assert integ(torch.randn(1, 49, D)).shape == (1, integ.num_tokens, H)
        rf = integ.receptive_field()
        assert rf.shape == (integ.num_tokens, 49) and torch.allclose(rf.sum(1), torch.ones(integ.num_tokens))


def test_avg_pool_keeps_cls_first_when_asked():
    c = ctx(4, 4, cls=True)
    integ = build("avg_pool", c, keep_cls=True, depth=1)
    f = torch.randn(2, c.num_input_tokens, D)
    out = integ(f)
    assert integ.num_tokens == 5 and out.shape == (2, 5, H)
    assert torch.allclose(out[:, 0], integ.out_norm(integ.proj(integ.norm(f)[:, 0])), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_visual_tokens_start_at_the_text_embedding_scale(name):
    c = dataclasses.replace(CONTEXTS["7x7"], text_embedding_norm=3.0)
    f = 10 * torch.rand(2, 49, D)  # unnormalised, post-ReLU-like features
    norms = build(name, c)(f).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 3.0), rtol=1e-3)
    if "output_norm" in inspect.signature(INTEGRATORS.get(name)).parameters:
        raw = build(name, c, output_norm=False)
        assert isinstance(raw.out_norm, torch.nn.Identity)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_integrator_parameter(name):
    c = CONTEXTS["vit14+cls"] if name == "avg_pool" else CONTEXTS["4x4"]
    # c_abstractor at hidden 8 has 2-unit squeeze-excite ReLUs that can both be dead; 32 gives it 8.
    extra = {"keep_cls": True} if name == "avg_pool" else {"hidden_dim": 32} if name == "c_abstractor" else {}
    torch.manual_seed(0)
    integ = build(name, c, **extra)
    features = torch.randn(2, c.num_input_tokens, D, requires_grad=True)
    out = integ(features)
    # A random weighting, not out.sum(): the sum of a LayerNorm-ed (output_norm) token is a constant,
    # so out.sum() would give exact zeros everywhere upstream.
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in integ.named_parameters() if p.grad is None]
    zero = [n for n, p in integ.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not missing and not zero
    assert features.grad is not None and features.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    c = CONTEXTS["vit14+cls"]
    torch.manual_seed(0)
    a = build(name, c).eval()
    save_model(a, str(tmp_path / "integrator.safetensors"))
    torch.manual_seed(1)
    b = build(name, c).eval()
    load_model(b, str(tmp_path / "integrator.safetensors"))
    f = torch.randn(2, c.num_input_tokens, D)
    with torch.no_grad():
        assert torch.equal(a(f), b(f))


@pytest.mark.parametrize("name", NAMES)
def test_wrong_token_count_is_explained(name):
    integ = build(name, CONTEXTS["4x4"])
    with pytest.raises(ValueError, match="16 encoder tokens"):
        integ(torch.randn(1, 49, D))


# ---------------------------------------------------------------------------------------------- attention

def test_qformer_records_query_to_image_attention():
    c = ctx(3, 3, cls=True)  # N = 10, position 0 is CLS
    integ = build("qformer", c, cross_attention_every=2).eval()
    f = torch.randn(2, c.num_input_tokens, D)
    plain = integ(f)
    assert not integ.last_attention  # off by default
    integ.record_attention = True
    recorded = integ(f)
    assert torch.allclose(plain, recorded, atol=1e-5)  # recording does not change the result
    att = integ.last_attention
    assert att.filled() == {"latent_to_image": [0, 2], "latent_self": [0, 1, 2, 3]}
    for k in (0, 2):
        cross = att.latent_to_image[k]
        assert cross.shape == (2, 2, 6, 10)
        assert torch.allclose(cross.sum(-1), torch.ones(2, 2, 6), atol=1e-5) and (cross >= 0).all()
        assert not cross.requires_grad
    assert att.latent_self[1].shape == (2, 2, 6, 6)


def test_qformer_cross_attends_every_block_when_asked():
    integ = build("qformer", CONTEXTS["2x2"], cross_attention_every=1, num_layers=2)
    integ.record_attention = True
    integ(torch.randn(1, 4, D))
    assert sorted(integ.last_attention.latent_to_image) == [0, 1]


def test_resampler_records_latent_to_image_attention():
    c = ctx(3, 3, cls=True)
    integ = build("resampler", c).eval()
    f = torch.randn(2, c.num_input_tokens, D)
    plain = integ(f)
    integ.record_attention = True
    assert torch.allclose(plain, integ(f), atol=1e-5)
    att = integ.last_attention
    assert att.filled() == {"latent_to_image": [0, 1], "image_share": [0, 1]}
    for i in (0, 1):
        assert att.latent_to_image[i].shape == (2, 2, 5, 10)
        assert torch.allclose(att.latent_to_image[i].sum(-1), torch.ones(2, 2, 5), atol=1e-5)
        share = att.image_share[i]
        assert share.shape == (2, 2, 5) and (share > 0).all() and (share < 1).all()  # the rest went to the latents


def test_resampler_output_count_ignores_input_size():
    for c in CONTEXTS.values():
        assert build("resampler", c)(torch.randn(1, c.num_input_tokens, D)).shape == (1, 5 + 1, H)


# ---------------------------------------------------------------------------------------------- receptive fields

@pytest.mark.parametrize("where", list(CONTEXTS))
@pytest.mark.parametrize("name", CONV)
def test_receptive_field_rows_are_distributions_over_patches(name, where):
    c = CONTEXTS[where]
    integ = build(name, c)
    rf = integ.receptive_field()
    h, w = c.grid
    assert rf.shape == (integ.num_tokens, h * w)
    assert (rf >= 0).all()
    assert torch.allclose(rf.sum(1), torch.ones(integ.num_tokens), atol=1e-5)


def test_avg_pool_receptive_field_is_its_pooling_window():
    rf = build("avg_pool", ctx(4, 4)).receptive_field()  # 4×4 → 2×2
    first = torch.zeros(16)
    first[[0, 1, 4, 5]] = 0.25
    assert torch.allclose(rf[0], first)
    rf_cls = build("avg_pool", ctx(4, 4, cls=True), keep_cls=True).receptive_field()
    assert rf_cls.shape == (5, 16) and torch.allclose(rf_cls[0], torch.full((16,), 1 / 16))


def test_conv_receptive_fields_are_local():
    for name in ("ldp", "c_abstractor"):
        options = {"num_tokens": 16, "global_token": False} if name == "c_abstractor" else {}
        rf = build(name, ctx(7, 7), **options).receptive_field()
        assert rf[0, 0] > 0 and rf[0, 48] == 0  # the top-left token does not see the bottom-right patch
        assert rf[0, [0, 1, 7, 8]].sum() > 0.5  # and draws mostly on its own corner


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_a_config_error(name):
    with pytest.raises(ConfigError, match="Unknown option 'num_tokenz'"):
        build_integrator(IntegratorSpec(name=name, options={"num_tokenz": 4}), CONTEXTS["4x4"])


@pytest.mark.parametrize("name, options, message", [
    ("c_abstractor", {"num_tokens": 10}, "perfect square"),
    ("avg_pool", {"num_tokens": 8}, "perfect square"),
    ("avg_pool", {"num_tokens": 0}, "'num_tokens' of integrator 'avg_pool' must be at least 1"),
    ("c_abstractor", {"depth": 0}, "depth"),
    ("avg_pool", {"depth": 0}, "depth"),
    ("avg_pool", {"keep_cls": True}, "CLS"),
    ("ldp", {"stride": 4}, "stride"),
    ("qformer", {"hidden_dim": 10, "num_heads": 4}, "divisible"),
    ("qformer", {"cross_attention_every": 0}, "cross_attention_every"),
    ("qformer", {"num_queries": 0}, "num_queries"),
    ("qformer", {"dropout": 1.5}, "dropout"),
    ("resampler", {"num_latents": 0}, "num_latents"),
    ("resampler", {"num_layers": 0}, "num_layers"),
])
def test_bad_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_integrator(IntegratorSpec(name=name, options=options), CONTEXTS["4x4"])


def test_inconsistent_grid_is_refused():
    bad = IntegratorContext(vision_dim=D, num_input_tokens=10, grid=(3, 3), has_cls=False, llm_hidden=H)
    with pytest.raises(ConfigError, match="grid"):
        build_integrator(IntegratorSpec(name="avg_pool"), bad)


# ---------------------------------------------------------------------------------------------- end to end

E2E_OPTIONS = {
    "qformer": {"num_queries": 4, "num_layers": 2, "hidden_dim": 32, "num_heads": 2},
    "resampler": {"num_latents": 4, "num_layers": 1, "hidden_dim": 32, "num_heads": 2},
    "c_abstractor": {"num_tokens": 4, "depth": 1, "hidden_dim": 16},
    "avg_pool": {"num_tokens": 1, "keep_cls": False},
}


@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_loss_and_generation(name, tiny_config, example_image):
    from workbench.model import VisionLanguageModel

    Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
    config = dataclasses.replace(copy.deepcopy(tiny_config), integrator=IntegratorSpec(name=name, options=E2E_OPTIONS.get(name, {})))
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    assert model.num_visual_tokens == model.integrator.num_tokens
    batch = model.prepare_batch([Q + [{"role": "assistant", "content": "red"}]], [[example_image]])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.integrator.parameters())
    text = model.generate(Q, [example_image], max_new_tokens=4)
    assert isinstance(text, str)


# ---------------------------------------------------------------------------------------------- global token

GLOBAL = [n for n in NAMES if "global_token" in inspect.signature(INTEGRATORS.get(n)).parameters]


def test_the_abstractors_offer_a_global_token():
    assert {"qformer", "resampler", "c_abstractor"} <= set(GLOBAL)


@pytest.mark.parametrize("name", GLOBAL)
def test_global_token_comes_first_and_sees_the_whole_image(name):
    c = ctx(4, 4, cls=True)
    torch.manual_seed(0)
    integ = build(name, c, global_token=True).eval()
    assert integ.num_tokens == build(name, c, global_token=False).num_tokens + 1
    f = torch.randn(2, c.num_input_tokens, D)
    out = integ(f)
    assert out.shape == (2, integ.num_tokens, H)
    g = integ.global_token
    with torch.no_grad():
        expected = g.out_norm(g.proj(g.norm(f[:, 1:]).mean(dim=1)))
    assert torch.allclose(out[:, 0], expected, atol=1e-5)  # the patches' average, CLS left out
    shuffled = torch.cat([f[:, :1], f[:, 1 + torch.randperm(16)]], dim=1)
    assert torch.allclose(integ(shuffled)[:, 0], out[:, 0], atol=1e-5)  # where things are does not matter to it
    integ.record_attention = True
    integ(f)
    m = integ.patch_map()
    assert m.shape[-2:] == (integ.num_tokens, 16)
    assert torch.allclose(m[..., 0, :], torch.full_like(m[..., 0, :], 1 / 16))  # draws on every patch equally
    assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("name", GLOBAL)
def test_global_token_trains(name):
    torch.manual_seed(0)
    integ = build(name, CONTEXTS["4x4"], global_token=True, **({"hidden_dim": 32} if name == "c_abstractor" else {}))
    out = integ(torch.randn(2, 16, D))
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in integ.global_token.parameters())
