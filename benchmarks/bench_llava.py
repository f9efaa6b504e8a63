"""Prefill and per-token decode of our Flax LLaVA against transformers' PyTorch model, same weights, one run.

    python benchmarks/bench_llava.py [--layers 8] [--hidden 1024] [--text 64] [--new 32] [--repeats 3]

A mid-sized random LLaVA (CLIP-style tower 336 px / 14 -> 576 visual tokens, a Llama decoder of the given width
and depth) is built in transformers, saved, converted with our converter, and both run the same prompt (576
visual + ``--text`` text tokens) in fp32 on the CPU. Reported: median times and their ratio (ours / theirs), and
the decoder's analytic prefill FLOPs with the rate each achieves.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
from _timing import median_time




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from jaxdebias.convert import from_hf
    from jaxdebias.models.generate import Batch, generate

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
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def hf_gen(n):
        with torch.no_grad():
            return hf.generate(input_ids=t_ids, pixel_values=t_px, attention_mask=t_am, max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)

    def our_gen(n):
        return generate(ours, Batch(ids, px, am), max_new_tokens=n, stop_at_eos=False).tokens

    results = {}
    for name, gen in (("transformers", hf_gen), ("jaxdebias", our_gen)):
        pre = median_time(lambda: gen(1), args.repeats)
        full = median_time(lambda: gen(args.new + 1), args.repeats)
        results[name] = (pre, (full - pre) / args.new)
    same = np.array_equal(hf_gen(8)[:, T:].numpy(), our_gen(8))

    F = cfg.text_config.intermediate_size
    per_layer = 2 * T * (4 * D * D + 3 * D * F) + 2 * 2 * T * T * D  # projections + QK^T and PV (full, unmasked)
    flops = L * per_layer + 2 * D * cfg.text_config.vocab_size  # + LM head on the last token
    print(f"device: {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}; decoder {L} x {D}, "
          f"prompt {T} tokens (576 visual), fp32; greedy tokens identical: {same}")
    print(f"{'':14s} {'prefill (ms)':>13s} {'decode (ms/token)':>18s} {'decoder GFLOP/s':>16s}")
    for name, (pre, dec) in results.items():
        print(f"{name:14s} {pre * 1e3:13.1f} {dec * 1e3:18.2f} {flops / pre / 1e9:16.1f}")
    (hp, hd), (op, od) = results["transformers"], results["jaxdebias"]
    print(f"ratio ours/transformers: prefill {op / hp:.2f}, decode {od / hd:.2f}  (< 1 means we are faster)")
    print(f"decoder prefill FLOPs (analytic): {flops / 1e9:.1f} GFLOP; the rate includes the vision tower's time")


if __name__ == "__main__":
    main()
