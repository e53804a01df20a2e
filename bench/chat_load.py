"""Chat under load: 8 users ask the app at once, through its HTTP API, and every one gets an answer.

Starts the app (`workbench.app`) as `make run` does (its own process, loopback), then sends the Chat tab's
request (embedded default model, an example image, 32 new tokens) from 8 concurrent `gradio_client` sessions,
side by side with one request alone. The model is shared under a lock, so requests queue on it: the measure is
that all are answered and how long the last one waits.

Run: .venv/bin/python bench/chat_load.py [--quick] [--users N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from workbench.app_process import running_app  # noqa: E402

IMAGE = C.REPO / "examples" / "images" / "red_circle.png"


def ask(url: str, tokens: int) -> tuple[float, str]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    t0 = C.now()
    history, _ = client.predict("default", handle_file(str(IMAGE)), "What color is the shape?", [], tokens, 0.0, 1.0,
                                api_name="/chat")
    answer = history[-1]["content"]
    text = answer if isinstance(answer, str) else " ".join(part.get("text", "") for part in answer)
    return C.now() - t0, text.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 users, 8 tokens")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    users, tokens = (3, 8) if args.quick else (args.users, args.tokens)
    C.setup_environment()
    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp) / "runs") as url:  # stopped after the block
        ask(url, 2)  # warm-up: loads the model once
        single, _ = ask(url, tokens)
        t0 = C.now()
        with ThreadPoolExecutor(users) as pool:
            results = list(pool.map(lambda _: ask(url, tokens), range(users)))
        wall = C.now() - t0
    answered = sum(1 for _, text in results if text)
    latencies = [s for s, _ in results]
    headers = ["measure", "value"]
    rows = [["users", str(users)], ["answered", f"{answered}/{users}"], ["one request alone (s)", f"{single:.2f}"],
            ["all concurrent: wall (s)", f"{wall:.2f}"], ["median latency (s)", f"{statistics.median(latencies):.2f}"],
            ["slowest latency (s)", f"{max(latencies):.2f}"],
            ["wall / (users × alone)", f"{wall / (users * single):.2f}"]]
    print(C.text_table(headers, rows))
    if not args.quick:
        body = "\n".join([
            "## chat_load — concurrent chat requests through the app's HTTP API",
            "",
            f"the app (`workbench.app`) in its own process on loopback; {users} `gradio_client` sessions each send the "
            f"Chat tab's request at once (embedded default model, `examples/images/red_circle.png`, {tokens} new "
            "tokens, greedy), beside one request alone. The model is shared under a lock, so the requests queue "
            "on it; a ratio near 1.0 in the last row means the queue adds no overhead beyond serialising them.",
            "",
            f"- machine: {C.machine_line()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "- command: `.venv/bin/python bench/chat_load.py`",
            "- other load: not metered (the app server, a separate process, is the workload here)",
            "",
            C.markdown_table(headers, rows),
        ])
        C.write_results_section("chat_load", body)
    print(C.result_line("chat_load_answered", f"{answered}/{users}", f"{users}/{users}", answered == users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
