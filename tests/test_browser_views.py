"""The Attention tab in a real browser on a model whose integrator lives inside the LLM (LLaMA-Adapter: no visual
tokens in the sequence, so only the gradient view reaches the image): Explain with the defaults shows a map and
the reason the other views are absent, not an error; the logit lens renders its grid of words.
The model is built and saved with the public API and typed as the model source. Screenshots go to
$WORKBENCH_SCREENSHOTS (default artifacts/browser/).

Shared fixtures and gestures: tests/browser.py.
"""
import copy

import torch

from browser import BROWSER, page, server, pick, shot, tab, visible_text  # noqa: F401 -- fixtures
from workbench.config import IntegratorSpec
from workbench.model import VisionLanguageModel

pytestmark = BROWSER

LABEL = "Model (default = untrained embedded model; or a run)"


def no_error_toast(page) -> bool:
    return page.locator(".toast-body.error").count() == 0 and "Unexpected error" not in page.locator("body").inner_text()


def test_in_llm_adapter_attention_and_logit_lens(server, page, tiny_config, example_image, tmp_path):
    config = copy.deepcopy(tiny_config)
    config.integrator = IntegratorSpec(name="llama_adapter")
    torch.manual_seed(0)
    folder = tmp_path / "adapter-model"
    VisionLanguageModel.from_config(config).save_pretrained(folder)

    page.goto(server)
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Chat")
    pick(page, LABEL, str(folder))
    page.locator("#chat-image input[type=file]").set_input_files(str(example_image))
    page.get_by_label("Message", exact=True).fill("what color is the shape?")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => { const b = document.querySelectorAll('[data-testid=bot]');"
                           " return b.length && b[b.length - 1].innerText.trim().length > 0; }")

    # (a) opening the tab fills the view list for this family; Explain with the defaults shows a map
    tab(page, "Attention")
    visible_text(page, "Views for llama_adapter").wait_for()
    assert page.get_by_label("View", exact=True).input_value() == "gradient"
    body = page.locator("body").inner_text()
    assert "no visual tokens in the LLM's sequence" in body
    page.get_by_role("button", name="Explain").click()
    visible_text(page, "Answer tokens").wait_for()
    page.locator(".js-plotly-plot").filter(visible=True).first.wait_for()
    assert page.locator(".js-plotly-plot .heatmaplayer").filter(visible=True).count() >= 1
    assert no_error_toast(page)
    shot(page, "views-01-adapter-attention")

    # (b) the logit lens: a heatmap of the visual prompts' top words
    page.get_by_role("button", name="Read the visual tokens").click()
    visible_text(page, "final norm and LM head").wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                           ".some(t => t.textContent.startsWith('Logit lens'))")
    assert no_error_toast(page)
    shot(page, "views-02-logit-lens")
