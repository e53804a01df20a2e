"""A recipe launched from the browser: the Train tab opens on the recipe that learns (its summary and measured
accuracy shown), a user edits it to finish in seconds (a tiny LLM typed as a local folder, tiny data, no time
budget, a small batch), launches it, and watches it reach `completed`. Screenshots as in test_app_browser.py.
"""
import json

from browser import BROWSER, page, server, pick, fill, shot, tab, visible_text  # noqa: F401 -- fixtures

pytestmark = BROWSER


def test_a_recipe_is_picked_edited_launched_and_finishes(server, page, tiny_llm_dir, llava_data):
    data = llava_data
    page.goto(server)
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Train")
    assert page.get_by_label("Recipe", exact=True).input_value() == "fast_easyvqa.yaml"  # the one that learns
    visible_text(page, "measured: 99.90%").wait_for()  # from bench/RESULTS.md, not invented
    visible_text(page, "layers 22–29").wait_for()
    shot(page, "recipes-01-default-recipe")

    # a wrong edit is refused with its reason, and nothing is launched
    fill(page, "PEFT layers", "top eight")
    page.get_by_role("button", name="Launch in the background").click()
    visible_text(page, "'layers' of PEFT method lora must be int").wait_for()
    shot(page, "recipes-02-refused-edit")

    fill(page, "PEFT layers", "0, 1")
    fill(page, "Recipe LLM", str(tiny_llm_dir))
    pick(page, "Recipe dataset", "llava")
    fill(page, "Recipe dataset options (JSON)", json.dumps({"json_path": str(data)}))
    fill(page, "Overall time budget (minutes, 0 = none)", 0)
    fill(page, "Batch size", 4)
    fill(page, "Run name (optional)", "recipe run")
    page.get_by_role("button", name="Launch in the background").click()
    status = page.get_by_label("Status", exact=True)
    page.wait_for_function("(el) => el.value.includes('recipe-run')", arg=status.element_handle())
    run_id = status.input_value()
    visible_text(page, "completed").wait_for(timeout=300_000)
    assert "failed" not in page.locator("body").inner_text().split("Log tail")[0]
    shot(page, "recipes-03-finished")

    # the run's saved config is now a recipe too
    page.reload()
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Train")
    pick(page, "Recipe", f"run {run_id} (completed)")
    visible_text(page, "llava (json_path=").wait_for()
    shot(page, "recipes-04-saved-run-as-recipe")
