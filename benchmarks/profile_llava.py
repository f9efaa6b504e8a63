"""Where the time goes: XLA's per-op times (``jax.profiler`` trace) of the decode step, the prefill and a pruned
prefill of a mid-sized random LLaVA, grouped, with the biggest ops listed.

    python benchmarks/profile_llava.py [--layers 8] [--hidden 1024] [--method fastv] [--keep 64] [--top 12]

Each program is compiled, run once, then traced for ``--runs`` calls (``create_perfetto_trace``); every traced
op is matched to the compiled HLO by name (its output shape, opcode and the JAX op it came from). Groups:
vision tower (ops on the 577 CLIP tokens or the 588-wide patches), weight matmuls (the decoder's projections and
LM head), attention (the score and value einsums, masks, softmax), KV-cache writes (dynamic-update-slice),
copies/transposes, and other ops. Times are per call; "the rest" is the untraced median wall time per call minus
the traced op time (host: dispatch, argument flattening, waiting). Shares are what counts on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models import llava
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.llama import LlamaConfig

GROUPS = ("vision tower", "weight matmuls", "attention", "KV-cache writes", "copies/transposes", "other")


def hlo_ops(text: str) -> dict:
    """op name -> (output shape, opcode, JAX op name) for every instruction of a compiled module's text."""
    ops = {}
    for m in re.finditer(r"%(\S+) = (\S+) ([\w-]+)\((.*)", text):
        meta = re.search(r'op_name="([^"]*)"', m.group(4))
        ops[m.group(1)] = (m.group(2), m.group(3), meta.group(1) if meta else "")
    return ops


def group(shape: str, opcode: str, meta: str, vis: tuple) -> str:
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0].partition("[")[2])]
    if any(d in vis for d in dims):
        return "vision tower"
    batched_dot = opcode == "dot" and len(dims) >= 3 or "dot_general" in meta and len(dims) >= 3
    if batched_dot or "->" in meta or any(w in meta for w in ("reduce_max", "select_n", "exp", "div")):
        return "attention"
    if "dot_general" in meta or opcode == "dot":
        return "weight matmuls"
    if "dynamic_update_slice" in meta:
        return "KV-cache writes"
    if opcode in ("copy", "transpose") or "transpose" in meta:
        return "copies/transposes"
    return "other"


def profile(name: str, fn, compiled_text: str, runs: int, vis: tuple, top: int):
    """Traces ``runs`` calls of ``fn`` (already warm) and prints the groups and the top ops per call."""
    ops = hlo_ops(compiled_text)
    walls = []
    for _ in range(runs):  # untraced wall time per call
        t = time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t)
    wall = float(np.median(walls))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's ops only: the Python tracer would inflate the host side
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=options):
            for _ in range(runs):
                jax.block_until_ready(fn())
        events = json.load(gzip.open(glob.glob(f"{d}/plugins/profile/*/perfetto_trace.json.gz")[0]))["traceEvents"]
    by_group, by_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            shape, opcode, meta = ops[e["name"]]
            by_group[group(shape, opcode, meta, vis)] += e["dur"] / 1e3 / runs
            by_op[(opcode, shape.split("{")[0], meta.rsplit("/", 1)[-1][:40])] += e["dur"] / 1e3 / runs
    total = sum(by_group.values())
    print(f"\n## {name}: {wall * 1e3:.1f} ms per call (median, untraced), XLA ops {total:.1f} ms (traced), "
          f"the rest {wall * 1e3 - total:.1f} ms (host: dispatch, arguments, waits)")
    print("| group | ms | share of op time |\n|---|---:|---:|")
    for g in GROUPS:
        print(f"| {g} | {by_group[g]:.2f} | {100 * by_group[g] / total:.1f}% |")
    print(f"\ntop {top} ops:\n| ms | opcode | shape | from |\n|---:|---|---|---|")
    for (opcode, shape, meta), ms in by_op.most_common(top):
        print(f"| {ms:.2f} | {opcode} | {shape} | {meta} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--method", default="fastv")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    D, L = args.hidden, args.layers
    cfg = llava.LlavaConfig(ClipVisionConfig(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8),
                            LlamaConfig(vocab_size=32064, hidden_size=D, intermediate_size=int(D * 2.6875),
                                        num_layers=L, num_heads=D // 64, num_kv_heads=D // 64))
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    vis = (cfg.vision.num_features + 1, 3 * cfg.vision.patch_size ** 2)  # CLIP tokens with CLS, patch width
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [32000] * 576, rng.integers(3, 31000, 58)])[None]
    batch = gen.Batch(ids, rng.normal(size=(1, 3, 336, 336)).astype(np.float32), np.ones_like(ids),
                      image_sizes=np.array([[640, 480]]))
    graphdef, state = nnx.split(model)
    print(f"device: {jax.devices()[0].platform}; decoder {L} x {D}, vocab 32064, prompt 640 tokens (576 visual), "
          f"fp32, batch 1; {args.runs} traced calls each")
    released = jd.canonical_method(args.method) in {*jd.RELEASED_EXP_B, *jd.RELEASED_POLY3_INVERSE}
    pruned = jd.PruneSpec(args.method, keep=args.keep,
                          debias=jd.Debias(curve="released" if released else None, pad_tau="released", task="gqa"))
    for name, spec in (("prefill", None), (f"pruned prefill ({args.method}, keep {args.keep})", pruned)):
        prep = gen.prepare(model, batch, spec)
        call = (graphdef, state, *prep.arrays, prep.limits, jax.random.key(0))
        kw = dict(plan=prep.plan, extra=64, temperature=0.0)
        text = gen.prefill_step.lower(*call, **kw).compile().as_text()
        fn = lambda: gen.prefill_step(*call, **kw)  # noqa: E731
        first, out = jax.block_until_ready(fn())
        cache = out.cache
        profile(name, lambda: fn()[0], text, args.runs, vis, args.top)
        if spec is None:
            dense = first, cache
    tok, cache = dense
    static = getattr(gen, "StaticDef", lambda g: g)(graphdef)  # as decode_loop passes it (a plain one before)
    key = jax.random.key(0)
    text = gen.decode_step.lower(static, state, tok, cache, key, None, temperature=0.0).compile().as_text()
    carry = [tok, cache]

    def step():
        carry[0], carry[1] = gen.decode_step(static, state, carry[0], carry[1], key, None, temperature=0.0)
        return carry[0]

    jax.block_until_ready(step())
    profile("decode step (cache 640 + 64 slots)", step, text, max(args.runs, 5), vis, args.top)


if __name__ == "__main__":
    main()
