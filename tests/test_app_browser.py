"""The Gradio workbench in a real browser (headless Chromium driven by Playwright), as a new user goes through it:
build the default model, launch a tiny training run and watch it finish, reload the page mid-run and find the
run still there, chat about an uploaded image (streamed answer), open the attention view and get a heatmap,
and see an upload that is not an image refused. Screenshots of each step go to $WORKBENCH_SCREENSHOTS
(default artifacts/browser/), which .ci/run keeps.

Shared fixtures and gestures: tests/browser.py.
"""
import json

from browser import BROWSER, page, server, pick, fill, shot, tab, visible_text  # noqa: F401 -- fixtures

pytestmark = BROWSER


def test_a_new_user_trains_chats_and_looks_inside(server, page, tiny_llm_dir, example_image, llava_data, tmp_path):
    data = llava_data
    page.goto(server)
    page.get_by_text("VLLM Workbench").first.wait_for()
    shot(page, "01-opened")

    # Build: the embedded default, described
    page.get_by_role("button", name="Build and describe").click()
    visible_text(page, "visual tokens").wait_for()
    page.get_by_text("smollm2-135m-instruct: 30 layers").wait_for()
    assert "49 visual tokens" in page.locator("body").inner_text()
    shot(page, "02-built-default")

    # a tiny LLM for the training run (a local folder typed into the LLM picker), tiny data
    pick(page, "LLM", str(tiny_llm_dir))
    tab(page, "Data")
    pick(page, "Dataset", "llava")
    options = page.get_by_label("Loader options (JSON)", exact=True)  # picking a dataset fills in its template first
    page.wait_for_function("(el) => el.value.includes('path/to')", arg=options.element_handle())
    fill(page, "Loader options (JSON)", json.dumps({"json_path": str(data)}))
    tab(page, "Train")
    pick(page, "Recipe", "custom (from the Build tab)")  # the Build tab's pickers, the Data tab's dataset
    fill(page, "Time budget (minutes, 0 = none)", 0)
    fill(page, "Batch size", 4)
    fill(page, "Epochs per stage", 40)  # long enough to reload mid-run
    fill(page, "Run name (optional)", "browser run")
    page.get_by_role("button", name="Launch in the background").click()
    status = page.get_by_label("Status", exact=True)
    page.wait_for_function("(el) => el.value.includes('browser-run')", arg=status.element_handle())
    run_id = status.input_value()
    assert run_id.endswith("browser-run")
    visible_text(page, "running").wait_for(timeout=120_000)
    shot(page, "03-training")

    # reload mid-run: the run is still there and still going
    page.reload()
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Runs")
    page.get_by_role("button", name="Refresh").click()
    visible_text(page, run_id).wait_for()
    assert page.get_by_text(run_id).filter(visible=True).count() >= 1
    shot(page, "04-reloaded-run-still-there")

    # watch it finish: the Train view re-attaches to the run, its curve appears and the status says completed
    tab(page, "Train")
    pick(page, "Run", run_id)
    visible_text(page, "completed").wait_for(timeout=240_000)
    page.locator(".js-plotly-plot").filter(visible=True).first.wait_for()
    assert "failed" not in page.locator("body").inner_text().split("Log tail")[0]
    shot(page, "05-finished-with-curve")

    # chat with it about an uploaded image: the answer streams in
    tab(page, "Chat")
    pick(page, "Model (default = untrained embedded model; or a run)", run_id)
    page.locator("#chat-image input[type=file]").set_input_files(str(example_image))
    page.get_by_label("Message", exact=True).fill("what color is the shape?")
    page.get_by_role("button", name="Send").click()
    page.locator("[data-testid=bot]").first.wait_for()
    page.wait_for_function("() => { const b = document.querySelectorAll('[data-testid=bot]');"
                           " return b.length && b[b.length - 1].innerText.trim().length > 0; }")
    answers = page.locator("[data-testid=bot]")
    assert answers.last.inner_text().strip()
    shot(page, "06-chat-answer")

    # the attention view of that answer
    tab(page, "Attention")
    page.get_by_role("button", name="Explain").click()
    visible_text(page, "Answer tokens").wait_for()
    page.locator(".js-plotly-plot").filter(visible=True).first.wait_for()
    assert page.locator(".js-plotly-plot").filter(visible=True).count() >= 3  # heatmap, share, prompt views
    shot(page, "07-attention")

    # a file that is not an image is refused with a readable message
    tab(page, "Chat")
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    page.get_by_role("button", name="New chat").click()
    page.locator("#chat-image input[type=file]").set_input_files(str(fake))
    visible_text(page, "Not an image file").wait_for()
    assert "notes.png" in page.locator("body").inner_text()
    shot(page, "08-refused-upload")
