"""Helpers every benchmark shares: machine description, timing, token clocks, and the RESULTS.md writer.

Benchmarks are plain scripts (`.venv/bin/python bench/<name>.py`); each one prints a table, ends with
`RESULT <name> <value> target <target> <PASS|MISS>` and, on a full run, rewrites its own section of
bench/RESULTS.md so that file always shows the latest numbers for this machine.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"

RESULTS_HEADER = """# Benchmark results

Written by the scripts in `bench/`, one section per benchmark between `<!-- NAME:start -->` and
`<!-- NAME:end -->` markers. A full run of a benchmark (without `--quick`) replaces its own section, so
each section shows the machine, date, exact command, numbers and verdict of its latest run. Numbers
are medians over interleaved repetitions after warm-up; compare them only across the same machine.
"""

now = time.perf_counter
"""The one clock benchmarks use (monotonic, highest resolution)."""


def setup_environment() -> None:
    """Offline, quiet, reproducible: never wait on the hub, no tokenizer thread pools fighting torch's."""
    os.environ.setdefault("WORKBENCH_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from workbench.logs import quiet_libraries

    quiet_libraries()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """What a number depends on: CPU, cores, torch threads and library versions."""
    import torch
    import transformers

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def machine_line(m: dict[str, object] | None = None) -> str:
    m = m or machine()
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}, Python {m['python']}")


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used while a benchmark ran.

    On a small machine a concurrent test run or second benchmark halves throughput and, with OpenMP
    spin-waiting, can slow runs many-fold; this is how a reader tells a real regression from a busy box.
    """

    BUSY = 0.10  # above this the numbers are flagged as unreliable

    def __init__(self):
        self.share: float | None = None
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # all but idle and iowait
        # utime + stime of this process and of its finished children (benchmarks that train in subprocesses)
        return time.monotonic(), busy, sum(int(x) for x in me[11:15])

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall, busy, mine = (e - s for e, s in zip(end, self._start))
        self.share = max(0.0, (busy - mine) / hz / (wall * (os.cpu_count() or 1)))
        return self.share

    def note(self) -> str:
        if self.share is None:
            return "other load: unknown"
        flag = " — machine was busy, numbers are unreliable; rerun on an idle machine" if self.share > self.BUSY else ""
        return f"other processes used {100 * self.share:.0f}% of the CPUs during the run{flag}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds one call takes, and what it returned."""
    t0 = now()
    out = fn()
    return now() - t0, out


def interleave(runs: dict[str, Callable[[], dict]], reps: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Warm every run up, then alternate A, B, A, B … so drift (thermal, caches, neighbours) hits all equally."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            results[name].append(fn())
    return results


def make_token_clock():
    """A transformers streamer that timestamps every generated token (its first `put` is the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:  # generate() first hands over the prompt ids (empty for inputs_embeds)
                self._prompt_seen = True
                return
            self.times.append(now())

        def end(self):
            pass

    return TokenClock()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned plain-text table for the terminal (first column left, the rest right)."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in cells[1:]])


def write_results_section(name: str, body: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the `<!-- name:start -->…<!-- name:end -->` section of RESULTS.md with `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else RESULTS_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def result_line(name: str, value: str, target: str, passed: bool) -> str:
    """The last line every benchmark prints; CI and humans grep for it."""
    return f"RESULT {name} {value} target {target} {'PASS' if passed else 'MISS'}"
