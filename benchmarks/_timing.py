"""What the benchmarks share: the timers, the compiled prefill with its FLOP count, the analytic decoder FLOPs."""

import time

import jax
import numpy as np
from flax import nnx

from jaxdebias.models import generate as gen


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


def decoder_flops(segments, D: int, F: int, Dkv: int | None = None, extra: int = 64) -> int:
    """The analytic FLOPs of a decoder prefill, per ``sequence.segments`` ((start, stop, S): layers start..stop
    run on S tokens): q/o projections 2 D^2, k/v 2 D Dkv (Dkv = D without grouped KV heads), the MLP 3 D F, each
    times 2 S; attention 4 S (S + extra) D over the cache (``extra`` decode slots)."""
    Dkv = D if Dkv is None else Dkv
    return sum((stop - start) * (2 * S * (2 * D * D + 2 * D * Dkv + 3 * D * F) + 4 * S * (S + extra) * D)
               for start, stop, S in segments)


def compiled_prefill(model, batch, spec, buckets=None, extra: int = 64):
    """(call, plan, XLA's FLOP count or None): the prefill of ``batch`` pruned by ``spec`` (None: unpruned),
    compiled for the prompt ``buckets`` (None: generate's) with ``extra`` decode slots; ``call()`` runs it and
    returns its first output."""
    graphdef, state = nnx.split(model)
    prep = gen.prepare(model, batch, spec, **({} if buckets is None else {"prompt_buckets": buckets}))
    kw = dict(plan=prep.plan, extra=extra, temperature=0.0)
    args = (graphdef, state, *prep.arrays, prep.limits, jax.random.key(0))
    compiled = gen.prefill_step.lower(*args, **kw).compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float((cost or {}).get("flops") or 0) or None
    except Exception:  # noqa: BLE001 - a backend without a cost analysis: the FLOP ratio is not reported
        flops = None
    return (lambda: compiled(*args[1:])[0]), prep.plan, flops
