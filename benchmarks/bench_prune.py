"""Pruned prefill against unpruned, side by side in one run, next to the whole-model and decoder FLOP ratios.

    python benchmarks/bench_prune.py [--layers 8] [--hidden 1024] [--text 64] [--repeats 5] [--method fastv[,pdrop..]]

A random mid-sized LLaVA (CLIP-style 336/14 tower -> 576 visual tokens, Llama decoder ``--layers`` x
``--hidden``) runs the same prompt (576 visual + ``--text`` text tokens, batch 1) unpruned and pruned to
64/128/192 visual tokens with padding + released-curve debiasing, one method after another (each timed
round-robin with its own unpruned runs). A decoder shallower than a method's released stage layers runs them
scaled by depth / 32 (``accelerator.prune_spec``). Reported per budget: median prefill time, its ratio to
unpruned, the whole-model FLOP ratio (XLA's ``cost_analysis`` of the two compiled prefill programs: vision tower,
projector, probes, raters, merges, decoder and LM head), the decoder's analytic FLOP ratio, the time ratio over
the whole-model FLOP ratio (1.00 = the time falls exactly with the work), and the cost of the debias + select step
alone as a share of the pruned prefill (for TokenCarve also its SVD information scores and merge, which are inside
the pruned prefill's time).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.methods import tokencarve
from jaxdebias.models import generate as gen
from jaxdebias.models import llava, sequence
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.llama import LlamaConfig
from _timing import compiled_prefill, interleaved_times, median_time
from _timing import decoder_flops as analytic_flops
from accelerator import prune_spec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--method", default="fastv", help="one method or a comma-separated list")
    args = ap.parse_args()
    D, L = args.hidden, args.layers
    F = int(D * 2.6875)
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    cfg = llava.LlavaConfig(
        ClipVisionConfig(hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8, dtype=dtype,
                         param_dtype=dtype),
        LlamaConfig(vocab_size=32064, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=D // 64,
                    num_kv_heads=D // 64, dtype=dtype, param_dtype=dtype))
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    T = 576 + args.text
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [32000] * 576, rng.integers(3, 31000, args.text - 6)])[None]
    batch = gen.Batch(ids, rng.normal(size=(1, 3, 336, 336)).astype(np.float32), np.ones_like(ids),
                          image_sizes=np.array([[640, 480]]))
    runner = lambda spec: compiled_prefill(model, batch, spec)  # noqa: E731
    decoder_flops = lambda segs: analytic_flops(segs, D, F)  # noqa: E731

    dense_fn, dense_shape, x_dense = runner(None)
    Tb = jd.bucket(T, gen.PROMPT_BUCKETS)
    f_dense = decoder_flops(sequence.segments(Tb, dense_shape, 576, L))
    scores = jnp.asarray(rng.random((1, 576)), jnp.float32)
    pad = jd.pad_mask_expand2square(640, 480)[None]
    print(f"device: {jax.devices()[0].platform}; decoder {L} x {D}, prompt {T} tokens (bucket {Tb}), "
          f"{jnp.dtype(dtype).name}; debias: released padding + the released curve where the method has one; "
          f"{args.repeats} interleaved rounds per method; unpruned prefill {x_dense / 1e9:.1f} GFLOP (XLA)")
    for method in args.method.split(","):
        released = jd.canonical_method(method) in {*jd.RELEASED_EXP_B, *jd.RELEASED_POLY3_INVERSE}
        debias = jd.Debias(curve="released" if released else None, pad_tau="released", task="gqa")
        specs, settings = {}, {}
        for keep in (64, 128, 192):
            spec, settings[keep] = prune_spec(method, keep, L)
            if jd.canonical_method(method) == "illava":  # its encoder layers 5-8 (of 23) on this shallower tower:
                run = model.cfg.vision.layers_run  # the last min(4, run) layers, merging 288 tokens in all
                k = min(4, run)
                spec = dataclasses.replace(spec, options={"vit_layers": tuple(range(run - k, run)), "vit_r": 288 // k})
                settings[keep] += f", encoder merges in CLIP layers {run - k}..{run - 1} (r = {288 // k})"
            specs[keep] = dataclasses.replace(spec, debias=debias) if jd.methods.get(method).debias else spec
        runs = {keep: runner(spec) for keep, spec in specs.items()}
        times = interleaved_times({"dense": dense_fn, **{keep: fn for keep, (fn, _, _) in runs.items()}},
                                  args.repeats)
        t_dense = times["dense"]
        print(f"\n{method} ({settings[64].split(', ', 1)[1] if ', ' in settings[64] else 'released layers'}; "
              f"{'released curve' if released else 'no released curve'}); unpruned prefill {t_dense * 1e3:.1f} ms")
        print("| keep | prefill ms | time ratio | FLOP ratio (XLA, whole model) | FLOP ratio (decoder) "
              "| time / whole FLOP ratio | debias+select share |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for keep, spec in specs.items():
            shape, t, x = runs[keep][1], times[keep], runs[keep][2]
            f = decoder_flops(sequence.segments(Tb, shape, 576, L))
            curve = spec.debias.curve_for(spec.method)
            k = shape.stages[0].slots if shape.stages else shape.encoder.size
            sel = median_time(lambda: jd.debias_and_select(scores, k, curve=curve, content=pad), args.repeats * 10)
            xr = x / x_dense if x and x_dense else float("nan")
            print(f"| {keep} | {t * 1e3:.1f} | {t / t_dense:.3f} | {xr:.3f} | {f / f_dense:.3f} | "
                  f"{t / t_dense / xr:.2f} | {100 * sel / t:.3f}% |")
            if method == "tokencarve":  # its own selection work: the SVD, the rank fusion, the A/B merge
                h = jnp.asarray(rng.normal(size=(1, 576, D)), dtype)
                ok = jnp.ones((1, 576), bool)
                carve = jax.jit(lambda h, s: tokencarve.tokencarve_select(
                    tokencarve.rank_fusion(s, tokencarve.sv_scores(h, ok), ok), h, ok, k)[2].sum())
                c = median_time(lambda: carve(h, scores), args.repeats)
                print(f"      SV scores (SVD of 576 x {D}) + rank fusion + A/B merge: {c * 1e3:.1f} ms = "
                      f"{100 * c / t:.1f}% of this prefill")


if __name__ == "__main__":
    main()
