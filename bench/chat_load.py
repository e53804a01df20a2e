"""Chat under load: a class asks the app at once, through its HTTP API; answers are batched across users.

Starts the app (`workbench.app`) as `make run` does (its own process, loopback, default bounds) and sends the
Chat tab's request (an example image, 32 new tokens, greedy) from concurrent users, each a lean HTTP client
that drives the Chat tab as a browser does (the image uploaded once, each question one call of the chat event,
its answer streamed back).

Part 1, one model (the embedded default): for each user count (16 and 32), all users ask at once — answered,
wall time, p50/p95 latency — and 16 users asking one after another (one at a time). The result is the speedup
`16 users one at a time ÷ 16 users at once` (target ≥ 4: batching, not a queue), measured in back-to-back pairs
(`--repeat`, default 3; the median pair counts) because this machine's speed drifts between minutes.

Part 2, many runs on one base: a few runs made from the embedded default (random integrators of different
families, saved through the public API, no training) are loaded one by one: the load time each extra run adds
to its first answer, and the app's memory (RSS) with the default alone vs with every run loaded; then the
users ask at once spread over all the runs (latency). The runs share the frozen encoder and LLM, so memory
grows by their integrators only.

Run: .venv/bin/python bench/chat_load.py [--quick] [--users 16 32] [--runs 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from workbench.app_process import running_app  # noqa: E402
from workbench.config import LLM_DTYPES  # noqa: E402
from workbench.llm import serving_dtype  # noqa: E402

IMAGE = C.REPO / "examples" / "images" / "red_circle.png"
QUESTION = "What color is the shape?"
INTEGRATORS = ("linear", "qformer", "resampler", "gated_xattn", "avg_pool", "c_abstractor")


class Student:
    """One user of the Chat tab, as a browser drives it: the image is uploaded once, when it is picked, and each
    question is one call of the chat event through gradio's HTTP API, whose answer streams back as server-sent
    events. A lean client (one pooled HTTP connection, no per-call upload or worker threads), because it runs on
    the same cores as the app it measures."""

    def __init__(self, url: str):
        import httpx

        self.url, self.http = url.rstrip("/"), httpx.Client(timeout=600)
        with open(IMAGE, "rb") as f:
            reply = self.http.post(f"{self.url}/gradio_api/upload", files=[("files", (IMAGE.name, f))])
        reply.raise_for_status()
        self.image = {"path": reply.json()[0], "orig_name": IMAGE.name, "meta": {"_type": "gradio.FileData"}}

    def ask(self, tokens: int, source: str = "default") -> tuple[float, str]:
        """Send the question, read the streamed answer to its end: (seconds, final answer text)."""
        t0 = C.now()
        call = self.http.post(f"{self.url}/gradio_api/call/chat",
                              json={"data": [source, self.image, QUESTION, [], tokens, 0.0, 1.0]})
        call.raise_for_status()
        event, last = None, None
        with self.http.stream("GET", f"{self.url}/gradio_api/call/chat/{call.json()['event_id']}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    if event == "error":
                        raise RuntimeError(f"the app answered with an error: {line.removeprefix('data:').strip()}")
                    if event in ("generating", "complete"):
                        last = line.removeprefix("data:")
                    if event == "complete":
                        break
        answer = json.loads(last)[0][-1]["content"] if last else ""
        text = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer
                                                               if isinstance(part, dict))
        return C.now() - t0, text.strip()


def at_once(clients: list, tokens: int, sources: list[str]) -> tuple[float, list[tuple[float, str]]]:
    t0 = C.now()
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(lambda i: clients[i].ask(tokens, sources[i % len(sources)]), range(len(clients))))
    return C.now() - t0, results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def app_rss_mb() -> float:
    """Resident memory of the app process (the benchmark's child)."""
    import psutil

    children = [p for p in psutil.Process().children(recursive=True) if "workbench.app" in " ".join(p.cmdline())]
    return sum(p.memory_info().rss for p in children) / 2 ** 20


def make_runs(folder: Path, n: int) -> list[str]:
    """`n` saved models on the embedded default's encoder and LLM, each with its own random integrator."""
    import torch

    from workbench.config import IntegratorSpec, ModelConfig
    from workbench.model import VisionLanguageModel

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        config = ModelConfig(integrator=IntegratorSpec(name=INTEGRATORS[i % len(INTEGRATORS)]))
        model = VisionLanguageModel.from_config(config)
        paths.append(str(model.save_pretrained(folder / f"run{i}-{config.integrator.name}")))
        del model
    return paths


def model_ceiling(users: int, tokens: int, dtype: str) -> tuple[float, float, float]:
    """The same request straight through `model.generate` in this process (no app, no HTTP, no streaming):
    `users` of them one at a time, then as one batch — the most batching can give on this machine — and the
    bytes of one unshared copy of the model (what each run would cost without the shared base)."""
    from workbench.config import ModelConfig
    from workbench.model_pool import ModelPool, tensor_bytes

    model = ModelPool(dtype=dtype).get("default", ModelConfig())  # as the app loads it (its serving dtype)
    messages = [{"role": "user", "content": f"{model.config.image_token}\n{QUESTION}"}]
    model.generate([messages], [[IMAGE]], max_new_tokens=tokens)  # warm-up
    t0 = C.now()
    for _ in range(users):
        model.generate([messages], [[IMAGE]], max_new_tokens=tokens)
    alone = C.now() - t0
    t0 = C.now()
    model.generate([messages] * users, [[IMAGE]] * users, max_new_tokens=tokens)
    together = C.now() - t0
    return alone, together, tensor_bytes(model) / 2 ** 20


def latency_rows(label: str, users: int, wall: float, results: list[tuple[float, str]]) -> list[list[str]]:
    latencies = [s for s, _ in results]
    answered = sum(1 for _, text in results if text)
    return [[f"{label}: answered", f"{answered}/{users}"], [f"{label}: wall (s)", f"{wall:.2f}"],
            [f"{label}: p50 latency (s)", f"{statistics.median(latencies):.2f}"],
            [f"{label}: p95 latency (s)", f"{percentile(latencies, 0.95):.2f}"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke check: 3 users, 8 tokens, 2 extra runs")
    parser.add_argument("--users", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=4, help="extra runs sharing the default's base (part 2)")
    parser.add_argument("--repeat", type=int, default=3, help="one-at-a-time / at-once pairs (part 1)")
    parser.add_argument("--dtype", default="auto", choices=LLM_DTYPES,
                        help="the app's serving dtype (--dtype float32: as before bf16 serving, to compare)")
    args = parser.parse_args()
    user_counts, tokens, n_runs = ([3], 8, 2) if args.quick else (args.users, args.tokens, args.runs)
    repeat = 1 if args.quick else max(1, args.repeat)
    sequential_users = min(user_counts) if args.quick else 16
    C.setup_environment()
    other = C.OtherLoad()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp) / "saved", n_runs)
        with running_app(Path(tmp) / "runs", log_path=Path(tmp) / "app.log",
                         env={"WORKBENCH_SERVE_DTYPE": args.dtype}) as url:  # stopped after the block
            clients = [Student(url) for _ in range(max(user_counts + [sequential_users]))]
            clients[0].ask(2)  # warm-up: loads the default model once
            single, _ = clients[0].ask(tokens)
            rows.append(["models answer in (the app's serving dtype)", serving_dtype("auto", "cpu", args.dtype)
                         .replace("auto", "float32")])
            rows.append(["one request alone (s)", f"{single:.2f}"])
            # part 1: one model, users one at a time vs at once, in pairs (this machine's speed drifts between
            # minutes: each pair is measured back to back and the median pair ratio is the result)
            ratios, walls, answered_all = [], {}, True
            for _ in range(repeat):
                t0 = C.now()
                sequential = [clients[i].ask(tokens) for i in range(sequential_users)]
                sequential_wall = C.now() - t0
                wall, results = at_once(clients[:sequential_users], tokens, ["default"])
                ratios.append((sequential_wall / wall, sequential_wall, wall, results))
                answered_all = answered_all and all(t for _, t in sequential) and all(t for _, t in results)
            speedup, sequential_wall, wall, results = sorted(ratios, key=lambda r: r[0])[len(ratios) // 2]
            rows.append([f"{sequential_users} users one at a time: wall (s), median pair", f"{sequential_wall:.2f}"])
            walls[sequential_users] = (wall, results)
            for users in user_counts:
                if users not in walls:
                    walls[users] = at_once(clients[:users], tokens, ["default"])
                    answered_all = answered_all and all(t for _, t in walls[users][1])
                rows += latency_rows(f"{users} users at once", users, *walls[users])
            rows.append([f"speedup ({sequential_users} one at a time ÷ at once), median of {repeat} pairs",
                         f"{speedup:.2f}"])
            rows.append(["speedup, every pair", " ".join(f"{r[0]:.2f}" for r in ratios)])
            # part 2: several runs on the default's base
            rss_one = app_rss_mb()
            loads = []
            for path in runs:
                first, _ = clients[0].ask(tokens, path)
                again, _ = clients[0].ask(tokens, path)
                loads.append(first - again)  # what loading the run added to its first answer
            rss_all = app_rss_mb()
            rows += [["extra runs sharing the base", str(n_runs)],
                     ["load time per extra run, median (s)", f"{statistics.median(loads):.2f}"],
                     ["app memory, default only (MiB)", f"{rss_one:,.0f}"],
                     [f"app memory, default + {n_runs} runs (MiB)", f"{rss_all:,.0f}"],
                     ["memory per extra run (MiB)", f"{(rss_all - rss_one) / n_runs:,.1f}"]]
            spread = min(user_counts)
            wall, results = at_once(clients[:spread], tokens, ["default", *runs])
            answered_all = answered_all and all(t for _, t in results)
            rows += latency_rows(f"{spread} users over {n_runs + 1} runs", spread, wall, results)
    alone, together, copy_mb = model_ceiling(sequential_users, tokens, args.dtype)
    rows += [[f"model alone, {sequential_users} one at a time: wall (s)", f"{alone:.2f}"],
             [f"model alone, {sequential_users} as one batch: wall (s)", f"{together:.2f}"],
             ["model alone: batching speedup (the ceiling here)", f"{alone / together:.2f}"],
             ["one unshared copy of the model (MiB)", f"{copy_mb:,.0f}"]]
    other.stop()
    headers = ["measure", "value"]
    print(C.text_table(headers, rows))
    passed = speedup >= 4 and answered_all
    if not args.quick and args.dtype == "auto":  # a comparison run (--dtype) prints its table only
        body = "\n".join([
            "## chat_load — a class chatting at once through the app's HTTP API",
            "",
            f"the app (`workbench.app`) in its own process on loopback with its default bounds; each user is a lean "
            "HTTP client driving the Chat tab as a browser does (its image uploaded once, when picked; each question "
            "one call of the chat event through gradio's HTTP API, the answer streamed back as server-sent events) "
            f"and sends the Chat tab's request (`examples/images/red_circle.png`, {tokens} new tokens, greedy). "
            f"Part 1, the embedded default model: {sequential_users} users one after another, then "
            f"{' and '.join(map(str, user_counts))} users at once — the app batches concurrent answers into one "
            f"generate call and streams each user's tokens; models answer in the app's serving dtype (auto: bf16 on "
            "a CPU that computes it natively, `--dtype float32` for comparison). "
            f"Part 2: {n_runs} runs saved from the embedded default "
            "(random integrators of different families: same frozen encoder and LLM) loaded into the same app: "
            "the time loading adds to a run's first answer, the app's resident memory with the default alone and "
            "with every run loaded (they share the base, so each adds only its integrator; resident memory moves "
            "by tens of MiB between readings anyway, so compare it with one unshared copy of the model), and users "
            "spread over all the runs at once. Last, without the app: the same request straight through "
            "`model.generate` in the benchmark's process, one at a time and as one batch — the most batching can "
            "give on this machine; the app's speedup is measured against the same one-at-a-time requests.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- command: `.venv/bin/python bench/chat_load.py --users {' '.join(map(str, user_counts))} --repeat {repeat}`",
            f"- {other.note()}",
            "",
            C.markdown_table(headers, rows),
            "",
            f"`RESULT chat_load_speedup {speedup:.2f} target >=4 {'PASS' if passed else 'MISS'}` (every request "
            "answered is part of the verdict).",
        ])
        C.write_results_section("chat_load", body)
    print(C.result_line("chat_load_speedup", f"{speedup:.2f}", ">=4", passed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
