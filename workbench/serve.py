"""An OpenAI-compatible endpoint for a trained model: `/v1/chat/completions` (streaming and not) and `/v1/models`.

`workbench serve RUN_OR_MODEL_DIR` runs it (FastAPI on uvicorn); `create_app(model)` builds the app and
`start_server(app)` runs one in a background thread (tests, notebooks). Any OpenAI client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-on-loopback")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

Batching (`GenerationBatcher`): concurrent requests are grouped into one `model.generate` call. One worker
thread owns the model: it takes the oldest waiting request, gathers up to `max_batch` more with the same
sampling settings that are waiting or arrive within `batch_window` seconds, and generates them as one
left-padded batch. Each request has its own stream (a per-row streamer decodes each row's tokens as they come)
and ends at its own EOS, `max_tokens` or stop string; the batch stops when every row has ended or every
client has gone. At most `max_queue` requests wait: beyond that a request gets 429 (server busy), never an
unbounded backlog. The batcher lives in `workbench.batching`, shared with the app's Chat tab.

Safety, as the app: the server binds 127.0.0.1; any other host needs an API key (`WORKBENCH_API_KEY`, or
`--api-key-file`), which clients send as `Authorization: Bearer KEY`. Images come as `image_url` data URLs
(`data:image/png;base64,…`), checked like every image the workbench reads (size, pixels, format); http(s)
URLs are fetched only when the server is started with `allow_fetch` (`--allow-fetch`), with the same limits.
A message's images are put in front of its text (`<image>\n…`), as the workbench's chat and LLaVA data do.
Bad requests — no image where the model needs one, an image over the limits, a malformed message list, too
many tokens — get OpenAI's JSON error with status 400, never a 500.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at definition time

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .batching import GenerationBatcher, GenerationJob, ServerBusy  # noqa: F401 -- the server's batching, shared with the app
from .errors import ConfigError, ImageError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "WORKBENCH_API_KEY"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- settings

@dataclass
class ServeSettings:
    name: str = "workbench-model"
    """The model id clients send (and /v1/models lists)."""
    api_key: str | None = None
    allow_fetch: bool = False
    """Fetch http(s) image URLs (off: data URLs only)."""
    require_image: bool = True
    """Refuse conversations without an image (the model was trained to answer about images)."""
    max_images: int = 4
    max_tokens: int = 512
    """The most new tokens one request may ask for (and the default when it does not say)."""
    default_max_tokens: int = 128
    max_batch: int = 8
    max_queue: int = 64
    batch_window: float = 0.02
    fetch_timeout: float = 10.0


def read_api_key(key_file: str | Path | None = None) -> str | None:
    """The API key from a file (one line) or $WORKBENCH_API_KEY; None when neither gives one."""
    raw = Path(key_file).read_text(encoding="utf-8").strip() if key_file else os.environ.get(API_KEY_ENV, "").strip()
    if key_file and not raw:
        raise ConfigError(f"API key file {key_file} is empty")
    return raw or None


def check_exposure(host: str, api_key: str | None) -> None:
    """The app's rule: loopback is open to this machine only; any other address needs an API key."""
    if host not in LOCAL_HOSTS and not api_key:
        raise ConfigError(f"--host {host} exposes the server beyond this machine: set {API_KEY_ENV}=<a secret key> "
                          f"or pass --api-key-file (clients then send it as their API key)")


# ---------------------------------------------------------------------------------------------- requests

def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise APIError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key,
                       code="invalid_type")
    if not low <= value <= high:
        raise APIError(f"'{key}' must be between {low:g} and {high:g}, got {value}", param=key,
                       code="invalid_value")
    return value


