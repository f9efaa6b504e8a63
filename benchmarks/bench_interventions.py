"""VAR overhead and TriangleMix savings, each measured side by side in one run.

    python benchmarks/bench_interventions.py [--var-layers 4] [--tokens 8192] [--repeats 3]

1. VAR: prefill of a LLaVA with 7B-shaped decoder layers (4096 wide, 32 heads; ``--var-layers`` of them, VAR on
   layers 2..), 576 image + 64 text tokens, with and without VAR: the ratio is VAR's overhead.
2. TriangleMix attention FLOPs of a Llama-3.1-8B-shaped layer (32 heads, 8 kv heads, head dim 128) at 32k and
   128k tokens: analytic (causal dense vs the pattern's allowed pairs) and counted by XLA's cost analysis of the
   compiled dense and split attention (compile only, nothing runs).
3. Prefill time of a small Llama (``--tokens`` long prompt) with dense attention, TriangleMix "masked" and
   "split" from layer 1 on.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdebias.models import interventions
from jaxdebias.models import llava
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.llama import LlamaConfig, LlamaForCausalLM
from jaxdebias.models.rows import slot_mask
from _timing import median_time




def var_overhead(layers, repeats):
    cfg = llava.LlavaConfig(ClipVisionConfig(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4),
                            LlamaConfig(vocab_size=32064, num_layers=layers))
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [32000] * 576, rng.integers(3, 31000, 58)])[None]
    px = jnp.asarray(rng.normal(size=(1, 3, 336, 336)), jnp.float32)
    am = jnp.ones(ids.shape, bool)
    spec = interventions.VarSpec(sink_dims=(1415, 2533), tau=20.0)
    g, st = nnx.split(model)

    @jax.jit
    def plain(st):
        return nnx.merge(g, st)(ids, px, am).logits[:, -1]

    @jax.jit
    def with_var(st):
        return nnx.merge(g, st)(ids, px, am, var=spec).logits[:, -1]

    t0, t1 = median_time(lambda: plain(st), repeats), median_time(lambda: with_var(st), repeats)
    print(f"VAR: {layers} layers 4096 x 32 heads, 640 tokens: plain {t0 * 1e3:.0f} ms, VAR {t1 * 1e3:.0f} ms, "
          f"overhead {100 * (t1 / t0 - 1):.1f}% of prefill (VAR on layers {spec.layer_set(layers)})")


def triangle_flops():
    H, K, Hd = 32, 8, 128
    spec = interventions.TriangleMix()  # published: n_init 8, n_local 512, n_last 128
    for n in (32768, 131072):
        dense_pairs = n * (n + 1) // 2
        i = np.arange(n)
        last = min(spec.n_last, n - 1)
        band = np.minimum(i + 1, spec.n_local)
        sinks = np.clip(np.minimum(i + 1, spec.n_init) - np.maximum(0, np.minimum(i + 1, spec.n_init) -
                                                                    np.maximum(i - spec.n_local + 1, 0)), 0, None)
        pairs = np.where(i >= n - last, i + 1, band + sinks).sum()
        analytic = lambda p: 4 * p * H * Hd  # noqa: E731  (QK^T and PV, 2 FLOPs per multiply-add)
        sds = lambda h: jax.ShapeDtypeStruct((1, n, h, Hd), jnp.bfloat16)  # noqa: E731
        pos = jax.ShapeDtypeStruct((1, n), jnp.int32)
        real = jax.ShapeDtypeStruct((1, n), bool)

        def dense(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)

        def split(q, k, v, pos, real):
            m = slot_mask(pos, real)
            return interventions.attend_split(q, k, v, m, pos, pos, real, jnp.sum(real, 1), spec)

        c_dense = jax.jit(dense).lower(sds(H), sds(K), sds(K)).compile().cost_analysis()["flops"]
        c_split = jax.jit(split).lower(sds(H), sds(K), sds(K), pos, real).compile().cost_analysis()["flops"]
        # XLA's cost analysis counts a while-loop body once: add the other (blocks - 1) band blocks, each measured
        # as the whole split path on a one-block prompt without sinks or last rows.
        blk = spec.block
        one = interventions.TriangleMix(n_init=0, n_local=spec.n_local, n_last=0, block=blk)
        sb = lambda h: jax.ShapeDtypeStruct((1, blk, h, Hd), jnp.bfloat16)  # noqa: E731
        pb, rb = jax.ShapeDtypeStruct((1, blk), jnp.int32), jax.ShapeDtypeStruct((1, blk), bool)
        c_block = jax.jit(lambda q, k, v, p, r: interventions.attend_split(q, k, v, slot_mask(p, r), p, p, r, jnp.sum(r, 1), one)
                          ).lower(sb(H), sb(K), sb(K), pb, rb).compile().cost_analysis()["flops"]
        c_split += (n // blk - 1) * c_block
        print(f"TriangleMix attention FLOPs, {n // 1024}k tokens, Llama-3.1-8B layer: analytic dense causal "
              f"{analytic(dense_pairs) / 1e12:.2f} TF, pattern {analytic(pairs) / 1e12:.3f} TF "
              f"(ratio {pairs / dense_pairs:.4f}); XLA-counted dense (full square) {c_dense / 1e12:.2f} TF, split "
              f"{c_split / 1e12:.3f} TF (ratio {c_split / c_dense:.4f}, vs causal analytic "
              f"{c_split / analytic(dense_pairs):.4f})")


def triangle_time(tokens, repeats):
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                      num_kv_heads=4)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, tokens)))
    g, st = nnx.split(model)
    results = {}
    for name, tri in (("dense", None), ("masked", interventions.TriangleMix(starting_layer=1, path="masked")),
                      ("split", interventions.TriangleMix(starting_layer=1, path="split"))):
        fn = jax.jit(lambda st, tri=tri: nnx.merge(g, st)(ids, triangle=tri).logits[:, -1])
        results[name] = median_time(lambda: fn(st), repeats)
    d = results["dense"]
    print(f"TriangleMix prefill, {tokens} tokens, 4-layer Llama 256 wide (3 sparse layers), {jax.devices()[0].platform}: "
          + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / d:.2f}x)" for k, v in results.items()))


def main():  # noqa: D103
    ap = argparse.ArgumentParser()
    ap.add_argument("--var-layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].platform}")
    var_overhead(args.var_layers, args.repeats)
    triangle_flops()
    triangle_time(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
