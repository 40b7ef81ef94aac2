"""Shared timing helper: interleaved rounds, so machine noise hits every contender alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def interleaved_rates(runners: dict[str, Callable[[], int]], rounds: int) -> dict[str, list[float]]:
    """Warm every runner up once, then time ``rounds`` interleaved rounds of each.

    A runner returns how many images it processed; the result is images/s per round.
    """
    for run in runners.values():  # warm-up: traces, first imports, page cache
        run()
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            count = run()
            rates[name].append(count / (time.perf_counter() - start))
    return rates
