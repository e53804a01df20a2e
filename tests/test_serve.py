"""The OpenAI-compatible endpoint, answered through the official `openai` client against a uvicorn server on
127.0.0.1 (a free port, a background thread, shut down at the end): non-streaming and streaming answers equal
the model's own greedy answers, concurrent requests share one generate batch, bad requests get 400 with
OpenAI's error body, the API key rule, a full queue, and `workbench serve` from the command line."""
from __future__ import annotations

import base64
import copy
import io
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from workbench import images as images_module  # noqa: E402
from workbench.serve import (GenerationBatcher, ServeSettings, check_exposure, create_app,  # noqa: E402
                             start_server)

QUESTION = "what color is the shape?"


def _data_url(path_or_image, fmt: str = "PNG") -> str:
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def model(tiny_config):
    from workbench.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(copy.deepcopy(tiny_config)).eval()


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeSettings(name="tiny", max_tokens=24, batch_window=0.3, max_batch=4))
    running = start_server(app)
    yield running, app
    running.stop()
    assert not running.thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key="unused-on-loopback", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def url(example_image):
    return _data_url(example_image)


def _expected(model, example_image, max_tokens: int = 8) -> str:
    return model.generate([{"role": "user", "content": "<image>\n" + QUESTION}], [example_image],
                          max_new_tokens=max_tokens)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_answer_equals_the_models_own_greedy_answer(client, model, url, example_image):
    response = client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=8)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _expected(model, example_image)
    assert choice.finish_reason in ("stop", "length") and response.usage.completion_tokens <= 8
    assert response.usage.prompt_tokens > model.num_visual_tokens  # the image's tokens are counted


def test_streaming_gives_the_same_answer_in_pieces(client, model, url, example_image):
    stream = client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant" and len(pieces) >= 2
    assert "".join(pieces) == _expected(model, example_image)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens <= 8


def test_concurrent_requests_share_one_generate_batch(client, server, model, url, example_image):
    batcher = server[1].state.batcher
    before = len(batcher.batches)
    answers = [None] * 3

    def ask(i):
        answers[i] = client.chat.completions.create(model="tiny", messages=_messages(url),
                                                    max_tokens=8).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(batcher.batches[before:]) >= 2  # grouped within the batch window
    assert answers == [_expected(model, example_image)] * 3


def test_max_tokens_and_stop_end_each_answer(client, model, url, example_image):
    full = _expected(model, example_image, 8)
    short = client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert full.startswith(short.choices[0].message.content)
    stop = full.strip()[len(full.strip()) // 2:][:2]
    if stop.strip():
        cut = client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=8, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


@pytest.mark.parametrize("case,code", [
    ("no image", "image_required"),
    ("image over the pixel limit", "invalid_image"),
    ("image over the byte limit", "image_too_large"),
    ("corrupt image", "invalid_image"),
    ("image URL without --allow-fetch", "image_fetch_disabled"),
    ("messages not a list", "invalid_messages"),
    ("unknown role", "invalid_messages"),
    ("unknown content part", "invalid_messages"),
    ("max_tokens over the limit", "invalid_value"),
    ("prompt too long", "context_length_exceeded"),
    ("placeholder typed in the text", "invalid_messages"),
])
def test_bad_requests_get_openai_400(client, url, monkeypatch, case, code):
    messages = _messages(url)
    extra = {}
    if case == "no image":
        messages = [{"role": "user", "content": QUESTION}]
    elif case == "image over the pixel limit":
        monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100)
    elif case == "image over the byte limit":
        monkeypatch.setattr(images_module, "MAX_IMAGE_BYTES", 100)
    elif case == "corrupt image":
        messages = _messages("data:image/png;base64," + base64.b64encode(b"not a png at all").decode())
    elif case == "image URL without --allow-fetch":
        messages = _messages("https://example.com/cat.png")
    elif case == "messages not a list":
        messages = "what color is the shape?"
    elif case == "unknown role":
        messages = [{"role": "robot", "content": "hi"}]
    elif case == "unknown content part":
        messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    elif case == "max_tokens over the limit":
        extra["max_tokens"] = 10_000
    elif case == "prompt too long":
        messages = _messages(url, "what color is the shape? " * 200)
    elif case == "placeholder typed in the text":
        messages = _messages(url, "<image> what color?")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages, **extra)
    assert info.value.status_code == 400 and info.value.code == code
    body = info.value.body
    assert body["type"] == "invalid_request_error" and body["message"]


