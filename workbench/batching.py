"""Many users, one model: concurrent requests answered together in one `model.generate` batch, each streamed.

Used by the OpenAI-compatible server (`serve.py`) and the app's Chat tab (through `ChatSession.send(...,
batcher=)`), so both front ends schedule the same way.

One worker thread owns generation. It takes the oldest waiting request (first come, first served across sampling
settings and models: a request is never starved by a stream of others that batch together), gathers up to
`max_batch - 1` more waiting that can share its batch — the same sampling settings, and the same model or another
run on the same shared LLM (`VisionLanguageModel.llm_batch_key`: each row's visual tokens from its own run, one
generate of the shared LLM) — and generates them as one left-padded batch. A batch stays open while matching
requests keep arriving, each within `batch_window` seconds of the last, for at most `max_wait` seconds in all: a
class pressing Send together arrives spread over its uploads, and a batch that left with the first few would make
the rest wait for it to finish; a lone user waits `batch_window` at most. Each request's inputs are prepared on
their own first (images loaded and checked, the conversation encoded), so a bad image fails only its own request
with a one-line error; a batch that still fails before its first token is retried one request at a time, so one bad
row never takes the others down.

Bounds: at most `max_batch` rows generate at once and at most `max_queue` requests wait (beyond that
`submit` raises `ServerBusy`, never an unbounded backlog). A request whose client leaves is `cancel`led: while
waiting it leaves the queue at once (its slot is free for the next); while generating its row stops streaming
and the batch ends as soon as every row has ended or left.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import ConfigError, WorkbenchError

log = logging.getLogger(__name__)


@dataclass
class GenerationJob:
    """One request's conversation in the batcher, with where its events go."""

    messages: list[dict[str, str]]
    images: list
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    sink: Callable[[str, Any], None] = lambda kind, value: None
    """Called from the worker thread with ("delta", text), then ("done", {"finish_reason", "completion_tokens",
    "text"}) or ("error", exception)."""
    cancelled: bool = False
    model: Any = None
    """The model that answers (None: the batcher's own). Jobs batch together only with jobs of models that run
    the same LLM computation (the same model, or runs on one shared base: `llm_batch_key`)."""
    group: Any = None
    """Set by the batcher on submit: the model's `llm_batch_key` (or its identity)."""

    @property
    def key(self) -> tuple:
        return (self.group, round(self.temperature, 6), round(self.top_p, 6))


class ServerBusy(WorkbenchError):
    """The batcher's queue is full."""


class _BatchDone(Exception):
    """Raised inside generate by the streamer once every row has ended: stops the batch early."""


def one_line(e: BaseException) -> str:
    """An error as the one line a user reads."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _RowStreamer:
    """A transformers streamer for a batch: each row's tokens are decoded as they come and handed to its job."""

    def __init__(self, jobs: list[GenerationJob], tokenizer, eos):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.finished: list[str | None] = [None] * len(jobs)
        self.hold = [max((len(s) for s in job.stop), default=1) - 1 for job in jobs]
        self._prompt_seen = False

    def _text(self, i: int) -> str:
        return self.tokenizer.decode(self.tokens[i], skip_special_tokens=True).lstrip()

    def _emit(self, i: int, text: str) -> None:
        if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
            self.jobs[i].sink("delta", text[len(self.sent[i]):])
            self.sent[i] = text

    def _finish(self, i: int, reason: str, text: str | None = None) -> None:
        if self.finished[i] is not None:
            return
        text = (self._text(i) if text is None else text).rstrip()
        self._emit(i, text)
        self.finished[i] = reason
        self.jobs[i].sink("done", {"finish_reason": reason, "completion_tokens": len(self.tokens[i]),
                                   "text": text})

    @property
    def started(self) -> bool:
        """Whether any row has produced a token (a failure after this cannot be retried without repeating it)."""
        return any(self.tokens) or any(f is not None for f in self.finished)

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate hands the prompt over first (empty here: inputs_embeds)
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.finished[i] is not None:
                continue
            if job.cancelled:
                self.finished[i] = "cancelled"
                continue
            if token in self.eos:
                self._finish(i, "stop")
                continue
            self.tokens[i].append(int(token))
            text = self._text(i)
            cut = min((text.find(s) for s in job.stop if s and s in text), default=-1)
            if cut >= 0:
                self._finish(i, "stop", text[:cut])
            elif len(self.tokens[i]) >= job.max_tokens:
                self._finish(i, "length", text)
            elif not text.endswith("\ufffd"):  # a multi-byte character still being completed
                self._emit(i, text[:len(text) - self.hold[i]] if self.hold[i] else text)
        if all(f is not None for f in self.finished):
            raise _BatchDone

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if self.finished[i] is None and self.jobs[i].cancelled:
                self.finished[i] = "cancelled"
            self._finish(i, "length")