def _decode_data_url(url: str, index: str, max_bytes: int) -> bytes:
    header, sep, data = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise APIError("An image data URL must look like data:image/png;base64,<data>", param=index,
                       code="invalid_image_url")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise APIError(f"The image is about {len(data) * 3 // 4 / 2 ** 20:.1f} MiB; the limit is "
                       f"{max_bytes / 2 ** 20:.0f} MiB", param=index, code="image_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError("The image data URL is not valid base64", param=index, code="invalid_image_url") from None


def _fetch(url: str, index: str, max_bytes: int, timeout: float) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise APIError(f"Fetching the image gave HTTP {response.status_code}", param=index,
                               code="image_fetch_failed")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(f"The image at {url} is over {max_bytes / 2 ** 20:.0f} MiB", param=index,
                                   code="image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(f"Could not fetch the image: {e}", param=index, code="image_fetch_failed") from None


def parse_request(body: Any, settings: ServeSettings, image_token: str) -> dict[str, Any]:
    """Check an OpenAI chat-completions body and turn it into the workbench's conversation + images."""
    from .images import MAX_IMAGE_BYTES, load_image

    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != settings.name:
        raise APIError(f"The model '{model}' does not exist here; this server serves '{settings.name}'",
                       status=404, param="model", code="model_not_found")
    if body.get("n", 1) not in (1, None):
        raise APIError("Only n=1 is supported", param="n", code="invalid_value")
    if body.get("tools") or body.get("functions"):
        raise APIError("Tools are not supported by this model", param="tools", code="invalid_value")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_messages")
    conversation, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{where} must be an object with role and content", param=where, code="invalid_messages")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise APIError(f"{where}.role must be system, user or assistant, got {message.get('role')!r}",
                           param=f"{where}.role", code="invalid_messages")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise APIError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content",
                           code="invalid_messages")
        text = placeholders = ""
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(f"{at}.text must be a string", param=at, code="invalid_messages")
                if image_token in part["text"]:
                    raise APIError(f"{at} contains the image placeholder '{image_token}': send images as image_url "
                                   f"parts", param=at, code="invalid_messages")
                text += part["text"]
            elif kind == "image_url":
                if role != "user":
                    raise APIError(f"{at}: images belong in user messages", param=at, code="invalid_messages")
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise APIError(f"{at}.image_url.url must be a string", param=at, code="invalid_image_url")
                if len(images) >= settings.max_images:
                    raise APIError(f"At most {settings.max_images} images per request", param=at,
                                   code="too_many_images")
                if url.startswith("data:"):
                    data = _decode_data_url(url, at, MAX_IMAGE_BYTES)
                elif url.startswith(("http://", "https://")):
                    if not settings.allow_fetch:
                        raise APIError("This server does not fetch image URLs: send the image as a data URL "
                                       "(data:image/png;base64,…), or start it with --allow-fetch", param=at,
                                       code="image_fetch_disabled")
                    data = _fetch(url, at, MAX_IMAGE_BYTES, settings.fetch_timeout)
                else:
                    raise APIError(f"{at}: an image URL must be a data: URL (or http(s) with --allow-fetch)",
                                   param=at, code="invalid_image_url")
                try:
                    images.append(load_image(data))
                except ImageError as e:
                    raise APIError(str(e), param=at, code="invalid_image") from None
                placeholders += image_token + "\n"
            else:
                raise APIError(f"{at}.type must be text or image_url, got {kind!r}", param=at,
                               code="invalid_messages")
        # a message's images go in front of its text, where the workbench's chat and LLaVA-style data put them
        conversation.append({"role": role, "content": placeholders + text})
    if conversation[-1]["role"] != "user":
        raise APIError("The last message must be the user's", param="messages", code="invalid_messages")
    if settings.require_image and not images:
        raise APIError("This model answers questions about images: send at least one image_url part (a data URL)",
                       param="messages", code="image_required")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, settings.default_max_tokens, 1, settings.max_tokens,
                         integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop",
                       code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    return {"messages": conversation, "images": images, "max_tokens": max_tokens,
            "temperature": float(_number(body, "temperature", 0.0, 0.0, 2.0)),
            "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0)), "stop": stop, "stream": stream,
            "include_usage": bool(options.get("include_usage"))}


def prompt_tokens(model, messages: list[dict], images: list, max_tokens: int) -> int:
    """Tokens the prompt takes with its images; too long for the model (with the answer) is a 400."""
    try:
        encoded = model.encode_conversation(messages, len(images), add_generation_prompt=True)
    except ConfigError as e:
        code = "context_length_exceeded" if "max_length" in str(e) else "invalid_messages"
        raise APIError(str(e), param="messages", code=code) from None
    used = len(encoded.input_ids) + len(images) * (model.num_visual_tokens - 1)
    context = getattr(model.llm.config, "max_position_embeddings", None)
    if context and used + max_tokens > context:
        raise APIError(f"The prompt takes {used} tokens with its images and {max_tokens} more were asked for: the "
                       f"model's context is {context} tokens", param="max_tokens", code="context_length_exceeded")
    return used


# ---------------------------------------------------------------------------------------------- the app

