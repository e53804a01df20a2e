"""What every browser test shares: the app in its own process, a headless Chromium page, screenshots, and the
few Gradio gestures the tests repeat (pick in a dropdown, fill a field, switch tab). Test files import the
fixtures (`from browser import server, page`) and mark themselves with `BROWSER`.

Needs Chromium (`apt-get install chromium`; .ci/run installs it): the tests are skipped with the reason where it
is missing.
"""
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("WORKBENCH_SCREENSHOTS", REPO / "artifacts" / "browser"))

BROWSER = [pytest.mark.browser,
           pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")]
"""The marks of every browser test file: `pytestmark = BROWSER`."""


@pytest.fixture()
def server(tmp_path, tiny_llm_dir):
    """The app as `make run` starts it (its own process, loopback), on a free port with its own runs folder."""
    from workbench.app_process import running_app

    try:
        with running_app(tmp_path / "runs", log_path=tmp_path / "app.log", env={"OMP_NUM_THREADS": "1"}) as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()
        browser.close()


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def pick(page, label, value):
    """Set a Gradio dropdown (a combobox input) to `value`, typed (custom values allowed) and confirmed."""
    box = page.get_by_label(label, exact=True)
    box.click()
    box.fill(value)
    option = page.get_by_role("option", name=value, exact=True)
    if option.count():
        option.first.click()  # a listed choice: pick it from the list
    else:
        box.press("Enter")  # a custom value (a local folder, a run id)
    page.keyboard.press("Escape")
    assert box.input_value() == value, f"{label}: {box.input_value()!r} instead of {value!r}"


def fill(page, label, value):
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


def visible_text(page, text):
    """The first *visible* element with this text (hidden tabs and option lists hold copies)."""
    return page.get_by_text(text).filter(visible=True).first


def tab(page, name):
    page.get_by_role("tab", name=name, exact=True).click()
