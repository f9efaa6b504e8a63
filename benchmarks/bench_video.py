"""Pruned Video-LLaVA prefill against unpruned on an 8-frame video, side by side in one run, beside the FLOP ratio.

    python benchmarks/bench_video.py [--layers 8] [--hidden 512] [--text 64] [--repeats 3] [--method fastv]

A random small-width Video-LLaVA (two CLIP towers at 224/14: 8 frames x (256 patches + CLS) = 2056 visual tokens;
a Llama decoder ``--layers`` x ``--hidden``) answers one prompt (2056 video + ``--text`` text tokens, batch 1,
the prompt padded to a multiple of 64) unpruned and pruned to 256 / 512 / 1024 visual tokens, debiased with the
online per-frame curve. The prefills run round-robin (every round times each once); reported per budget: the
median prefill time, its ratio to unpruned, XLA's FLOP ratio of the compiled prefills (towers included: they run
in both) and the decoder's analytic FLOP ratio (the limit of what pruning inside the decoder can save).
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
from jaxdebias.models.video_llava import VideoLlava, VideoLlavaConfig
from _timing import compiled_prefill, interleaved_times
from _timing import decoder_flops as analytic_flops

KEEPS = (256, 512, 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="fastv")
    ap.add_argument("--trend", default="frame", choices=("frame", "video"))
    args = ap.parse_args()
    D, L = args.hidden, args.layers
    F_mlp = int(D * 2.6875)
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    cfg = VideoLlavaConfig(
        ClipVisionConfig(hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4, image_size=224,
                         dtype=dtype, param_dtype=dtype),
        LlamaConfig(vocab_size=32064, hidden_size=D, intermediate_size=F_mlp, num_layers=L, num_heads=D // 64,
                    num_kv_heads=D // 64, dtype=dtype, param_dtype=dtype), frame_trend=args.trend)
    model = VideoLlava(cfg, rngs=nnx.Rngs(0))
    n = cfg.video_tokens
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [cfg.video_token_id] * n,
                          rng.integers(3, 31000, args.text - 6)])[None]
    T = ids.shape[1]
    Tb = -(-T // 64) * 64
    videos = rng.normal(size=(1, cfg.frames, 3, 224, 224)).astype(np.float32)
    batch = gen.Batch(ids, videos, np.ones_like(ids))
    runner = lambda spec: compiled_prefill(model, batch, spec, (Tb,))  # noqa: E731
    decoder_flops = lambda segs: analytic_flops(segs, D, F_mlp)  # noqa: E731

    dense_fn, dense_shape, x_dense = runner(None)
    f_dense = decoder_flops(sequence.segments(Tb, dense_shape, n, L))
    specs = {k: jd.PruneSpec(args.method, keep=k, buckets=KEEPS, debias=jd.Debias(curve="online")) for k in KEEPS}
    runs = {k: runner(spec) for k, spec in specs.items()}
    times = interleaved_times({"dense": dense_fn, **{k: r[0] for k, r in runs.items()}}, args.repeats)
    t_dense = times["dense"]
    print(f"device: {jax.devices()[0].platform}; Video-LLaVA-shaped, {cfg.frames} frames x {cfg.frame_tokens} = {n} "
          f"visual tokens; decoder {L} x {D}, towers 3 x 256; prompt {T} tokens (padded to {Tb}), "
          f"{jnp.dtype(dtype).name}, batch 1; method {args.method}, online curve per {args.trend}; "
          f"{args.repeats} round-robin rounds")
    print(f"unpruned prefill: {t_dense * 1e3:.0f} ms")
    print("| keep | prefill ms | time ratio | FLOP ratio (XLA, whole prefill) | FLOP ratio (decoder, analytic) |")
    print("|---:|---:|---:|---:|---:|")
    for k in KEEPS:
        fn, shape, x = runs[k]
        f = decoder_flops(sequence.segments(Tb, shape, n, L))
        xr = f"{x / x_dense:.3f}" if x and x_dense else "n/a"
        print(f"| {k} | {times[k] * 1e3:.0f} | {times[k] / t_dense:.3f} | {xr} | {f / f_dense:.3f} |")


if __name__ == "__main__":
    main()
