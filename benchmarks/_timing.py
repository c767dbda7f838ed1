"""Timing helper shared by the benchmarks (side-by-side comparisons in one run)."""

from __future__ import annotations

import time
from typing import Any, Callable, Tuple


def best_of_alternating(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> Tuple[float, float, Any, Any]:
    """Best time of ``reps`` runs of each of ``a`` and ``b``, the two alternating so that machine
    drift hits both; and the last result of each."""
    times: Tuple[list, list] = ([], [])
    out = [None, None]
    for _ in range(reps):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            out[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return min(times[0]), min(times[1]), out[0], out[1]
