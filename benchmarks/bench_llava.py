"""Prefill and per-token decode of our Flax LLaVA against transformers' PyTorch model, same weights, one run, with
the machine's limits measured beside them.

    python benchmarks/bench_llava.py [--layers 8] [--hidden 1024] [--text 64] [--new 32] [--repeats 5]

A mid-sized random LLaVA (CLIP-style tower 336 px / 14 -> 576 visual tokens, a Llama decoder of the given width
and depth, vocab 32064) is built in transformers, saved, converted with our converter, and both run the same prompt
(576 visual + ``--text`` text tokens) in fp32 on the CPU. Timed round-robin (``_timing.interleaved_times``): each
round runs a 1-token and a (1 + ``--new``)-token greedy generation of both, so a slow stretch of a shared machine
lands on all four alike. Prefill = the 1-token time; decode ms/token = (long - short) / ``--new``.

Limits, measured in the same run (best of several calls): the matmul rate (jitted fp32 2048^3), a copy kernel
(jitted ``x * 2`` over 256 MiB, donated so that it writes in place: bytes read + written; XLA:CPU runs it on one
thread) and a mat-vec (8192 x 8192 fp32 @ vector: matrix bytes read, the weight-streaming bandwidth a decode step
needs). Decode is reported as the bytes a step must read (decoder weights + LM head, then also the KV cache) per
second and as a % of the mat-vec bandwidth; prefill as the decoder's analytic FLOPs per second and a % of the
matmul rate.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
from _timing import call_times, interleaved_times

from jaxdebias.convert import from_hf
from jaxdebias.models.generate import Batch, generate


def limits(repeats: int):
    """(matmul FLOP/s, copy bytes/s, mat-vec bytes/s), each the best of ``repeats`` jitted calls."""
    best = lambda fn: min(call_times(fn, repeats))  # noqa: E731
    key = jax.random.key(0)
    n = 2048
    a, b = jax.random.normal(key, (n, n)), jax.random.normal(jax.random.fold_in(key, 1), (n, n))
    mm = jax.jit(lambda a, b: a @ b)
    flops = 2 * n**3 / best(lambda: mm(a, b))
    box = [jax.random.normal(key, (64 * 2**20,))]  # 256 MiB fp32, donated: written in place, no fresh pages
    cp = jax.jit(lambda x: x * 2, donate_argnums=0)

    def copy_step():
        box[0] = cp(box[0])
        return box[0]

    copy = 2 * box[0].nbytes / best(copy_step)
    m = 8192
    w, v = jax.random.normal(key, (m, m)), jax.random.normal(key, (m,))
    mv = jax.jit(lambda w, v: w @ v)
    matvec = w.nbytes / best(lambda: mv(w, v))
    return flops, copy, matvec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch  # the reference: a test extra, imported only when this benchmark runs
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    D, L = args.hidden, args.layers
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                       num_attention_heads=8, image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=D, intermediate_size=int(D * 2.6875),
                                num_hidden_layers=L, num_attention_heads=D // 64, num_key_value_heads=D // 64),
        image_token_id=32000)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_hf(d)

    rng = np.random.default_rng(0)
    T = 576 + args.text
    ids = np.concatenate([[1], rng.integers(3, 31000, 5), [32000] * 576, rng.integers(3, 31000, args.text - 6)])[None]
    am = np.ones_like(ids)
    px = rng.normal(size=(1, 3, 336, 336)).astype(np.float32)
    t_ids, t_am, t_px = torch.tensor(ids), torch.tensor(am), torch.tensor(px)

    def hf_gen(n):
        with torch.no_grad():
            return hf.generate(input_ids=t_ids, pixel_values=t_px, attention_mask=t_am, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)

    def our_gen(n):
        return generate(ours, Batch(ids, px, am), max_new_tokens=n, stop_at_eos=False).tokens

    peak, copy_bw, matvec_bw = limits(max(args.repeats, 5))
    n_long = args.new + 1
    times = interleaved_times({("transformers", 1): lambda: hf_gen(1), ("jaxdebias", 1): lambda: our_gen(1),
                               ("transformers", n_long): lambda: hf_gen(n_long),
                               ("jaxdebias", n_long): lambda: our_gen(n_long)}, args.repeats)
    results = {name: (times[name, 1], (times[name, n_long] - times[name, 1]) / args.new)
               for name in ("transformers", "jaxdebias")}
    same = np.array_equal(hf_gen(8)[:, T:].numpy(), our_gen(8))

    tc = cfg.text_config
    F = tc.intermediate_size
    per_layer = 2 * T * (4 * D * D + 3 * D * F) + 2 * 2 * T * T * D  # projections + QK^T and PV (full, unmasked)
    flops = L * per_layer + 2 * D * tc.vocab_size  # + LM head on the last token
    weights = 4 * (L * (4 * D * D + 3 * D * F + 2 * D) + D + D * tc.vocab_size)  # fp32, embedding table not read
    kv = 4 * L * 2 * (T + 64) * D  # the cache as allocated: prompt + 64 slots, read whole by each step
    print(f"device: {jax.devices()[0].platform} ({jax.device_count()} device, torch threads "
          f"{torch.get_num_threads()}); decoder {L} x {D}, vocab {tc.vocab_size}, prompt {T} tokens (576 visual), "
          f"fp32; {args.repeats} round-robin rounds; greedy tokens identical: {same}")
    print(f"limits: matmul {peak / 1e9:.1f} GFLOP/s (fp32 2048^3), copy {copy_bw / 1e9:.1f} GB/s (x * 2, 256 MiB, "
          f"read + write), mat-vec {matvec_bw / 1e9:.1f} GB/s (8192^2 fp32, matrix read)")
    print(f"decode reads {weights / 1e6:.0f} MB of weights (+ {kv / 1e6:.0f} MB KV cache) per token: at the mat-vec "
          f"bandwidth {weights / matvec_bw * 1e3:.1f} ms/token (+ cache {(weights + kv) / matvec_bw * 1e3:.1f})")
    print(f"{'':14s} {'prefill ms':>11s} {'GFLOP/s':>8s} {'% matmul':>9s} {'decode ms/tok':>14s} {'weights GB/s':>13s} "
          f"{'% mat-vec':>10s} {'+KV % mat-vec':>14s}")
    for name, (pre, dec) in results.items():
        print(f"{name:14s} {pre * 1e3:11.1f} {flops / pre / 1e9:8.1f} {100 * flops / pre / peak:9.1f} "
              f"{dec * 1e3:14.2f} {weights / dec / 1e9:13.1f} {100 * weights / dec / matvec_bw:10.1f} "
              f"{100 * (weights + kv) / dec / matvec_bw:14.1f}")
    (hp, hd), (op, od) = results["transformers"], results["jaxdebias"]
    print(f"speed-up over transformers (their time / ours): prefill {hp / op:.2f}x, decode {hd / od:.2f}x")
    print(f"decoder prefill FLOPs (analytic): {flops / 1e9:.1f} GFLOP; the rates include the vision tower's time")


if __name__ == "__main__":
    main()
