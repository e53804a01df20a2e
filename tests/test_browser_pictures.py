"""Pictures in a real browser (headless Chromium): Build and describe draws the architecture as a plot, and the
Evaluate tab scores a saved tiny model on a LLaVA JSON dataset and shows per-question-type bars beside the
text-only baseline. Screenshots go to $WORKBENCH_SCREENSHOTS (default artifacts/browser/).

Shared fixtures and gestures: tests/browser.py.
"""
import json

from browser import BROWSER, page, server, pick, fill, shot, tab, visible_text  # noqa: F401 -- fixtures
from conftest import image_beside

pytestmark = BROWSER


def test_build_draws_the_architecture(server, page):
    page.goto(server)
    page.get_by_text("VLLM Workbench").first.wait_for()
    page.get_by_role("button", name="Build and describe").click()
    drawn = page.locator("#architecture .js-plotly-plot")
    drawn.wait_for()
    text = drawn.inner_text()
    assert "49 tokens (7×7)" in text and "49 visual tokens" in text and "layer 29" in text
    shot(page, "pictures-01-architecture")


def test_evaluate_a_llava_dataset_shows_bars_by_question_type(server, page, tiny_model, tmp_path):
    model = tiny_model.save_pretrained(tmp_path / "saved")
    rows = [{"id": str(i), "image": image_beside(tmp_path / "data"), "meta": {"question_type": kind},
             "conversations": [{"from": "human", "value": f"<image>\nwhat {kind} is it?"},
                               {"from": "gpt", "value": answer}]}
            for i, (kind, answer) in enumerate([("color", "red"), ("shape", "circle")] * 2)]
    data = tmp_path / "data" / "qa.json"
    data.write_text(json.dumps(rows))
    page.goto(server)
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Evaluate")
    pick(page, "Run", str(model))
    pick(page, "Evaluation data", "llava")
    options = page.get_by_label("Evaluation data options (JSON)", exact=True)  # the kind's template comes first
    page.wait_for_function("(el) => el.value.includes('json_path')", arg=options.element_handle())
    fill(page, "Evaluation data options (JSON)", json.dumps({"json_path": str(data)}))
    fill(page, "Questions", 4)
    page.get_by_role("button", name="Evaluate").click()
    bars = page.locator("#eval-bars .js-plotly-plot")
    bars.wait_for(timeout=180_000)
    text = bars.inner_text()
    assert "color" in text and "shape" in text and "text-only baseline" in text
    visible_text(page, "4 questions").wait_for()
    assert "%" in page.locator("body").inner_text().split("4 questions")[1]
    shot(page, "pictures-02-evaluate-bars")
