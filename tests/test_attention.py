"""Attention and relevancy views: distributions on the encoder's grid, composition through every integrator
family, known-answer constructions, PEFT-wrapped models, and agreement with normal generation."""
import copy

import pytest
import torch

from workbench.attention import (AttentionTrace, image_map, modality_share, prompt_attention, rollout,
                                 token_scores, trace_attention)
from workbench.attention_figures import heatmap_figure, modality_share_figure, overlay_image, prompt_attention_figure
from workbench.config import IntegratorSpec, PeftSpec
from workbench.errors import ConfigError
from workbench.model import VisionLanguageModel

Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]


def build(tiny_config, integrator="mlp", peft="none", **options):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options=options)
    if peft != "none":
        config.peft = PeftSpec(method=peft, r=4, alpha=8)
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config)


def assert_distribution(amap, grid):
    assert tuple(amap.shape) == tuple(grid)
    assert (amap >= 0).all() and abs(float(amap.sum()) - 1.0) < 1e-4


@pytest.mark.parametrize("integrator, options", [
    ("mlp", {}), ("linear", {}), ("avg_pool", {"num_tokens": 1}), ("c_abstractor", {"num_tokens": 4}),
    ("ldp", {}), ("qformer", {"num_queries": 3}), ("resampler", {"num_latents": 3}),
    ("gated_xattn", {"every": 1}), ("gated_xattn", {"every": 1, "global_token": False}), ("lavin_mma", {}),
])
def test_maps_are_distributions_on_the_grid_for_every_family(tiny_config, example_image, integrator, options):
    model = build(tiny_config, integrator, **options)
    trace = trace_attention(model, Q, [example_image], answer="red", relevancy=True)
    assert trace.answer_positions and trace.num_layers == model.llm.config.num_hidden_layers
    for method in ("attention", "rollout", "relevancy", "gradient"):
        if integrator == "gated_xattn" and method in ("rollout", "relevancy"):
            with pytest.raises(ConfigError, match="only through its cross-attention blocks"):
                image_map(trace, 0, method)
            continue
        for head in ("mean", "max", 0):
            assert_distribution(image_map(trace, 0, method, head), model.encoder.grid)
    assert_distribution(image_map(trace, 0, "attention", "mean", layers=[0]), model.encoder.grid)
    shares = modality_share(trace)
    assert len(shares) == trace.num_layers
    assert all(0 <= r["image"] <= 1 and abs(r["image"] + r["text"] - 1) < 1e-6 for r in shares)
    weights = prompt_attention(trace, 0)
    assert abs(sum(w for _, w in weights) - 1) < 1e-4 and len(weights) == trace.query_position(0) + 1


def test_the_gradient_view_is_read_after_the_integrators_layernorm(tiny_config, example_image):
    """A per-token LayerNorm ignores its input's scale, so the gradient at the raw features is orthogonal to them
    and |gradient · feature| is ~0 at every patch; the view reads gradient × input after the norm instead."""
    model = build(tiny_config, "mlp").eval()  # input_norm: layer (the default)
    # features at a real encoder's scale (the tiny random encoder's are ~1e-8, where LayerNorm's eps rules)
    context = model.integrator.context
    fixed = torch.randn(1, context.num_input_tokens, context.vision_dim, generator=torch.Generator().manual_seed(1))
    model.encode_images = lambda pixel_values: fixed.clone()
    trace = trace_attention(model, Q, [example_image], answer="red", relevancy=True)
    batch = model.prepare_batch([Q + [{"role": "assistant", "content": "red"}]], [[example_image]])
    feats = fixed.clone().requires_grad_(True)
    seen = []
    hook = model.integrator.norm.register_forward_hook(lambda m, a, out: seen.append(out) or out.retain_grad())
    try:
        out, inputs = model.run_llm(batch, feats)
    finally:
        hook.remove()
    position = trace.answer_positions[0]
    out.logits[0, position - 1].float().log_softmax(-1)[inputs.labels[0, position]].backward()
    raw = (feats.grad * feats).sum(-1).abs().detach()
    after = (seen[0].grad * seen[0]).sum(-1).abs().detach()
    assert float(raw.sum()) < 1e-3 * float(after.sum())
    assert torch.allclose(trace.gradient[0, 0], (after[0] / after[0].sum()).float(), atol=1e-4)


@pytest.mark.parametrize("integrator", ["llama_adapter"])
def test_adapters_inside_the_llm_get_the_gradient_view_and_a_clear_refusal(tiny_config, example_image, integrator):
    model = build(tiny_config, integrator)
    trace = trace_attention(model, Q, [example_image], answer="red", relevancy=True)
    assert_distribution(image_map(trace, 0, "gradient"), model.encoder.grid)
    with pytest.raises(ConfigError, match="no attention path.*gradient"):
        image_map(trace, 0, "attention")


def test_lora_wrapped_models_work(tiny_config, example_image):
    model = build(tiny_config, "mlp", peft="lora")
    trace = trace_attention(model, Q, [example_image], answer="red", relevancy=True)
    for method in ("attention", "relevancy", "gradient"):
        assert_distribution(image_map(trace, 0, method), model.encoder.grid)


