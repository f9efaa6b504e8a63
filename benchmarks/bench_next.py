"""LLaVA-NeXT: pruned prefill against unpruned on a NeXT-sized visual span, side by side in one run, next to the
FLOP ratio.

    python benchmarks/bench_next.py [--layers 8] [--hidden 256] [--text 64] [--repeats 3] [--method fastv]

A random LLaVA-NeXT (a CLIP-style 336/14 tower of ``--vision-layers`` x 256, llava-v1.6's pinpoints, a Llama /
Mistral-shaped decoder ``--layers`` x ``--hidden``) reads one 1000 x 1000 image: best resolution 672 x 672, so
4 tiles + the base view = 5 x 576 = 2880 visual tokens, plus 48 newlines (a 2928-slot span), and ``--text`` text
tokens, batch 1, one prompt bucket of 3072 slots. It runs unpruned and pruned to a few budgets with padding +
online per-view debiasing. Reported per budget: median prefill time (vision tower included), its ratio to
unpruned, and two FLOP ratios: XLA's count of the whole compiled prefill (vision tower included) and the
decoder's analytic count (the limit of the speed-up where the decoder dominates). Times are measured
round-robin (``_timing.interleaved_times``), so a slow stretch of a shared machine lands on every variant alike.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models import sequence
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.llama import LlamaConfig
from jaxdebias.models.llava_next import LlavaNext, LlavaNextConfig, expand_prompt, image_tokens
from _timing import compiled_prefill, interleaved_times
from _timing import decoder_flops as analytic_flops

SIZE = (1000, 1000)  # (width, height): 4 tiles at llava-v1.6's pinpoints, nothing unpadded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="fastv")
    ap.add_argument("--keeps", default="128,320,576")
    args = ap.parse_args()
    D, L = args.hidden, args.layers
    F = int(D * 2.6875)
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    cfg = LlavaNextConfig(
        ClipVisionConfig(hidden_size=256, intermediate_size=1024, num_layers=args.vision_layers + 1, num_heads=4,
                         dtype=dtype, param_dtype=dtype),
        LlamaConfig(vocab_size=32064, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=D // 64,
                    num_kv_heads=D // 64, dtype=dtype, param_dtype=dtype))
    model = LlavaNext(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    px = rng.normal(size=(1, 5, 3, 336, 336)).astype(np.float32)
    images = model.images(px, [SIZE])
    n_img = int(image_tokens(images)[0])
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [cfg.image_token_id] * n_img,
                          rng.integers(3, 31000, args.text - 6)])[None]
    ids, am = expand_prompt(ids, np.ones_like(ids), images, cfg)
    batch = gen.Batch(ids, images, am, image_sizes=np.array([SIZE]))
    N, T = images.num_slots, ids.shape[1]
    buckets = (jd.bucket(T, (), then_every=512),)
    runner = lambda spec: compiled_prefill(model, batch, spec, buckets)  # noqa: E731
    decoder_flops = lambda plan: analytic_flops(sequence.segments(buckets[0], plan, N, L), D, F)  # noqa: E731

    debias = jd.Debias(curve="online", pad_tau="released")
    runs = {"unpruned": runner(None)}
    for keep in (int(k) for k in args.keeps.split(",")):
        runs[keep] = runner(jd.PruneSpec(args.method, keep=keep, debias=debias))
    times = interleaved_times({name: fn for name, (fn, _, _) in runs.items()}, args.repeats)
    t0, _, x0 = times["unpruned"], *runs["unpruned"][1:]
    f0 = decoder_flops(runs["unpruned"][1])
    print(f"device: {jax.devices()[0].platform}; LLaVA-NeXT, image {SIZE[0]}x{SIZE[1]} -> 4 tiles + base view = "
          f"{5 * 576} visual tokens + 48 newlines ({N}-slot span), prompt {T} tokens (bucket {buckets[0]}); "
          f"decoder {L} x {D}, CLIP {args.vision_layers} x 256 on 5 views; {jnp.dtype(dtype).name}; method "
          f"{args.method}, debias: released padding + online per-view curve; {args.repeats} interleaved rounds")
    print(f"unpruned prefill: {t0 * 1e3:.0f} ms")
    print(f"{'keep':>5s} {'prefill ms':>11s} {'time ratio':>11s} {'FLOP ratio (XLA, all)':>22s} "
          f"{'FLOP ratio (decoder)':>21s}")
    for name, (_, shape, flops) in runs.items():
        if name == "unpruned":
            continue
        t = times[name]
        print(f"{name:5d} {t * 1e3:11.0f} {t / t0:11.3f} {flops / x0:22.3f} {decoder_flops(shape) / f0:21.3f}")


if __name__ == "__main__":
    main()
