"""The Attention tab's callbacks on families with different views (tiny models saved to a folder and typed as
the model source): the view list fits the model, the default renders without an error, the logit lens renders."""
import copy

import gradio as gr
import pytest
import torch

import workbench.app as app_module
from workbench.config import IntegratorSpec
from workbench.model import VisionLanguageModel


def saved_model(tiny_config, folder, integrator: str, **options) -> str:
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name=integrator, options=options)
    torch.manual_seed(0)
    VisionLanguageModel.from_config(config).save_pretrained(folder)
    return str(folder)


def chat_once(wb, source, image):
    out = None
    for out in wb.chat(source, str(image), "what color is the shape?", [], {}, 3, 0.0, 1.0):
        pass
    return out[1]


@pytest.mark.parametrize("integrator, views, default", [
    ("llama_adapter", ["gradient"], "gradient"),
    ("mlp", ["attention", "rollout", "relevancy", "gradient"], "relevancy"),
])
def test_the_attention_tab_offers_the_views_of_the_family(tmp_path, tiny_config, example_image, integrator, views,
                                                          default):
    wb = app_module.Workbench(tmp_path / "runs")
    source = saved_model(tiny_config, tmp_path / integrator, integrator)
    choices, explanation = wb.attention_views(source)
    assert choices["choices"] == views and choices["value"] == default
    assert f"{default} (default)" in explanation
    if integrator == "llama_adapter":
        assert "no visual tokens in the LLM's sequence" in explanation and "logit lens reads" in explanation
    state = chat_once(wb, source, example_image)
    # the app's old default ("attention") on a family without it: the best view is shown, and why
    overlay, heatmap, share, prompt, note, heads, method = wb.explain(source, state, 0, "mean", "attention", -1)
    assert overlay is not None and method["value"] == ("attention" if "attention" in views else default)
    assert any(t.type == "heatmap" for t in heatmap.data)
    if integrator == "llama_adapter":
        assert "No attention view for llama_adapter: showing gradient" in note
        assert not share.data and share.layout.annotations  # a note, not an error: no visual tokens to share
    figure, lens_note = wb.logit_lens_view(source, state, 0)
    assert any(t.type == "heatmap" for t in figure.data) and "final norm and LM head" in lens_note
    with pytest.raises(gr.Error, match="Chat first"):
        wb.logit_lens_view(source, {}, -1)
