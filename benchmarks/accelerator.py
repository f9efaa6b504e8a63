"""The accelerator benchmark: on whatever JAX backend is present (``jax.devices()[0]``), one Markdown table.

    python benchmarks/accelerator.py [--out table.md]          # full shapes (GPU / TPU)
    python benchmarks/accelerator.py --small                   # tiny shapes, about half a minute on a CPU

Every row names the device. Measured in one run:

1. Limits: the matmul rate (a jitted square matmul in the models' dtype, 2 n^3 FLOPs) and the memory bandwidth:
   a copy kernel (jitted ``x * 2`` over a large array: bytes read + written) and, beside it, a mat-vec streaming
   a matrix of the same size (bytes read; XLA:CPU runs the elementwise copy on one thread, its dot on all). Each
   is the best of several calls; the matmul rate and the larger bandwidth are the "% of limit" denominators.
2. LLaVA-1.5 prefill and decode, on a 7B-shaped model (``LlavaConfig.llava_1_5_7b``) and a mid-sized one (decoder
   8 x 1024, vocab 32064, CLIP 4 x 512) in bf16 (``--dtype auto``: fp32 on a CPU), random weights made on the
   device (each parameter of ``nnx.eval_shape``'s shapes by a jitted counter-hash initialiser, ``device_random``:
   nothing is built on the host and copied). Prompt: 576 visual +
   64 text tokens (bucket 640), batch 1. Prefill: time, XLA's ``cost_analysis()`` FLOPs of the compiled prefill
   program (vision tower, projector, decoder, LM head) and their rate as a % of the matmul rate. Decode: ms per
   token (median over single jitted, cache-donating steps) and the bytes a step must read - the decoder's
   weights and LM head (the embedding table is read one row at a time and not counted) plus the whole KV cache
   as allocated (prompt + 64 slots) - as a rate and % of the measured bandwidth.
3. Pruned / unpruned prefill per method (fastv, pdrop, sparsevlm, himap, tokencarve, visionzip) at budgets
   64/128/192 with the released debiasing (``Debias(curve="released", pad_tau="released")``), timed round-robin
   with the unpruned prefill in one run (``_timing.interleaved_times``), beside the XLA-counted FLOP ratio of the
   two compiled programs. A decoder shallower than a method's released stage layers (PyramidDrop 2/10/20,
   SparseVLM 2/6/15, HiMAP 2/8) runs the released 32-layer schedule with every stage layer scaled by depth / 32
   (the setting column lists the layers); where even that does not fit, a row says so.
4. TriangleMix on one Llama-3.1-8B-shaped decoder layer (hidden 4096, MLP 14336, 32 heads, 8 kv heads, head dim
   128, llama3 RoPE) at 8k / 32k / 128k tokens: the layer with the model's dense attention (XLA), with cuDNN's
   causal flash attention (GPU only, the fair dense reference at long context), and with TriangleMix's
   "split" path (GPU, CPU) or "splash" kernel (TPU), timed round-robin. FLOPs are XLA-counted; the split path's
   band loop (``lax.map``) is counted once by XLA, so the other blocks are added from a one-block compile.
   Custom calls are not counted by XLA: the cuDNN and splash rows show "-", and TokenCarve's eigh is missing
   from its count.

What does not fit the device's free memory (checked from the compiled program's ``memory_analysis()`` before
it runs, or caught as an out-of-memory error) gets a row that says so. ``--small`` runs the same code on tiny
shapes (LLaVA with a 2 x 64 decoder, a 2-layer CLIP at 336 px -> 576 visual tokens; a tiny layer at 512 / 1024
tokens with a scaled TriangleMix; budget 64; 1 round) so that the test keeps it from rotting. Only the table
goes to stdout; progress goes to stderr.

Each prefill variant is its own compile (the 7B one unrolls 24 CLIP + 32 decoder layers): on a GPU host the
compiles dominate the run. ``--compile-workers N`` compiles the variants on N threads, ``--cache-dir DIR`` keeps
them for a rerun, and ``--models`` / ``--methods`` / ``--budgets`` / ``--tokens`` / ``--no-prune`` /
``--no-triangle`` split the table over several runs (each run times its own unpruned reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models import llava
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.interventions import TriangleAttention, TriangleMix, attend_split
from jaxdebias.models.layers import ShapeRngs, default_positions
from jaxdebias.models.llama import DecoderLayer, LlamaConfig, rope_inv_freq
from jaxdebias.models.rows import slot_mask
from _timing import call_times, interleaved_times

COLUMNS = ("device", "model", "measurement", "setting", "ms", "work", "achieved", "% of limit", "time ratio",
           "FLOP ratio", "note")
METHODS = ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve", "visionzip")
N_VISUAL, TEXT, EXTRA = 576, 64, 64  # visual tokens, text tokens, cache slots for new tokens
_T0 = time.perf_counter()


def log(msg: str):
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- the table

class Table:
    def __init__(self, device: str):
        self.device, self.rows = device, []

    def add(self, model, measurement, setting, ms=None, work="-", achieved="-", limit=None, time_ratio=None,
            flop_ratio=None, note=""):
        num = lambda x, f: "-" if x is None else format(x, f)
        self.rows.append((self.device, model, measurement, setting, num(ms, ".3f"), work, achieved, num(limit, ".1f"),
                          num(time_ratio, ".3f"), num(flop_ratio, ".3f"), note))

    def skip(self, model, measurement, setting, why):
        self.add(model, measurement, setting, note=f"skipped: {why}")

    def markdown(self) -> str:
        clean = lambda c: str(c).replace("|", "/").replace("\n", " ")
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def gflop(f):
    return "-" if f is None else f"{f / 1e9:.2f} GFLOP"


def rate(f, t):
    return "-" if f is None else f"{f / t / 1e9:.1f} GFLOP/s"


def device_name(dev) -> str:
    if dev.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return f"{dev.platform} {dev.device_kind}"


# ------------------------------------------------------------------------------------- memory, compiles, FLOPs

def free_bytes(dev) -> int:
    """Free memory of the device (its allocator's limit minus what is in use) or, on the CPU, the host's
    available memory."""
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n) -> str:
    return f"{n / 2**30:.1f} GiB"


def fits(compiled, dev, margin=0.9):
    """(True, None) or (False, why) for a compiled program whose arguments are already on the device: its
    temporaries and outputs against the device's free memory."""
    try:
        ma = compiled.memory_analysis()
        need = ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    except Exception:  # noqa: BLE001 - no memory analysis on this backend: let it run (OOM is caught)
        return True, None
    free = free_bytes(dev)
    if need > margin * free:
        return False, f"does not fit: needs {gib(need)} beyond its inputs, {gib(free)} free"
    return True, None


def flops(compiled):
    """XLA's FLOP count of a compiled program (None where the backend gives none)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    f = (ca or {}).get("flops")
    return float(f) if f and f > 0 else None


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    return ("does not fit: " if oom else f"{type(e).__name__}: ") + msg[:160]


def compile_all(jobs: dict, workers: int) -> dict:
    """name -> (compiled or None, error or None), compiling ``jobs`` (name -> thunk returning a Compiled) on
    ``workers`` threads (XLA compiles outside the GIL)."""
    def one(item):
        name, thunk = item
        t = time.perf_counter()
        try:
            out = thunk(), None
        except Exception as e:  # noqa: BLE001 - reported as a row
            out = None, short_error(e)
        log(f"compiled {name} in {time.perf_counter() - t:.1f}s" + (f" ({out[1]})" if out[1] else ""))
        return name, out

    if workers <= 1:
        return dict(one(item) for item in jobs.items())
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, jobs.items()))


# --------------------------------------------------------------------------------- weights made on the device

def _fill(name: str, ndim: int) -> str:
    if ndim == 1 and name in ("weight", "scale"):  # RMSNorm / LayerNorm gains
        return "ones"
    return "zeros" if name == "bias" else "random"


def _mix(x):
    """lowbias32: a bijective avalanche of uint32 values."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = (x ^ (x >> shift)) * jnp.uint32(mult)
    return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "fill"))
