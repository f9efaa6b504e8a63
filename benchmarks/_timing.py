"""The one timer the benchmarks share."""

import time

import jax
import numpy as np


def call_times(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` after one warm-up (compile) call; JAX results are waited for
    (other results pass through ``block_until_ready`` untouched)."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return ts


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after a warm-up call."""
    return float(np.median(call_times(fn, repeats)))


def round_times(fns: dict, repeats: int) -> dict:
    """name -> the wall times (s) of ``fns[name]()``, one per round, measured round-robin: every round runs each fn
    once, so a slow stretch of a shared machine lands on all of them alike and their ratios stay fair. Each fn is
    called once first (compile, warm-up)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts[name].append(time.perf_counter() - t)
    return ts


def interleaved_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each ``fn`` in ``fns`` (name -> fn) over ``round_times``'s rounds."""
    return {name: float(np.median(v)) for name, v in round_times(fns, repeats).items()}
