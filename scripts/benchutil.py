"""Timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import os
import time


def best_of(fn, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_note() -> str:
    """The 1-minute load average, flagged when something else seems to be using the (2) cores."""
    load = os.getloadavg()[0]
    return f"load average {load:.2f}" + ("  (foreign load: figures are low)" if load > 0.5 else "")