def device_random(salt, *, shape, dtype, fill="random"):
    """An array made on the device: ones, zeros, or pseudo-random with mean 0 and std 0.02 (uniform, a counter
    hash of the element index keyed by ``salt``, int32[]). One compile per (shape, dtype, fill); a threefry
    initialiser compiles ~10x slower, which would dominate a tiny model's run on a CPU."""
    if fill != "random":
        return (jnp.ones if fill == "ones" else jnp.zeros)(shape, dtype)
    key = _mix(salt.astype(jnp.uint32) * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F))
    x = _mix((jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ key)
    u = (x >> 8).astype(jnp.float32) * (1.0 / 2**24)  # [0, 1)
    return ((u - 0.5) * (0.02 * math.sqrt(12.0))).reshape(shape).astype(dtype)


def abstract(make):
    """(graphdef, state of ShapeDtypeStructs, parameter bytes) of the module ``make()`` builds; nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return graphdef, state, nbytes


def init_on_device(abstract_state, seed: int = 0):
    """Parameters of the shapes in ``abstract_state`` made on the default device by ``device_random`` (unit norm
    gains, zero biases, pseudo-random std-0.02 kernels and embeddings): the values never exist on the host."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    out = []
    for i, (path, x) in enumerate(leaves):
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        names = [n for n in names if isinstance(n, str) and n != "value"]
        out.append(device_random(jnp.int32(seed * 100003 + i), shape=tuple(x.shape), dtype=jnp.dtype(x.dtype),
                                 fill=_fill(names[-1] if names else "", len(x.shape))))
    return jax.tree_util.tree_unflatten(treedef, out)


def delete(tree):
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


# --------------------------------------------------------------------------------------------------- 1. limits

def best_time(fn, repeats: int) -> float:
    """Shortest wall time of ``fn()`` over ``repeats`` calls after a warm-up call: a limit is the best rate seen."""
    return min(call_times(fn, repeats))


def limits(table: Table, args, dtype):
    """The matmul rate (FLOP/s) and the memory bandwidth (bytes/s: the larger of a copy kernel's and a mat-vec's
    rate), each the best of several calls, measured on the device now."""
    name, size = jnp.dtype(dtype).name, jnp.dtype(dtype).itemsize
    n, reps = args.matmul_n, max(args.repeats, 5)
    make = lambda salt, shape: device_random(jnp.int32(salt), shape=shape, dtype=dtype)
    a, b = make(1, (n, n)), make(2, (n, n))
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = best_time(lambda: mm(a, b), reps)
    peak = 2 * n**3 / t_mm
    delete((a, b))
    table.add("limits", "matmul rate", f"{name} {n}x{n} @ {n}x{n}", t_mm * 1e3, gflop(2 * n**3), rate(2 * n**3, t_mm),
              note=f"best of {reps}; the FLOP/s limit of the % column (prefill rows)")
    x = make(3, (args.copy_mib * 2**20 // size,))
    cp = jax.jit(lambda x: x * 2)
    t_cp = best_time(lambda: cp(x), reps)
    moved = 2 * x.nbytes
    delete(x)
    m = math.isqrt(args.copy_mib * 2**20 // size)
    w, v = make(4, (m, m)), make(5, (m,))
    mv = jax.jit(lambda w, v: w @ v)
    t_mv = best_time(lambda: mv(w, v), reps)
    read = w.nbytes
    delete((w, v))
    bw = max(moved / t_cp, read / t_mv)
    which = "copy" if moved / t_cp >= read / t_mv else "mat-vec"
    table.add("limits", "copy bandwidth", f"x * 2 over {args.copy_mib} MiB {name}", t_cp * 1e3,
              f"{moved / 1e9:.3f} GB", f"{moved / t_cp / 1e9:.1f} GB/s",
              note=f"best of {reps}; bytes read + written" + ("; the bandwidth limit of the % column (decode rows)"
                                                             if which == "copy" else ""))
    table.add("limits", "mat-vec bandwidth", f"{m}x{m} @ {m} {name}", t_mv * 1e3, f"{read / 1e9:.3f} GB",
              f"{read / t_mv / 1e9:.1f} GB/s",
              note=f"best of {reps}; matrix bytes read" + ("; the bandwidth limit of the % column (decode rows), "
                                                          "faster than the copy here" if which == "mat-vec" else ""))
    log(f"limits: matmul {peak / 1e9:.1f} GFLOP/s, copy {moved / t_cp / 1e9:.1f} GB/s, "
        f"mat-vec {read / t_mv / 1e9:.1f} GB/s")
    return peak, bw


# ------------------------------------------------------------------------------------------ 2./3. LLaVA rows

def llava_configs(dtype, small: bool) -> dict:
    if small:
        return {"tiny llava (CLIP 2x32, decoder 2x64)": llava.LlavaConfig(
            ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, dtype=dtype,
                             param_dtype=dtype),
            LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                        num_kv_heads=4, dtype=dtype, param_dtype=dtype))}
    return {
        "llava-1.5-7b shape": llava.LlavaConfig.llava_1_5_7b(dtype=dtype),
        "mid llava (CLIP 4x512, decoder 8x1024)": llava.LlavaConfig(
            ClipVisionConfig(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, dtype=dtype,
                             param_dtype=dtype),
            LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=int(1024 * 2.6875), num_layers=8,
                        num_heads=16, num_kv_heads=16, dtype=dtype, param_dtype=dtype)),
    }


def prune_spec(method: str, keep: int, num_layers: int):
    """(spec, setting) for ``method`` at ``keep`` on a decoder of ``num_layers`` layers: the released schedule
    where it fits, else the released 32-layer schedule with its stage layers scaled by num_layers / 32. Raises
    ValueError where neither fits."""
    released = jd.canonical_method(method) in {*jd.RELEASED_EXP_B, *jd.RELEASED_POLY3_INVERSE}
    debias = jd.Debias(curve="released" if released else None, pad_tau="released")  # no released curve: padding
    spec = jd.PruneSpec(method, keep=keep, debias=debias if jd.methods.get(method).debias else jd.Debias())
    try:
        spec.plan(N_VISUAL, num_layers)
        return spec, f"{method} keep {keep}"
    except ValueError:
        pass
    scaled, boundary = [], 0
    for s in spec.schedule(N_VISUAL, 32):
        layer = max(boundary + 1, math.floor(s.layer * num_layers / 32 + 0.5))
        scaled.append(dataclasses.replace(s, layer=layer))
        boundary = scaled[-1].boundary
    spec = dataclasses.replace(spec, stages=tuple(scaled))
    spec.plan(N_VISUAL, num_layers)  # raises where the depth is too shallow even scaled
    released = "/".join(str(s.layer) for s in jd.PruneSpec(method, keep=keep).schedule(N_VISUAL, 32))
    return spec, (f"{method} keep {keep}, stage layers {'/'.join(str(s.layer) for s in scaled)} "
                  f"(released {released} scaled to {num_layers} layers)")


def prompt_batch(cfg):
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [cfg.image_token_id] * N_VISUAL,
                          rng.integers(3, 31000, TEXT - 6)])[None]
    px = rng.normal(size=(1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return gen.Batch(ids, px, np.ones_like(ids), image_sizes=np.array([[640, 480]]))


def decode_setting(cfg) -> str:
    return f"batch 1, cache {N_VISUAL + TEXT} + {EXTRA} slots, {jnp.dtype(cfg.text.dtype).name}"


def llava_rows(table: Table, name: str, cfg, args, dev, peak: float, bw: float):
    L = cfg.text.num_layers
    setting = f"unpruned, {N_VISUAL} visual + {TEXT} text tokens, batch 1, {jnp.dtype(cfg.text.dtype).name}"
    settings = {"prefill": setting, "decode": decode_setting(cfg)}
    graphdef, abs_state, nbytes = abstract(lambda: llava.Llava(cfg, rngs=ShapeRngs()))
    free = free_bytes(dev)
    if nbytes > 0.9 * free:
        why = f"does not fit: parameters need {gib(nbytes)}, {gib(free)} free"
        for m in ("prefill", "decode"):
            table.skip(name, m, settings[m], why)
        return
    log(f"{name}: initialising {nbytes / 2**30:.2f} GiB of parameters on the device")
    state = init_on_device(abs_state)
    model = nnx.merge(graphdef, state)
    batch = prompt_batch(cfg)
    key = jax.random.key(0)

    def job(spec):
        prep = gen.prepare(model, batch, spec)
        lower = lambda: gen.prefill_step.lower(graphdef, state, *prep.arrays, prep.limits, key,
                                               plan=prep.plan, extra=EXTRA, temperature=0.0).compile()
        return prep, lower

    variants, jobs, skipped = {"dense": (None, setting)}, {}, []
    if not args.no_prune:
        for method in args.methods:
            for keep in args.budgets:
                try:
                    variants[(method, keep)] = prune_spec(method, keep, L)
                except ValueError as e:
                    skipped.append((f"{method} keep {keep}",
                                    f"a {L}-layer decoder is too shallow for its stages ({str(e)[:120]})"))
    preps = {}
    for v, (spec, _) in variants.items():
        preps[v], jobs[v] = job(spec)
    compiled = compile_all(jobs, args.compile_workers)
    c_dense, err = compiled["dense"]
    if err is None:
        _, err = fits(c_dense, dev)
    if err:
        for m in ("prefill", "decode"):
            table.skip(name, m, settings[m], err)
        delete(state)
        return

    def runner(v):
        c, p = compiled[v][0], preps[v]
        return lambda: c(state, *p.arrays, p.limits, key)

    fns = {}
    for v in variants:
        c, err = compiled[v]
        if err is None:
            _, err = fits(c, dev)
        if err is None:
            fns[v] = runner(v)
        else:
            skipped.append((variants[v][1], err))
    log(f"{name}: timing {len(fns)} prefills round-robin, {args.repeats} rounds")
    try:
        times = interleaved_times(fns, args.repeats)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory while running
        for m in ("prefill", "decode"):
            table.skip(name, m, settings[m], short_error(e))
        delete(state)
        return
    t0, f0 = times["dense"], flops(c_dense)
    table.add(name, "prefill", setting, t0 * 1e3, gflop(f0), rate(f0, t0), None if f0 is None else 100 * f0 / t0 / peak,
              note="XLA-counted FLOPs of the whole prefill (vision tower, projector, decoder, LM head)")
    for v, t in times.items():
        if v == "dense":
            continue
        f = flops(compiled[v][0])
        table.add(name, "pruned prefill", variants[v][1], t * 1e3, gflop(f), rate(f, t),
                  None if f is None else 100 * f / t / peak, t / t0, None if f is None or f0 is None else f / f0,
                  note="ratios to the unpruned prefill of this run; debias: " +
                  ("released padding only (VisionZip has no released curve)" if v[0] == "visionzip" else
                   "released curve + released padding"))
    for what, why in skipped:
        table.skip(name, "pruned prefill", what, why)
    decode_row(table, name, cfg, graphdef, state, fns["dense"], args, bw)
    delete(state)


def decode_row(table, name, cfg, graphdef, state, prefill, args, bw):
    """ms per decode step after the unpruned prefill, and the bytes a step reads against the bandwidth."""
    setting = decode_setting(cfg)
    steps = min(args.decode_steps, EXTRA - 2)
    try:
        tok, out = prefill()
        cache = out.cache
        key = jax.random.key(0)
        kv = sum(x.nbytes for x in cache.k + cache.v)
        graphdef = gen.StaticDef(graphdef)  # hashed once, as decode_loop does (jit hashes static args per call)
        tok, cache = gen.decode_step(graphdef, state, tok, cache, key, None, temperature=0.0)  # compile, warm up
        jax.block_until_ready(tok)
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            tok, cache = gen.decode_step(graphdef, state, tok, cache, key, None, temperature=0.0)
            jax.block_until_ready((tok, cache))
            ts.append(time.perf_counter() - t)
        delete(cache)
    except Exception as e:  # noqa: BLE001
        table.skip(name, "decode", setting, short_error(e))
        return
    t = float(np.median(ts))
    lm = state["language_model"]
    weights = sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(lm)
                  if "embed_tokens" not in jax.tree_util.keystr(p))
    moved = weights + kv
    table.add(name, "decode", setting, t * 1e3, f"{moved / 1e9:.3f} GB/token", f"{moved / t / 1e9:.1f} GB/s",
              100 * moved / t / bw,
              note=f"ms per token, median of {steps} steps; reads decoder weights + LM head {weights / 1e9:.3f} GB "
                   f"and KV cache {kv / 1e9:.3f} GB" + ("; over 100%: the bandwidth kernels ran slower than this step "
                                                         "(a cache, or a busy host)" if moved / t > bw else ""))


# ------------------------------------------------------------------------------------------------ 4. TriangleMix

def triangle_config(dtype, small: bool):
    if small:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16, dtype=dtype, param_dtype=dtype)
        return "tiny layer (64 wide, 4 heads, 2 kv)", cfg, {"n_init": 8, "n_local": 128, "n_last": 32, "block": 64}
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=(("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                    ("original_max_position_embeddings", 8192.0)),
                      dtype=dtype, param_dtype=dtype)
    return "llama-3.1-8b layer", cfg, {}  # the published n_init 8, n_local 512, n_last 128, block 128


def layer_program(graphdef, cfg, kind: str, spec: TriangleMix | None):
    """jit(state, h [1, T, D], real bool[1, T]) -> the decoder layer's output, with attention: "dense" (the model's XLA path),
    "flash" (cuDNN causal) or "triangle" (``spec``)."""
    inv = rope_inv_freq(cfg)

    def flash(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def run(state, h, real):  # real: bool[B, T] an input, as in a prefill (a constant would be folded by XLA)
        layer = nnx.merge(graphdef, state)
        B, T, _ = h.shape
        pos = default_positions(real)
        mask = slot_mask(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), real)
        attend = None if kind == "dense" else flash if kind == "flash" else TriangleAttention.bind(spec, pos, real, T)
        return layer(h, pos, jnp.asarray(inv), mask, attend=attend)[0]

    return jax.jit(run)


def split_block_flops(cfg, spec: TriangleMix):
    """XLA's count of one band block of the split path (no sinks, no last rows), compiled on a one-block prompt:
    XLA counts the ``lax.map`` body once, the other blocks are added with this."""
    one = dataclasses.replace(spec, n_init=0, n_last=0)
    blk, dt = spec.block, cfg.dtype
    s = lambda h: jax.ShapeDtypeStruct((1, blk, h, cfg.hd), dt)
    p, r = jax.ShapeDtypeStruct((1, blk), jnp.int32), jax.ShapeDtypeStruct((1, blk), bool)
    fn = jax.jit(lambda q, k, v, p, r: attend_split(q, k, v, slot_mask(p, r), p, p, r, jnp.sum(r, 1), one))
    return flops(fn.lower(s(cfg.num_heads), s(cfg.num_kv_heads), s(cfg.num_kv_heads), p, r).compile())


def triangle_rows(table: Table, args, dev, peak: float, dtype):
    name, cfg, overrides = triangle_config(dtype, args.small)
    path = "splash" if dev.platform == "tpu" else "split"
    spec = TriangleMix(starting_layer=0, path=path, **overrides)
    pattern = f"n_init {spec.n_init}, n_local {spec.n_local}, n_last {spec.n_last}"
    graphdef, abs_state, _ = abstract(lambda: DecoderLayer(cfg, rngs=ShapeRngs()))
    state = init_on_device(abs_state)
    kinds = {"dense": "attention: dense (XLA, the model's path)"}
    if dev.platform == "gpu":
        kinds["flash"] = "attention: dense flash (cuDNN, causal)"
    kinds["triangle"] = f"attention: TriangleMix {path}"
    programs = {k: layer_program(graphdef, cfg, k, spec if k == "triangle" else None) for k in kinds}
    block = split_block_flops(cfg, spec) if path == "split" else None
    for T in args.tokens:
        setting = f"{T // 1024}k tokens" if T % 1024 == 0 and T >= 8192 else f"{T} tokens"
        free = free_bytes(dev)
        if 3 * T * cfg.hidden_size * jnp.dtype(dtype).itemsize > 0.9 * free:
            for label in kinds.values():
                table.skip(name, label, setting, f"does not fit: the layer's activations alone exceed {gib(free)}")
            continue
        h = device_random(jnp.int32(T), shape=(1, T, cfg.hidden_size), dtype=dtype) * jnp.asarray(50, dtype)
        real = jnp.ones((1, T), bool)
        compiled = compile_all({f"{k} {setting}": (lambda p=p, h=h, real=real: p.lower(state, h, real).compile())
                                for k, p in programs.items()}, args.compile_workers)
        fns, fl = {}, {}
        for k, label in kinds.items():
            c, err = compiled[f"{k} {setting}"]
            if c is not None:  # counted even where it does not fit: the FLOP ratio stays defined
                fl[k] = None if k == "flash" or (k == "triangle" and block is None) else flops(c)
                if k == "triangle" and fl[k] is not None:  # the band loop's other blocks
                    fl[k] += (-(-T // min(spec.block, T)) - 1) * block
                _, err = fits(c, dev)
            if err:
                table.skip(name, label, f"{setting}, {pattern}" if k == "triangle" else setting, err)
                continue
            fns[k] = lambda c=c, h=h, real=real: c(state, h, real)
        try:
            times = interleaved_times(fns, args.repeats) if fns else {}
        except Exception as e:  # noqa: BLE001
            for k in fns:
                table.skip(name, kinds[k], setting, short_error(e))
            times = {}
        ref = "dense" if "dense" in times else "flash" if "flash" in times else None
        for k, t in times.items():
            f = fl.get(k)
            notes = [f"one decoder layer, batch 1, {jnp.dtype(dtype).name}"]
            if ref is not None and k != ref:
                notes.append(f"time ratio to {kinds[ref].split(': ')[1]}")
            if fl.get("dense") is not None and f is not None and k != "dense":
                notes.append("FLOP ratio to the dense layer's XLA count")
            if k == "triangle" and ref == "dense" and "flash" in times:
                notes.append(f"time ratio to cuDNN flash {t / times['flash']:.3f}")
            notes.append("custom call: FLOPs not counted by XLA" if f is None else
                         "XLA-counted (dense: the full T x T square)" if k == "dense" else
                         "XLA-counted + the band loop's other blocks")
            table.add(name, kinds[k], f"{setting}, {pattern}" if k == "triangle" else setting, t * 1e3, gflop(f),
                      rate(f, t), None if f is None else 100 * f / t / peak,
                      None if ref is None or k == ref else t / times[ref],
                      None if k == "dense" or f is None or fl.get("dense") is None else f / fl["dense"],
                      note="; ".join(notes))
        delete((h, real))
        log(f"TriangleMix {setting}: " + ", ".join(f"{k} {t * 1e3:.1f} ms" for k, t in times.items()))
    delete(state)


# ---------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (the test; about half a minute on a CPU)")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    ap.add_argument("--repeats", type=int, help="round-robin rounds (default 5, --small 1)")
    ap.add_argument("--models", help="comma-separated subset of 7b, mid, or none (default both; --small: the tiny one)")
    ap.add_argument("--methods", default=",".join(METHODS), help="pruning methods (default all six)")
    ap.add_argument("--budgets", help="visual-token budgets (default 64,128,192; --small 64)")
    ap.add_argument("--tokens", help="TriangleMix prompt lengths (default 8192,32768,131072; --small 512,1024)")
    ap.add_argument("--no-prune", action="store_true", help="skip the pruned prefills")
    ap.add_argument("--no-triangle", action="store_true", help="skip the TriangleMix rows")
    ap.add_argument("--decode-steps", type=int, help="timed decode steps (default 32, --small 4; at most 62)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="auto: bfloat16 on GPU / TPU, float32 on the CPU (XLA:CPU emulates bf16 matmuls)")
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="threads compiling the prefill variants at once (XLA compiles outside the GIL)")
    ap.add_argument("--cache-dir", help="persistent compilation cache (a rerun skips the compiles)")
    args = ap.parse_args(argv)
    small = args.small
    args.repeats = args.repeats or (1 if small else 5)
    args.methods = [jd.PruneSpec(m).method for m in args.methods.split(",") if m]
    args.budgets = [int(b) for b in (args.budgets or ("64" if small else "64,128,192")).split(",")]
    args.tokens = [int(t) for t in (args.tokens or ("512,1024" if small else "8192,32768,131072")).split(",")]
    args.decode_steps = args.decode_steps or (4 if small else 32)
    if args.models is not None:
        args.models = [m.strip() for m in args.models.split(",") if m.strip() not in ("", "none")]
        if set(args.models) - {"7b", "mid"}:
            ap.error(f"--models takes 7b, mid or none, got {args.models}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    dev = jax.devices()[0]
    accel = dev.platform != "cpu"
    dtype = jnp.dtype(("bfloat16" if accel else "float32") if args.dtype == "auto" else args.dtype)
    args.matmul_n = 1024 if args.small else (16384 if accel else 2048)
    args.copy_mib = 64 if args.small else (2048 if accel else 256)
    table = Table(device_name(dev))
    log(f"device {table.device}; dtype {dtype.name}")
    peak, bw = limits(table, args, dtype)
    configs = llava_configs(dtype, args.small)
    if args.models is not None:
        names = list(configs)  # the 7B-shaped and the mid-sized one (--small: the tiny one stands for both)
        keep = [names[0]] if args.small and args.models else [names[("7b", "mid").index(m)] for m in args.models]
        configs = {k: configs[k] for k in keep}
    for name, cfg in configs.items():
        llava_rows(table, name, cfg, args, dev, peak, bw)
    if not args.no_triangle:
        triangle_rows(table, args, dev, peak, dtype)
    md = table.markdown()
    print(md, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    log("done")
    return md


if __name__ == "__main__":
    main()