class GenerationBatcher:
    """Groups concurrent requests into one `model.generate` batch; see the module docstring.

    `model`: the model jobs without their own use (None: every job names its model). `lock`: held while
    generating, so work that must not overlap generation (attention views on a CPU) can take it too."""

    def __init__(self, model=None, max_batch: int = 8, max_queue: int = 64, batch_window: float = 0.02, lock=None,
                 max_wait: float | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ConfigError("max_batch and max_queue must be at least 1")
        self.model, self.max_batch, self.max_queue, self.batch_window = model, max_batch, max_queue, batch_window
        self.max_wait = 10 * batch_window if max_wait is None else max_wait
        self.lock = lock or threading.RLock()
        self._waiting: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []
        """Sizes of the recent batches generated (the tests and the log read it; the last 10,000 kept)."""
        self.generating = 0
        """Rows in the batch being generated now."""
        self._thread = threading.Thread(target=self._run, name="workbench-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        """Queue a job (first come, first served); ServerBusy when `max_queue` jobs wait already."""
        if job.model is None and self.model is None:
            raise ConfigError("This batcher has no model of its own: the job must name its model")
        model = self._model(job)
        job.group = model.llm_batch_key() if hasattr(model, "llm_batch_key") else ("model", id(model))
        with self._cond:
            if self._closed:
                raise ServerBusy("The server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise ServerBusy(f"{len(self._waiting)} requests are waiting already (the limit): try again shortly")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: GenerationJob) -> None:
        """The client left: a waiting job leaves the queue now; a generating one stops at its next token."""
        job.cancelled = True
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def bounds(self) -> str:
        """The limits, as the app and the start-up line state them."""
        return (f"up to {self.max_batch} answers generated together, up to {self.max_queue} more waiting "
                f"(beyond that a request is refused as busy)")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> list[GenerationJob] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch = [first]
            opened = time.monotonic()
            deadline = opened + self.batch_window
            while len(batch) < self.max_batch:
                match = next((j for j in self._waiting if j.key == first.key), None)
                if match is not None:
                    self._waiting.remove(match)
                    batch.append(match)
                    deadline = min(time.monotonic() + self.batch_window, opened + self.max_wait)  # more may follow
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        return [j for j in batch if not j.cancelled]

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if self._prepare(j)]
            if batch:
                self._generate(batch)

    def _model(self, job: GenerationJob):
        return job.model if job.model is not None else self.model

    def _prepare(self, job: GenerationJob) -> bool:
        """Load and check one job's images and conversation on their own; a failure ends only this job."""
        from .images import load_image

        try:
            job.images = [load_image(im) for im in job.images]
            self._model(job).encode_conversation(job.messages, len(job.images), add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- this request's own fault: it hears why, the others go on
            job.sink("error", e)
            return False
        return True

    def _generate(self, jobs: list[GenerationJob]) -> None:
        from .model import generate_together

        models = [self._model(j) for j in jobs]
        model = models[0]
        eos = model.llm.generation_config.eos_token_id or model.tokenizer.eos_token_id
        streamer = _RowStreamer(jobs, model.tokenizer, eos)
        log.info("answering %d request(s) together, %d waiting", len(jobs), len(self._waiting))
        self.batches.append(len(jobs))
        if len(self.batches) > 10_000:
            del self.batches[:5_000]
        self.generating = len(jobs)
        started = time.monotonic()
        try:
            with self.lock:
                generate_together(models, [j.messages for j in jobs], [j.images for j in jobs],
                                  max_new_tokens=max(j.max_tokens for j in jobs), temperature=jobs[0].temperature,
                                  top_p=jobs[0].top_p, streamer=streamer)
        except _BatchDone:
            pass
        except Exception as e:  # noqa: BLE001 -- every waiting client hears why, the worker goes on
            if len(jobs) > 1 and not streamer.started:  # find the one row at fault: each alone
                for job in jobs:
                    self._generate([job])
                return
            for i, job in enumerate(jobs):
                if streamer.finished[i] is None:
                    streamer.finished[i] = "error"
                    job.sink("error", e)
            return
        finally:
            self.generating = 0
        streamer.end()
        log.info("answered %d request(s) together in %.2f s", len(jobs), time.monotonic() - started)


def stream_answer(batcher: GenerationBatcher, job: GenerationJob, timeout: float = 600.0) -> Iterator[str]:
    """Submit `job` and yield its text as it comes; returns when it is done, raises its error as one line.

    Pieces that arrived while the reader was busy are joined into one, so a reader that falls behind (a server
    streaming to a whole class) catches up in one update instead of one per token. A consumer that stops early
    (a browser tab closed: the generator is closed) cancels the job, which frees its place in the queue or its
    row in the batch."""
    events: queue.Queue = queue.Queue()
    job.sink = lambda kind, value: events.put((kind, value))
    batcher.submit(job)
    done = False
    try:
        while True:
            try:
                kind, value = events.get(timeout=timeout)
            except queue.Empty:
                raise WorkbenchError(f"No answer within {timeout:.0f} s: the server is overloaded") from None
            pending = []
            while kind == "delta":
                pending.append(value)
                try:
                    kind, value = events.get_nowait()
                except queue.Empty:
                    kind = None
            if pending:
                yield "".join(pending)
            if kind == "done":
                done = True
                return
            if kind == "error":
                done = True
                raise WorkbenchError(one_line(value)) from None
    finally:
        if not done:
            batcher.cancel(job)