def test_the_eager_pass_gives_the_answer_of_normal_generation(tiny_config, example_image):
    from workbench.attention import eager_attention
    from workbench.peft_modules import base_llm

    model = build(tiny_config)
    kernel = base_llm(model.llm).config._attn_implementation
    answer = model.generate(Q, [example_image], max_new_tokens=6)
    trace = trace_attention(model, Q, [example_image], max_new_tokens=6)  # generates, then the eager pass
    assert trace.answer == answer and trace.answer_positions
    with eager_attention(model.llm):
        assert base_llm(model.llm).config._attn_implementation == "eager"
        assert model.generate(Q, [example_image], max_new_tokens=6) == answer
    assert base_llm(model.llm).config._attn_implementation == kernel  # chat keeps its fast kernel


def _constructed_trace(patch_map, grid=(2, 2)):
    """A 6-position sequence [text, v0, v1, v2, v3, answer] whose only layer puts all of the answer's query
    (position 4, which produced the answer at 5) on visual token 2."""
    L = 6
    attn = torch.full((1, 2, L, L), 0.0)
    attn[0, :, :, 0] = 1.0
    attn[0, :, 4, 0] = 0.0
    attn[0, :, 4, 3] = 1.0  # position 3 = visual token 2
    return AttentionTrace(tokens=["q", "<image 0:0>", "<image 0:1>", "<image 0:2>", "<image 0:3>", "red"],
                          image_spans=[(1, 4)], answer_positions=[5], answer="red", attentions=attn,
                          patch_maps=[patch_map], grid=grid, integrator="constructed")


def test_known_attention_lands_on_its_patch():
    amap = image_map(_constructed_trace(torch.eye(4)), 0)
    assert amap.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]  # visual token 2 = patch (1, 0)
    # through a token→patch map that spreads token 2 over the bottom row, the mass follows it
    spread = torch.eye(4)
    spread[2] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert image_map(_constructed_trace(spread), 0).flatten().tolist() == [0.0, 0.0, 0.5, 0.5]
    trace = _constructed_trace(torch.eye(4))
    assert modality_share(trace)[0]["image"] == 1.0
    assert token_scores(trace, 0)[3] == 1.0 and rollout(trace).shape == (6, 6)


def test_composition_through_a_known_qformer_attention(tiny_config, example_image):
    """A Q-Former whose single query attends to one patch only maps every answer's attention onto that patch."""
    model = build(tiny_config, "qformer", num_queries=1, num_layers=1, cross_attention_every=1, global_token=False)
    block = model.integrator.blocks[0]
    proj = model.integrator.image_proj[1]
    with torch.no_grad():  # image tokens = position embeddings only, all zero: every key is zero
        proj.weight.zero_()
        proj.bias.zero_()
        model.integrator.position.zero_()
        block.cross_attn.k.bias.zero_()
    trace = trace_attention(model, Q, [example_image], answer="red")
    assert torch.allclose(image_map(trace, 0), torch.full(model.encoder.grid, 0.25), atol=1e-6)  # uniform
    with torch.no_grad():  # now only patch 3 has a key, aligned with the (constant) query
        pattern = torch.ones(proj.weight.shape[0])
        pattern[::2] = -1
        model.integrator.position[3] = pattern
        block.cross_attn.k.weight.copy_(torch.eye(pattern.numel()) * 100)
        block.cross_attn.q.weight.zero_()
        block.cross_attn.q.bias.copy_(pattern)
    trace = trace_attention(model, Q, [example_image], answer="red")
    amap = image_map(trace, 0)
    assert amap.flatten().argmax().item() == 3 and amap.flatten()[3] > 0.99


def test_errors_are_clear(tiny_config, example_image):
    model = build(tiny_config)
    trace = trace_attention(model, Q, [example_image], answer="red")
    with pytest.raises(ConfigError, match="relevancy=True"):
        image_map(trace, 0, "relevancy")
    with pytest.raises(ConfigError, match="head must be"):
        image_map(trace, 0, head="median")
    with pytest.raises(ConfigError, match="does not exist"):
        image_map(trace, 50)
    with pytest.raises(ConfigError, match="layers must be"):
        image_map(trace, 0, layers=[99])
    with pytest.raises(ConfigError, match="Image 3 does not exist"):
        image_map(trace, 0, image=3)


def test_figures_and_png(tiny_config, example_image, tmp_path):
    model = build(tiny_config)
    trace = trace_attention(model, Q, [example_image], answer="red")
    fig = heatmap_figure(trace, 0)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == trace.num_layers + 1 and fig.layout.sliders  # all layers + one per layer
    assert fig.data[0].type == "image" and tuple(map(len, (heatmaps[0].z, heatmaps[0].z[0]))) == model.encoder.grid
    menu = fig.layout.updatemenus[0].buttons  # answer tokens × heads (mean, max, each head)
    assert len(menu) == len(trace.answer_positions) * (2 + trace.num_heads)
    assert len(menu[0].args[0]["z"]) == len(heatmaps)
    assert len(modality_share_figure(trace).data) == 2
    assert prompt_attention_figure(trace, 0).data[0].type == "bar"
    picture = overlay_image(trace.images[0], image_map(trace, 0))
    assert picture.size == trace.images[0].size == (model.encoder.image_size,) * 2
