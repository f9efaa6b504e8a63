"""LLaVA-OneVision: pruned prefill against unpruned on OneVision-shaped visual spans, side by side in one run, next
to the FLOP ratios (``bench_next.py``'s measurement for OneVision's SigLIP tower, anyres_max_9 packing and Qwen2).

    python benchmarks/bench_onevision.py [--layers 8] [--hidden 256] [--vision-layers 2] [--image-size 192]
        [--text 64] [--repeats 3] [--method fastv,pdrop,sparsevlm,illava] [--keeps K1,K2,..]

A random LLaVA-OneVision: a SigLIP-style tower of ``--vision-layers`` x 256 at ``--image-size``/14, the 36
OneVision pinpoints (1..6 x 1..6 tiles of ``--image-size``) and a Qwen2-shaped decoder ``--layers`` x ``--hidden``
(head dim 64, GQA 2:1, qkv bias, FFN 5.43 x D as Qwen2-0.5B's, tied 151936 vocabulary). The default tile is 192
px (a 13 x 13 grid, 169 patches per view), OneVision's 384 (27 x 27 = 729) scaled by half per side so the run fits
a few minutes on 2 CPU cores: every rule of the packing is the real one at the smaller grid (``--image-size 384``
runs the real geometry: 7284 and 4941 visual tokens, an unpruned prefill of ~80 s here). Two images, given in 384
px tile units and scaled with the tile so they keep their packing:

- "downscaled": 1500 x 1100 at 384 (750 x 550 at 192) -> best pinpoint 4 x 3 tiles; its unpadded patch grid holds
  more than 1.1^2 x 9 views' patches, so anyres_max_9 bilinearly downscales it (at 192: 52 x 39 -> 45 x 33, 169
  + 33 x 46 = 1687 tokens; at 384: 108 x 79 -> 94 x 69, 7284 tokens); 13 views through the tower;
- "not downscaled": 1000 x 700 at 384 (500 x 350 at 192) -> 3 x 2 tiles, unpadded under the limit (at 192: 37 x
  26, 169 + 26 x 38 = 1157 tokens); 7 views.

Each runs unpruned and pruned with every ``--method`` at every keep (default: 1, 2 and 4 views' patches; what a keep
counts is the method's: FastV's kept tokens, PyramidDrop's layer-average budget, SparseVLM's 128 list scaled; keep
buckets of 64 past the library's 576 so a large keep shrinks the static shape), debiased with released padding +
the online per-view curve; a decoder shallower than a method's released stage layers runs them scaled by depth /
32 (as ``accelerator.prune_spec``). iLLaVA runs with its OneVision defaults (the LLM stage merges 30% of the span:
``llm_r`` 0.70, keep unused, so one row), its stage layer scaled, and its encoder merges in the tower's last
min(4, layers) layers, leaving each view the square grid 27 -> 19 scales to. Reported per image and budget: median
prefill time (vision tower included), its ratio to unpruned, XLA's FLOP ratio of the whole compiled prefill and
the decoder's analytic FLOP ratio (bench_next's count: projections, MLP, a full S x (S + 64) attention). Times are
measured round-robin per image (``_timing.interleaved_times``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import generate as gen
from jaxdebias.models import sequence
from jaxdebias.models.llama import LlamaConfig
from jaxdebias.models.llava_next import image_tokens
from jaxdebias.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig, expand_prompt
from jaxdebias.models.siglip import SiglipVisionConfig
from _timing import compiled_prefill, interleaved_times
from _timing import decoder_flops as analytic_flops

# (width, height) at 384 px tiles, scaled with --image-size
IMAGES = {"downscaled": (1500, 1100), "not downscaled": (1000, 700)}


def scaled_spec(method: str, keep: int, n_visual: int, num_layers: int, debias: jd.Debias, tower_layers: int,
                family: str, view_patches: int):
    """(spec, setting): ``accelerator.prune_spec``'s depth scaling for an ``n_visual``-slot span, and iLLaVA's
    encoder merges moved into the tower's last layers. Keep buckets: the library's up to 576, then every 64 up to
    the span (the default buckets end at 576, past which a stage's static shape is the whole span)."""
    m = jd.methods.get(method)
    buckets = jd.DEFAULT_BUCKETS + tuple(range(640, n_visual + 64, 64))
    spec = jd.PruneSpec(method, keep=keep, debias=debias if m.debias else jd.Debias(), buckets=buckets)
    setting = "released layers"
    if m.name == "illava":
        k = min(4, tower_layers)
        side = round(math.isqrt(view_patches) * 19 / 27)  # OneVision's 27 x 27 -> 19 x 19, scaled to the view:
        while (view_patches - side * side) % k:  # a square grid left, the same r in each merge layer
            side -= 1
        r = (view_patches - side * side) // k
        spec = dataclasses.replace(spec, options={"vit_layers": tuple(range(tower_layers - k, tower_layers)),
                                                  "vit_r": r})
        setting = (f"encoder merges in SigLIP layers {tower_layers - k}..{tower_layers - 1} (r = {r}: "
                   f"{view_patches} -> {view_patches - k * r} per view)")
    try:
        spec.plan(n_visual, num_layers, family)
        return spec, setting
    except ValueError:
        pass
    scaled, boundary = [], 0
    for s in spec.schedule(n_visual, 32, family):
        layer = max(boundary + 1, math.floor(s.layer * num_layers / 32 + 0.5))
        scaled.append(dataclasses.replace(s, layer=layer))
        boundary = scaled[-1].boundary
    released = "/".join(str(s.layer) for s in spec.schedule(n_visual, 32, family))
    spec = dataclasses.replace(spec, stages=tuple(scaled))
    spec.plan(n_visual, num_layers, family)  # raises where the depth is too shallow even scaled
    stages = f"stage layers {'/'.join(str(s.layer) for s in scaled)} (released {released} scaled to {num_layers})"
    return spec, stages if m.name != "illava" else f"{setting}, {stages}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=192, help="tile side (patch 14); OneVision's is 384")
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="fastv,pdrop,sparsevlm,illava", help="one method or a comma-separated list")
    ap.add_argument("--keeps", default=None, help="comma-separated; default: 1, 2 and 4 views' patches")
    ap.add_argument("--images", default="downscaled,not downscaled", help="a comma-separated subset of: "
                    + ", ".join(IMAGES))
    args = ap.parse_args()
    D, L, S = args.hidden, args.layers, args.image_size
    F = int(D * 4864 / 896)
    heads = D // 64
    dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    cfg = LlavaOnevisionConfig(
        SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_layers=args.vision_layers, num_heads=4,
                           image_size=S, patch_size=14, dtype=dtype, param_dtype=dtype),
        LlamaConfig(vocab_size=151936, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=heads,
                    num_kv_heads=max(1, heads // 2), qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=32768, tie_word_embeddings=True, dtype=dtype, param_dtype=dtype),
        grid_pinpoints=tuple((h * S, w * S) for h in range(1, 7) for w in range(1, 7)))
    model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
    Dkv = cfg.text.num_kv_heads * 64
    rng = np.random.default_rng(0)
    debias = jd.Debias(curve="online", pad_tau="released")
    methods = args.method.split(",")
    g = cfg.vision.grid
    keeps = [int(k) for k in args.keeps.split(",")] if args.keeps else [g * g, 2 * g * g, 4 * g * g]
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); LLaVA-OneVision-shaped random "
          f"model: SigLIP {args.vision_layers} x 256 at {S}/14 ({g} x {g} = {g * g} patches per view), decoder "
          f"{L} x {D} (Qwen2-shaped: {heads} heads / {cfg.text.num_kv_heads} KV, FFN {F}), {jnp.dtype(dtype).name}, "
          f"batch 1; debias: released padding + online per-view curve; {args.repeats} interleaved rounds per image")

    for label in args.images.split(","):
        w0, h0 = IMAGES[label]
        size = (round(w0 * S / 384), round(h0 * S / 384))
        m = jd.pad_mask_anyres(*size, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints], tile=S, grid=g)
        th, tw = m.best_resolution
        tiles = (th // S) * (tw // S)
        rows, cols = m.grid_shape
        pr, pc = cfg.packed(rows, cols)
        if ((pr, pc) != (rows, cols)) != (label == "downscaled"):
            raise SystemExit(f"--image-size {S}: image {size} is {'not ' * (label == 'downscaled')}downscaled; "
                             "pick another size.")
        px = rng.normal(size=(1, 1 + tiles, 3, S, S)).astype(np.float32)
        images = model.images(px, [size])
        n_img = int(image_tokens(images)[0])
        ids = np.concatenate([[151644], rng.integers(3, 151000, 5), [cfg.image_token_id] * n_img,
                              rng.integers(3, 151000, args.text - 6)])[None]
        ids, am = expand_prompt(ids, np.ones_like(ids), images, cfg)
        batch = gen.Batch(ids, images, am, image_sizes=np.array([size]))
        N, T = images.num_slots, ids.shape[1]
        buckets = (jd.bucket(T, (), then_every=512),)

        runner = lambda spec: compiled_prefill(model, batch, spec, buckets)  # noqa: E731
        decoder_flops = lambda plan: analytic_flops(  # noqa: E731
            sequence.segments(buckets[0], plan, N, L), D, F, Dkv)

        runs, settings, skipped = {"unpruned": runner(None)}, {}, {}
        family = model.option_family(images)
        for method in methods:
            for keep in keeps:
                try:
                    spec, settings[method] = scaled_spec(method, keep, N, L, debias, args.vision_layers, family, g * g)
                    llm_r = spec.resolved_options(family).get("llm_r")
                    if llm_r is not None:  # iLLaVA's OneVision release: its own count (llm_r), keep unused
                        runs[(method, f"llm_r {llm_r}")] = runner(spec)
                        break
                    runs[(method, keep)] = runner(spec)
                except Exception as e:  # noqa: BLE001 - a method that cannot run here is reported, not fatal
                    skipped[(method, keep)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        times = interleaved_times({name: fn for name, (fn, _, _) in runs.items()}, args.repeats)
        t0, _, x0 = times["unpruned"], *runs["unpruned"][1:]
        f0 = decoder_flops(None)
        down = f"{cols} x {rows} downscaled to {pc} x {pr}" if (pr, pc) != (rows, cols) else \
            f"{cols} x {rows}, not downscaled"
        print(f"\nimage {size[0]}x{size[1]} ({label}): {tw // S} x {th // S} tiles, unpadded tile grid {down}; "
              f"{n_img} visual tokens ({N}-slot span, {1 + tiles} views), prompt {T} tokens (bucket {buckets[0]}); "
              f"unpruned prefill {t0 * 1e3:.0f} ms, {x0 / 1e9:.1f} GFLOP (XLA)")
        for method in methods:
            if method in settings:
                print(f"  {method}: {settings[method]}")
        print("| method | keep | prefill ms | time ratio | FLOP ratio (XLA, all) | FLOP ratio (decoder) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (_, plan, flops) in runs.items():
            if name == "unpruned":
                continue
            t = times[name]
            print(f"| {name[0]} | {name[1]} | {t * 1e3:.0f} | {t / t0:.3f} | {flops / x0:.3f} | "
                  f"{decoder_flops(plan) / f0:.3f} |")
        for (method, keep), why in skipped.items():
            print(f"| {method} | {keep} | not run: {why} | | | |")


if __name__ == "__main__":
    main()