def test_malformed_json_and_unknown_model(client, server):
    response = httpx.post(server[0].url + "/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


def test_an_exposed_server_needs_an_api_key(model, url, tmp_path, capsys):
    from workbench.cli import main

    with pytest.raises(Exception, match="WORKBENCH_API_KEY"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "secret")
    check_exposure("127.0.0.1", None)
    assert main(["serve", str(tmp_path / "no-model-needed"), "--host", "0.0.0.0"]) == 2  # refused before loading
    assert "WORKBENCH_API_KEY" in capsys.readouterr().err

    app = create_app(model, ServeSettings(name="tiny", api_key="s3cret-key", max_tokens=4))
    with start_server(app) as running:
        wrong = openai.OpenAI(base_url=running.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=running.url, api_key="s3cret-key", max_retries=0)
        answer = right.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2)
        assert answer.choices[0].message.content is not None


def test_a_full_queue_answers_429_and_drains(model, url):
    lock = threading.Lock()
    lock.acquire()  # the worker blocks on the model: requests pile up
    batcher = GenerationBatcher(model, max_batch=1, max_queue=1, batch_window=0.0, lock=lock)
    app = create_app(model, ServeSettings(name="tiny", max_tokens=4), batcher=batcher)
    with start_server(app) as running:
        client = openai.OpenAI(base_url=running.url, api_key="x", max_retries=0, timeout=60)
        results = []

        def ask():
            results.append(client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2))

        first = threading.Thread(target=ask)
        first.start()
        deadline = time.time() + 30
        while not batcher.batches and time.time() < deadline:  # the worker took it and waits for the model
            time.sleep(0.01)
        second = threading.Thread(target=ask)
        second.start()
        while batcher.waiting < 1 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2)
        assert info.value.status_code == 429 and info.value.code == "server_busy"
        lock.release()
        first.join(60)
        second.join(60)
        assert len(results) == 2


def test_workbench_serve_from_the_command_line(model, url, tmp_path, monkeypatch, capsys):
    """`workbench serve` as typed: the model folder loaded, the app built and run on uvicorn (whose blocking `run` is
    swapped for the same server in a thread, so the test can talk to it and stop it)."""
    import uvicorn

    from workbench.cli import main

    saved = model.save_pretrained(tmp_path / "saved")
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append(start_server(app, host, port)))
    monkeypatch.delenv("WORKBENCH_API_KEY", raising=False)
    assert main(["serve", str(saved), "--port", "0", "--name", "cli-tiny", "--max-tokens", "4"]) == 0
    assert "serving cli-tiny on http://127.0.0.1" in capsys.readouterr().out
    with started[0] as running:
        client = openai.OpenAI(base_url=running.url, api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["cli-tiny"]
        answer = client.chat.completions.create(model="cli-tiny", messages=_messages(url), max_tokens=3)
        assert answer.usage.completion_tokens <= 3
        with pytest.raises(openai.BadRequestError, match="between 1 and 4"):
            client.chat.completions.create(model="cli-tiny", messages=_messages(url), max_tokens=5)


def test_the_served_model_answers_in_the_chosen_dtype(model, tmp_path, monkeypatch):
    import torch

    from workbench import llm
    from workbench.serve import load_served_model

    folder = model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(llm, "cpu_has_fast_bf16", lambda: True)
    assert load_served_model(folder)[0].dtype == torch.bfloat16  # auto: bf16 where the CPU computes it
    assert load_served_model(folder, dtype="float32")[0].dtype == torch.float32
