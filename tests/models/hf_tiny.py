"""Tiny random transformers LLaVA models for parity tests (built in the test, saved with save_pretrained)."""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN = 150
VOCAB = 151


def for_parity(model, vision_std: float | None = None):
    """A freshly built transformers model (eval mode) made fit for parity tests: every parameter matters (biases
    and norms moved off their init by N(0, 0.1); with ``vision_std`` the tower's matrices redrawn at that std),
    eager attention, and generation that never stops at an eos or pad id. Returns ``model``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif vision_std is not None and "vision_tower" in name and p.ndim > 1:
                p.normal_(0, vision_std)
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def pad_prompts(seqs, padding: str):
    """Token lists -> (input_ids int64[B, T], attention_mask int64[B, T]), padded with 0 on ``padding``'s side."""
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int64)
    am = np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding == "left" else slice(0, len(s))
        ids[b, sl] = s
        am[b, sl] = 1
    return ids, am


def converted(hf, path, **save_kw):
    """(hf, ours): a transformers model saved with ``save_pretrained`` at ``path`` (``save_kw``: e.g. a
    max_shard_size that writes several shards) and loaded through our converter."""
    from jaxdebias.convert import from_hf

    hf.save_pretrained(path, **save_kw)
    return hf, from_hf(path)


def make_hf_llava(kind: str, seed: int = 0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                              image_size=42, patch_size=14, initializer_range=0.1, initializer_factor=1.0)
    if kind == "mha":
        text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=67, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, initializer_range=0.1, pad_token_id=0)
    elif kind == "gqa":
        text = LlamaConfig(vocab_size=VOCAB, hidden_size=60, intermediate_size=53, num_hidden_layers=4,
                           num_attention_heads=6, num_key_value_heads=2, initializer_range=0.1, pad_token_id=0,
                           attention_bias=True, rms_norm_eps=1e-5,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8})
    else:
        raise ValueError(kind)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return for_parity(LlavaForConditionalGeneration(cfg).eval())


def prompts(cfg_patches: int = 9, seed: int = 1, padding: str = "left"):
    """Two prompts of different lengths, one image each, padded on the given side.

    Returns (input_ids int64[2, T], attention_mask int64[2, T], pixel_values float32[2, 3, 42, 42])."""
    rng = np.random.default_rng(seed)
    seqs = []
    for pre, post in ((3, 7), (5, 2)):
        seqs.append([1] + list(rng.integers(3, 140, pre)) + [IMAGE_TOKEN] * cfg_patches + list(rng.integers(3, 140, post)))
    ids, am = pad_prompts(seqs, padding)
    pixels = rng.normal(size=(2, 3, 42, 42)).astype(np.float32)
    pixels[1] = np.abs(pixels[1]) * 2  # different content
    return ids, am, pixels
