"""Cost of the debias + select step against one decoder layer of a 7B-shaped model, side by side.

    python benchmarks/bench_core.py [--batch 4] [--tokens 640] [--repeats 10]

Both are jitted and timed in the same process on the same device; the report is their ratio. The decoder layer
is a plain Llama-2-7B-shaped block (hidden 4096, 32 heads, MLP 11008) written here with jax.numpy, fp32 on CPU
and bf16 on accelerators, at prefill over ``--tokens`` positions.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxdebias as jd
from _timing import median_time


def llama_layer(p, x):
    """One pre-norm Llama block. x: float[B, T, D]."""
    def rms(v, w):
        return v * jax.lax.rsqrt(jnp.mean(jnp.square(v.astype(jnp.float32)), -1, keepdims=True) + 1e-5).astype(
            v.dtype) * w

    B, T, D = x.shape
    h = rms(x, p["n1"])
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, p[n]) for n in ("wq", "wk", "wv"))
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + jnp.einsum("bthk,hkd->btd", o, p["wo"])
    h = rms(x, p["n2"])
    g = jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])
    return x + g @ p["wd"]




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = jax.devices()[0]
    dtype = jnp.float32 if dev.platform == "cpu" else jnp.bfloat16
    D, H, F = 4096, 32, 11008
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def w(*shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(dtype)

    p = {"n1": jnp.ones((D,), dtype), "n2": jnp.ones((D,), dtype), "wq": w(D, H, D // H), "wk": w(D, H, D // H),
         "wv": w(D, H, D // H), "wo": w(H, D // H, D), "wg": w(D, F), "wu": w(D, F), "wd": w(F, D)}
    x = w(1, args.tokens, D)
    layer = jax.jit(llama_layer)

    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.random((args.batch, 576)), jnp.float32)
    sizes = rng.integers(200, 1200, (2, args.batch))
    pad = jd.pad_mask_expand2square(sizes[0], sizes[1])
    k = jd.bucket(128)
    variants = {
        "pad only": dict(curve=None),
        "pad + released curve": dict(curve=jd.released_curve("pdrop", "gqa")),
        "pad + online fit": dict(curve="online"),
    }
    t_layer = median_time(lambda: layer(p, x), args.repeats)
    print(f"device: {dev.platform} ({dev.device_kind}); dtype {jnp.dtype(dtype).name}")
    print(f"one 7B-shaped decoder layer, batch 1, {args.tokens} tokens: {t_layer * 1e3:.1f} ms")
    print(f"debias + select, batch {args.batch} x 576 scores, keep {k}:")
    for name, kw in variants.items():
        fn = lambda s, kw=kw: jd.debias_and_select(s, k, content=pad, **kw)  # noqa: E731
        t = median_time(lambda fn=fn: fn(scores), args.repeats * 5)
        print(f"  {name:22s} {t * 1e6:8.1f} us   = {100 * t / t_layer:.3f}% of one layer")


if __name__ == "__main__":
    main()
