"""Which views exist per integrator family (`available_views`), that every offered view renders, that the
companion figures degrade to a note, and the logit lens on visual tokens, checked on a constructed model whose
answer is known. Every registered family is covered (a new one included) on the tiny models."""
import copy

import pytest
import torch

from workbench.attention import LOGIT_LENS, METHODS, available_views, image_map, trace_attention
from workbench.attention_figures import (heatmap_figure, logit_lens_figure, modality_share_figure,
                                         prompt_attention_figure)
from workbench.config import IntegratorSpec
from workbench.errors import ConfigError
from workbench.integrators import INTEGRATORS
from workbench.logit_lens import logit_lens, token_layout
from workbench.model import VisionLanguageModel

Q = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
SMALL = {"qformer": {"num_queries": 3}, "resampler": {"num_latents": 3}, "gated_xattn": {"every": 1},
         "c_abstractor": {"num_tokens": 4}, "avg_pool": {"num_tokens": 4}}
"""Small widths where a family's defaults are large; every other family runs at its defaults."""


def build(tiny_config, integrator, **options):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options={**SMALL.get(integrator, {}), **options})
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(config)


def is_note(fig) -> bool:
    return not fig.data and bool(fig.layout.annotations)


@pytest.mark.parametrize("name", INTEGRATORS.names())
def test_every_offered_view_renders_and_every_absent_one_says_why(tiny_config, example_image, name):
    model = build(tiny_config, name)
    views = available_views(model)
    assert views.integrator == name and views.default in views.views and "gradient" in views.views
    assert set(views.views) | (set(views.absent) - {LOGIT_LENS}) == set(METHODS)
    assert all(reason.strip() for reason in views.absent.values())
    assert available_views(model) is views  # remembered per model: the probe pass runs once
    trace = trace_attention(model, Q, [example_image], answer="red", relevancy=True)
    assert available_views(trace).views == views.views  # the probe and a real trace agree
    h, w = model.encoder.grid
    for method in views.views:
        amap = image_map(trace, 0, method)
        assert amap.shape == (h, w) and abs(float(amap.sum()) - 1) < 1e-4
        assert not is_note(heatmap_figure(trace, 0, method))
    for method in set(views.absent) - {LOGIT_LENS}:
        with pytest.raises(ConfigError):
            image_map(trace, 0, method)
        assert is_note(heatmap_figure(trace, 0, method))
    share = modality_share_figure(trace)
    assert is_note(share) == ("modality share" in views.figures)
    assert prompt_attention_figure(trace, 0).data
    explanation = views.explanation()
    assert f"{views.default} (default)" in explanation
    assert all(reason in explanation for reason in views.absent.values())
    if views.lens:
        lens = logit_lens(model, Q, [example_image], top_k=3)
        assert lens.probs.shape[1:] == (len(lens.token_labels), 3) and len(lens.layer_names) == lens.probs.shape[0]
        assert ((lens.probs >= 0) & (lens.probs <= 1)).all() and (lens.probs.diff(dim=-1) <= 0).all()
        fig = logit_lens_figure(lens, layer=0)
        assert any(t.type == "heatmap" for t in fig.data)
    else:
        assert LOGIT_LENS in views.absent


def test_in_llm_prompts_offer_only_the_gradient_view_and_are_read_by_the_lens(tiny_config, example_image):
    model = build(tiny_config, "llama_adapter")
    views = available_views(model)
    assert views.views == ["gradient"] and views.default == "gradient"
    assert "no visual tokens in the LLM's sequence" in views.absent["attention"]
    lens = logit_lens(model, Q, [example_image])
    assert lens.layout is None and lens.layer_names == [f"layer {i}" for i in model.integrator.adapted_layers]
    assert len(lens.token_labels) == model.integrator.prompts.shape[1]


def test_grid_families_keep_their_grid_and_query_families_are_a_row(tiny_config, example_image):
    grid = tuple(build(tiny_config, "mlp").encoder.grid)
    assert logit_lens(build(tiny_config, "mlp"), Q, [example_image]).layout == grid
    assert logit_lens(build(tiny_config, "c_abstractor", num_tokens=4), Q, [example_image]).layout == (2, 2)
    whole = logit_lens(build(tiny_config, "avg_pool", num_tokens=1), Q, [example_image])
    assert whole.layout is None and whole.summary == [0]  # one token pooling every patch summarises the image
    assert logit_lens(build(tiny_config, "qformer"), Q, [example_image]).layout is None


