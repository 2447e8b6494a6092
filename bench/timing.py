"""The timed part every benchmark case shares: pick a round count from one
untimed call, then let pytest-benchmark time ``fn``."""
from __future__ import annotations

import time


def run_timed(benchmark, fn, *, group: str, target_s: float, min_rounds: int,
              max_rounds: int) -> None:
    """Time ``fn`` (already warmed up and checked) for about ``target_s``."""
    t = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t, 1e-7)
    rounds = int(min(max_rounds, max(min_rounds, target_s / est)))
    benchmark.group = group
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
