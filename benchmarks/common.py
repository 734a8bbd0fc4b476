"""Shared helpers for benchmarks: interleaved timing and markdown tables."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def interleaved(fns: dict[str, Callable[[], object]], *, repeat: int = 30, warmup: int = 3,
                inner: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so that
    machine noise hits all of them alike. ``clock=time.thread_time`` counts only the
    calling thread's CPU time (with one intra-op thread, all of torch's CPU work): time
    the thread spends preempted by other processes on a shared machine is left out."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = clock()
            for _ in range(inner):
                f()
            samples[k].append((clock() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write(text)
    return path
