"""The batching scheduler (workbench.batching) on a tiny model: first come first served across sampling settings,
batch and queue bounds, cancelled requests free their slots, a bad image fails only its own request."""
import threading
import time

import pytest

from workbench.batching import GenerationBatcher, GenerationJob, ServerBusy, stream_answer

QUESTION = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]


class Recorder:
    """Collects every job's events in the order the worker sent them."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []
        self.done = threading.Event()
        self.expected = 0

    def job(self, name: str, images, **kw) -> GenerationJob:
        def sink(kind, value):
            self.events.append((name, kind, value))
            if kind in ("done", "error") and sum(k in ("done", "error") for _, k, _ in self.events) >= self.expected:
                self.done.set()

        return GenerationJob(list(QUESTION), list(images), kw.pop("max_tokens", 4), sink=sink, **kw)

    def ended(self) -> list[str]:
        return [name for name, kind, _ in self.events if kind in ("done", "error")]

    def of(self, name: str, kind: str) -> list:
        return [value for n, k, value in self.events if n == name and k == kind]


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture()
def blocked(tiny_model):
    """A batcher whose worker blocks on the model lock until the test releases it (requests pile up)."""
    lock = threading.Lock()
    lock.acquire()
    made = []

    def make(**kw):
        batcher = GenerationBatcher(tiny_model.eval(), batch_window=0.0, lock=lock, **kw)
        made.append(batcher)
        return batcher, lock

    yield make
    if lock.locked():
        lock.release()
    for b in made:
        b.close()


def test_first_come_first_served_across_sampling_settings(blocked, example_image):
    batcher, lock = blocked(max_batch=2, max_queue=10)
    rec = Recorder()
    rec.expected = 5
    batcher.submit(rec.job("a0", [example_image]))
    wait_for(lambda: batcher.batches)  # the worker took a0 and waits for the model
    batcher.submit(rec.job("b", [example_image], temperature=0.7))  # another sampling key, earlier than a1…a3
    for i in (1, 2, 3):
        batcher.submit(rec.job(f"a{i}", [example_image]))
    lock.release()
    assert rec.done.wait(120)
    ended = rec.ended()
    assert ended.index("b") < ended.index("a1")  # not starved by the later matching requests
    assert list(batcher.batches) == [1, 1, 2, 1]  # a0 · b alone · a1+a2 (max_batch 2) · a3
    assert all(rec.of(n, "done") for n in ("a0", "a1", "a2", "a3", "b"))


def test_a_bad_image_fails_only_its_own_request(blocked, example_image, tmp_path):
    batcher, lock = blocked(max_batch=4, max_queue=10)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rec = Recorder()
    rec.expected = 4
    batcher.submit(rec.job("first", [example_image]))
    wait_for(lambda: batcher.batches)
    batcher.submit(rec.job("good1", [example_image]))
    batcher.submit(rec.job("bad", [bad]))
    batcher.submit(rec.job("good2", [example_image]))
    lock.release()
    assert rec.done.wait(120)
    (error,) = rec.of("bad", "error")
    assert "\n" not in str(error).strip() and str(error)
    assert rec.of("good1", "done") and rec.of("good2", "done")
    assert rec.of("good1", "done")[0]["text"] == rec.of("good2", "done")[0]["text"]
    assert list(batcher.batches) == [1, 2]  # the two good ones still answered together


def test_a_request_cancelled_while_waiting_frees_its_slot(blocked, example_image):
    batcher, lock = blocked(max_batch=1, max_queue=2)
    rec = Recorder()
    rec.expected = 3
    batcher.submit(rec.job("first", [example_image]))
    wait_for(lambda: batcher.batches)
    leaving = rec.job("leaving", [example_image])
    batcher.submit(leaving)
    batcher.submit(rec.job("second", [example_image]))
    with pytest.raises(ServerBusy, match="waiting already"):  # the queue bound
        batcher.submit(rec.job("refused", [example_image]))
    batcher.cancel(leaving)
    assert batcher.waiting == 1
    batcher.submit(rec.job("third", [example_image]))  # the freed slot
    lock.release()
    assert rec.done.wait(120)
    assert sorted(rec.ended()) == ["first", "second", "third"]
    assert not [e for e in rec.events if e[0] in ("leaving", "refused")]
    assert max(batcher.batches) == 1  # the batch bound


def test_a_request_cancelled_while_generating_stops_and_the_others_finish(tiny_model, example_image):
    batcher = GenerationBatcher(tiny_model.eval(), max_batch=2, batch_window=0.5)
    rec = Recorder()
    rec.expected = 1
    jobs = {}

    def leave_after_first(kind, value):
        rec.events.append(("leaver", kind, value))
        if kind == "delta":
            batcher.cancel(jobs["leaver"])

    try:
        jobs["leaver"] = GenerationJob(list(QUESTION), [example_image], 24, sink=leave_after_first)
        stayer = rec.job("stayer", [example_image], max_tokens=24)
        batcher.submit(jobs["leaver"])
        batcher.submit(stayer)
        assert rec.done.wait(120)
        assert list(batcher.batches) == [2]
        assert rec.of("stayer", "done") and not rec.of("leaver", "done")
        assert len(rec.of("leaver", "delta")) <= 1  # nothing more streamed after leaving
        after = Recorder()
        after.expected = 1
        batcher.submit(after.job("next", [example_image]))  # the worker is free for the next request
        assert after.done.wait(120) and after.of("next", "done")
    finally:
        batcher.close()


def test_closing_the_stream_cancels_the_job(tiny_model, example_image):
    batcher = GenerationBatcher(tiny_model.eval(), max_batch=2, batch_window=0.0)
    try:
        job = GenerationJob(list(QUESTION), [example_image], 16)
        pieces = stream_answer(batcher, job)
        first = next(pieces)  # a browser tab got its first words, then closed
        pieces.close()
        assert first and job.cancelled
        whole = "".join(stream_answer(batcher, GenerationJob(list(QUESTION), [example_image], 4)))
        assert whole.strip()
    finally:
        batcher.close()


def test_a_burst_keeps_the_batch_open_until_it_stops_arriving(tiny_model, example_image):
    """Requests arriving one after another, each within the window of the last, join one batch even though the
    burst lasts longer than one window; a request after the burst has ended starts the next batch."""
    batcher = GenerationBatcher(tiny_model.eval(), max_batch=8, batch_window=0.3, max_wait=10.0)
    try:
        rec = Recorder()
        rec.expected = 5
        for i in range(4):
            batcher.submit(rec.job(f"r{i}", [example_image]))
            time.sleep(0.15)  # 4 arrivals over 0.45 s: longer than one window, each within it of the last
        assert rec.done.wait(0.0) is False
        wait_for(lambda: len(rec.ended()) == 4, timeout=120)
        batcher.submit(rec.job("late", [example_image]))
        assert rec.done.wait(120)
        assert list(batcher.batches) == [4, 1]
    finally:
        batcher.close()


def test_a_reader_that_falls_behind_gets_the_pieces_joined(tiny_model, example_image):
    batcher = GenerationBatcher(tiny_model.eval(), batch_window=0.0)
    try:
        alone = "".join(stream_answer(batcher, GenerationJob(list(QUESTION), [example_image], 12)))
        pieces = []
        for piece in stream_answer(batcher, GenerationJob(list(QUESTION), [example_image], 12)):
            pieces.append(piece)
            time.sleep(1.0)  # a busy reader: the tiny model's other tokens are generated meanwhile
        assert alone and "".join(pieces) == alone  # nothing lost or repeated
        assert len(pieces) <= 2  # the first piece, then everything that came while the reader was busy
    finally:
        batcher.close()