def create_app(model, settings: ServeSettings | None = None, batcher: GenerationBatcher | None = None):
    """A FastAPI app serving `model` (a VisionLanguageModel) the OpenAI way."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    batcher = batcher or GenerationBatcher(model, settings.max_batch, settings.max_queue, settings.batch_window)
    created = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="VLLM Workbench", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.settings, app.state.model = batcher, settings, model
    max_body = 2 ** 20 + settings.max_images * 4 * (int(os.environ.get("WORKBENCH_MAX_IMAGE_BYTES",
                                                                       50 * 2 ** 20)) // 3 + 4)

    def error(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error(APIError(f"Invalid request: {e.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return error(APIError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None))

    def authorise(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError("Incorrect API key provided", status=401, code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.name, "waiting": batcher.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": created,
                                            "owned_by": "workbench"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            raise APIError(f"The request is {int(length) / 2 ** 20:.1f} MiB, over this server's limit", code="too_large")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError("The request body is not valid JSON", code="invalid_json") from None
        parsed = await asyncio.to_thread(parse_request, body, settings, model.config.image_token)
        used = await asyncio.to_thread(prompt_tokens, model, parsed["messages"], parsed["images"],
                                       parsed["max_tokens"])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = GenerationJob(parsed["messages"], parsed["images"], parsed["max_tokens"], parsed["temperature"],
                            parsed["top_p"], parsed["stop"],
                            sink=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        try:
            batcher.submit(job)
        except ServerBusy as e:
            raise APIError(str(e), status=429, code="server_busy", type="server_error") from None
        ident, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage(done: dict) -> dict:
            return {"prompt_tokens": used, "completion_tokens": done["completion_tokens"],
                    "total_tokens": used + done["completion_tokens"]}

        if not parsed["stream"]:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    if kind == "error":
                        raise APIError(f"Generation failed: {value}", status=500, type="server_error",
                                       code="generation_failed")
            except asyncio.CancelledError:
                batcher.cancel(job)
                raise
            return {"id": ident, "object": "chat.completion", "created": now, "model": settings.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": value["text"]},
                                 "finish_reason": value["finish_reason"], "logprobs": None}],
                    "usage": usage(value)}

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": now,
                                          "model": settings.name, "choices": [
                                              {"index": 0, "delta": delta, "finish_reason": finish,
                                               "logprobs": None}]}) + "\n\n"

        async def stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await events.get()
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, value["finish_reason"])
                        if parsed["include_usage"]:
                            yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk",
                                                         "created": now, "model": settings.name, "choices": [],
                                                         "usage": usage(value)}) + "\n\n"
                        break
                    else:
                        yield "data: " + json.dumps(APIError(f"Generation failed: {value}", status=500,
                                                             type="server_error").body()) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                batcher.cancel(job)  # a client that went away frees its place in the queue or its row of the batch

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------------------------------- running it

class RunningServer:
    """A uvicorn server in a background thread; `url` is its base (…/v1), `stop()` ends it."""

    def __init__(self, server, thread: threading.Thread, host: str, port: int):
        self.server, self.thread, self.host, self.port = server, thread, host, port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_server(app, host: str = "127.0.0.1", port: int | None = None, api_key: str | None = None,
                 timeout: float = 30.0) -> RunningServer:
    """Run `app` on uvicorn in a daemon thread (port None: a free one) and wait until it accepts connections."""
    import uvicorn

    check_exposure(host, api_key or getattr(getattr(app.state, "settings", None), "api_key", None))
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"workbench-serve-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"The server did not start on {host}:{port}")
        time.sleep(0.02)
    return RunningServer(server, thread, host, port)


def load_served_model(source: str | Path, registry=None, device: str | None = None, which: str = "model",
                      dtype: str = "auto"):
    """(model, name) for a run id, run folder or saved model folder, its LLM in `dtype` (`llm.serving_dtype`)."""
    from .config import load_model_config
    from .export import resolve_source
    from .llm import resolve_device, serving_dtype
    from .model import VisionLanguageModel

    run_dir, model_dir = resolve_source(source, registry, which)
    saved = load_model_config(Path(model_dir) / "config.yaml").llm
    chosen = serving_dtype(saved.dtype, resolve_device(str(device) if device else saved.device), dtype)
    model = VisionLanguageModel.from_pretrained(model_dir, device=device, dtype=chosen).eval()
    return model, (run_dir or model_dir).name


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          registry=None, device: str | None = None, on_ready: Callable[[str], None] | None = None,
          dtype: str = "auto") -> None:
    """Serve a trained model until interrupted (what `workbench serve` runs)."""
    import uvicorn

    settings = settings or ServeSettings()
    check_exposure(host, settings.api_key)  # before spending time on loading the model
    model, name = load_served_model(source, registry, device, dtype=dtype)
    if settings.name == ServeSettings.name:
        settings.name = name
    app = create_app(model, settings)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning")