def test_token_layout_reads_grids_from_fixed_patch_maps():
    eye = torch.eye(16)
    assert token_layout(eye, True, (4, 4)) == ((4, 4), [])
    assert token_layout(eye, False, (4, 4)) == (None, [])  # an attention map places nothing
    with_cls = torch.cat([torch.full((1, 16), 1 / 16), eye])
    assert token_layout(with_cls, True, (4, 4)) == ((4, 4), [0])
    pooled = torch.zeros(4, 16)  # 2×2 average pooling of a 4×4 grid, row-major
    for t in range(4):
        r, c = divmod(t, 2)
        for y in range(2 * r, 2 * r + 2):
            for x in range(2 * c, 2 * c + 2):
                pooled[t, y * 4 + x] = 0.25
    assert token_layout(pooled, True, (4, 4)) == ((2, 2), [])
    assert token_layout(pooled[[1, 0, 3, 2]], True, (4, 4)) == (None, [])  # not row-major: no grid claimed
    assert token_layout(eye[:3], True, (4, 4)) == ((1, 3), [])  # three patches of the first row
    assert token_layout(eye[[0, 1, 4]], True, (4, 4)) == (None, [])  # three patches in no rectangle


def _plant_words(model, image, words: list[int], scale: float = 20.0) -> None:
    """Set a linear projector (no norms) so visual token k's embedding is `scale` × the LM head's row of
    words[k]: the least-squares map from this image's encoder features to those rows, exact for a few tokens.
    The final norm's gain is raised so the read-out is sharp (a token's own row then dominates its logits)."""
    with torch.no_grad():
        features = model.encode_images(model.pixel_values([image]))[0].float()  # (tokens, D_v)
        head = model.llm.get_output_embeddings().weight.float()
        targets = scale * head[words] / head[words].norm(dim=-1, keepdim=True)
        weight = (torch.linalg.pinv(features) @ targets).T
        model.integrator.proj.weight.copy_(weight)
        model.integrator.proj.bias.zero_()
        model.llm.model.norm.weight.mul_(10)  # the final RMSNorm removes scale: sharpen the read-out instead


def test_the_logit_lens_reads_a_planted_word_at_every_layer_of_an_identity_stack(tiny_config, example_image):
    from workbench.images import load_image

    model = build(tiny_config, "linear", input_norm="none", output_norm=False)
    tok = model.tokenizer
    pieces = [tok.encode(w, add_special_tokens=False) for w in (" red", " blue", " green", " circle")]
    assert all(len(p) == 1 for p in pieces)  # whole words of the tiny vocabulary
    words = [p[0] for p in pieces]
    image = load_image(example_image)
    _plant_words(model, image, words)
    lens = logit_lens(model, Q, [image], top_k=3)
    assert lens.layout == tuple(model.encoder.grid) == (2, 2)
    assert lens.ids[0, :, 0].tolist() == words  # the embeddings read as the planted words, patch by patch
    assert (lens.probs[0, :, 0] > 0.5).all()
    assert lens.top_words(0) == [tok.decode([w]) for w in words]
    # an identity stack: no layer writes into the residual stream, so every layer reads the same words
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    lens = logit_lens(model, Q, [image], top_k=3)
    assert all(lens.ids[i, :, 0].tolist() == words for i in range(len(lens.layer_names)))
    fig = logit_lens_figure(lens, layer=-1)
    shown = [t for t in fig.data if t.type == "heatmap" and t.visible]
    assert len(shown) == 1 and [w for row in shown[0].text for w in row] == [w.strip() for w in lens.top_words(-1)]


def test_logit_lens_errors_are_clear(tiny_config, example_image):
    model = build(tiny_config, "mlp")
    with pytest.raises(ConfigError, match="Image 1 does not exist"):
        logit_lens(model, Q, [example_image], image=1)
    lens = logit_lens(model, Q, [example_image])
    with pytest.raises(ConfigError, match="layer must be in"):
        lens.top_words(7)
