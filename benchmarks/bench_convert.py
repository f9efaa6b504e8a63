"""Converter throughput and memory on a synthetic multi-GB sharded checkpoint, against a plain file copy.

    python benchmarks/bench_convert.py [--text-layers 8] [--dir /tmp/jaxdebias-bench] [--keep]

Writes a llava-hf style checkpoint with the real LLaVA-1.5-7B tensor shapes (the full CLIP ViT-L/14-336 tower,
the projector, ``--text-layers`` Vicuna-7B decoder layers, embeddings and LM head) in fp16, sharded with an
index. Then, side by side on the same disk: a plain copy of the shards, and ``jaxdebias-convert`` to bf16 in a
child process whose peak RSS is reported against the largest tensor and the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def llava_7b_shapes(text_layers: int) -> dict[str, tuple[int, ...]]:
    D, F, V, vd, vf = 4096, 11008, 32064, 1024, 4096
    s = {"language_model.model.embed_tokens.weight": (V, D), "language_model.model.norm.weight": (D,),
         "language_model.lm_head.weight": (V, D),
         "multi_modal_projector.linear_1.weight": (D, vd), "multi_modal_projector.linear_1.bias": (D,),
         "multi_modal_projector.linear_2.weight": (D, D), "multi_modal_projector.linear_2.bias": (D,)}
    for i in range(text_layers):
        p = f"language_model.model.layers.{i}."
        s.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                  **{p + f"self_attn.{n}_proj.weight": (D, D) for n in "qkvo"},
                  p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)})
    v = "vision_tower.vision_model."
    s.update({v + "embeddings.class_embedding": (vd,), v + "embeddings.patch_embedding.weight": (vd, 3, 14, 14),
              v + "embeddings.position_embedding.weight": (577, vd), v + "pre_layrnorm.weight": (vd,),
              v + "pre_layrnorm.bias": (vd,), v + "post_layernorm.weight": (vd,), v + "post_layernorm.bias": (vd,)})
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            s.update({p + n + ".weight": (vd,), p + n + ".bias": (vd,)})
        for n in "qkv":
            s.update({p + f"self_attn.{n}_proj.weight": (vd, vd), p + f"self_attn.{n}_proj.bias": (vd,)})
        s.update({p + "self_attn.out_proj.weight": (vd, vd), p + "self_attn.out_proj.bias": (vd,),
                  p + "mlp.fc1.weight": (vf, vd), p + "mlp.fc1.bias": (vf,), p + "mlp.fc2.weight": (vd, vf),
                  p + "mlp.fc2.bias": (vd,)})
    return s


def write_checkpoint(path: str, text_layers: int, shard_bytes: int = 2 << 30) -> tuple[int, int]:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    shapes = llava_7b_shapes(text_layers)
    rng = np.random.default_rng(0)
    shards, cur, size = [], {}, 0
    for k, shp in shapes.items():
        n = int(np.prod(shp))
        if cur and size + 2 * n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16).reshape(shp)
        size += 2 * n
        if len(cur) and size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(path, name))
        wm.update({k: name for k in sh})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    config = {
        "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": text_layers, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu"}}
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    largest = max(2 * int(np.prod(s)) for s in shapes.values())
    return sum(2 * int(np.prod(s)) for s in shapes.values()), largest


PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
CHILD = f"""
import sys, time
from jaxdebias.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype="bfloat16", progress=False)
print(time.perf_counter() - t, {PEAK})
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-layers", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/jaxdebias-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    src, cp, dst = (os.path.join(args.dir, n) for n in ("src", "copy", "dst"))
    shutil.rmtree(args.dir, ignore_errors=True)
    total, largest = write_checkpoint(src, args.text_layers)
    subprocess.run(["sync"], check=False)
    os.makedirs(cp)
    t = time.perf_counter()
    for f in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, f), os.path.join(cp, f))
    os.sync()
    t_copy = time.perf_counter() - t
    base = subprocess.run([sys.executable, "-c", f"import jax, orbax.checkpoint, jaxdebias.convert; "
                           f"print({PEAK})"], capture_output=True, text=True, check=True)
    base_rss = int(base.stdout.split()[-1])
    r = subprocess.run([sys.executable, "-c", CHILD, src, dst], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    os.sync()
    t_conv, rss = (float(x) for x in r.stdout.split()[-2:])
    gb = 1 << 30
    print(f"checkpoint: {total / gb:.2f} GiB fp16 in {len(os.listdir(src)) - 2} shards, largest tensor "
          f"{largest / gb:.3f} GiB")
    print(f"plain copy:  {total / t_copy / 1e6:8.1f} MB/s ({t_copy:.1f} s)")
    print(f"convert:     {total / t_conv / 1e6:8.1f} MB/s ({t_conv:.1f} s) = {t_copy / t_conv:.2f}x the copy rate")
    print(f"peak RSS of the converter: {rss / gb:.2f} GiB (imports alone {base_rss / gb:.2f} GiB); above imports "
          f"{(rss - base_rss) / gb:.2f} GiB = {(rss - base_rss) / largest:.1f}x the largest tensor, "
          f"{(rss - base_rss) / total:.2f}x the checkpoint")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
