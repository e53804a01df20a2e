"""Two students chatting at once in two browser pages: both answers stream, generated together in one batch.

Shared fixtures and gestures: tests/browser.py. Screenshots go to $WORKBENCH_SCREENSHOTS (default artifacts/browser/).
"""
import time

import pytest

from browser import BROWSER, page, shot, tab  # noqa: F401 -- fixtures

pytestmark = BROWSER


@pytest.fixture()
def server(tmp_path):
    """The app as `make run` starts it, with a batch window wide enough for two clicks in two pages."""
    from workbench.app_process import running_app

    try:
        with running_app(tmp_path / "runs", log_path=tmp_path / "app.log",
                         env={"OMP_NUM_THREADS": "1", "WORKBENCH_CHAT_BATCH_WINDOW": "2.0"}) as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


ANSWERED = ("() => { const b = document.querySelectorAll('[data-testid=bot]');"
            " return b.length && b[b.length - 1].innerText.trim().length > 0; }")


def ask(page, url, model_dir, image, question):
    page.goto(url)
    page.get_by_text("VLLM Workbench").first.wait_for()
    tab(page, "Chat")
    box = page.get_by_label("Model (default = untrained embedded model; or a run)", exact=True)
    box.click()
    box.fill(str(model_dir))
    box.press("Enter")
    page.keyboard.press("Escape")
    page.locator("#chat-image input[type=file]").set_input_files(str(image))
    page.get_by_label("Message", exact=True).fill(question)


def test_two_pages_chatting_at_once_both_stream(server, page, tiny_model, example_image, tmp_path):
    model_dir = tiny_model.save_pretrained(tmp_path / "tiny-run")
    second = page.context.new_page()
    ask(page, server, model_dir, example_image, "what color is the shape?")
    ask(second, server, model_dir, example_image, "what shape is it?")
    assert "answers generated together" in page.locator("#chat-bounds").inner_text()  # the app states its bounds
    page.get_by_role("button", name="Send").click()
    second.get_by_role("button", name="Send").click()
    started = time.time()
    for p in (page, second):
        p.wait_for_function(ANSWERED, timeout=120_000)
        p.locator("[data-testid=user] img").first.wait_for()  # the asked-about image in the transcript
    for p in (page, second):
        assert p.locator("[data-testid=bot]").last.inner_text().strip()
    shot(page, "chat-two-pages-1")
    shot(second, "chat-two-pages-2")
    log = (tmp_path / "app.log").read_text()
    deadline = started + 60
    while "answering 2 request(s) together" not in log and time.time() < deadline:
        time.sleep(0.5)
        log = (tmp_path / "app.log").read_text()
    assert "answering 2 request(s) together" in log, log[-2000:]  # both in flight in one generate batch
