"""Tiny random transformers LLaVA-OneVision models (SigLIP 32 px / 6 -> 5 x 5 patches per view, 2 px never read; a
Qwen2 decoder) and prompts in the processor's layout, for parity tests (built in the test, saved with
save_pretrained)."""

from __future__ import annotations

import numpy as np

from .hf_tiny import for_parity, pad_prompts

IMAGE_TOKEN, VIDEO_TOKEN = 150, 151
VOCAB = 152
SIDE = 32
# (height, width) in 32 px tiles; 4 x 4 (20 x 20 patches) and 3 x 4 exceed anyres_max_9's 1.1^2 x 9 x 25 patches
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 96], [96, 128], [128, 128]]


def make_hf_onevision(seed: int = 0, layers: int = 3):
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                                image_size=SIDE, patch_size=6, vision_use_head=False)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=67, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, pad_token_id=0,
                       rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, image_grid_pinpoints=PINPOINTS)
    return for_parity(LlavaOnevisionForConditionalGeneration(cfg).eval(), vision_std=0.1)  # larger tower weights


def tiles(hf, width: int, height: int) -> int:
    from transformers.image_processing_utils import select_best_resolution

    h, w = select_best_resolution((height, width), hf.config.image_grid_pinpoints)
    return (h // SIDE) * (w // SIDE)


def hf_token_count(hf, width: int, height: int) -> int:
    """The image's token count as transformers' model packs it (image_sizes (height, width))."""
    import torch

    feats = [torch.zeros(1 + tiles(hf, width, height), 25, 1)]
    _, lens = hf.model.pack_image_features(feats, torch.tensor([[height, width]]), image_newline=torch.zeros(1),
                                           vision_aspect_ratio=hf.config.vision_aspect_ratio)
    return int(lens[0])


def onevision_prompts(hf, sizes, seed: int = 1, padding: str = "left"):
    """One prompt per image (sizes: (width, height)), placeholders expanded to the model's count, padded on the
    given side. Returns (input_ids int64[B, T], attention_mask, pixel_values float32[B, V, 3, 32, 32] (zero views
    after each image's tiles), image_sizes_hw int64[B, 2] (height, width: transformers' order))."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i, (w, h) in enumerate(sizes):
        pre, post = (3, 7) if i % 2 == 0 else (5, 2)
        seqs.append([1] + list(rng.integers(3, 140, pre)) + [IMAGE_TOKEN] * hf_token_count(hf, w, h)
                    + list(rng.integers(3, 140, post)))
    ids, am = pad_prompts(seqs, padding)
    V = 1 + max(tiles(hf, w, h) for w, h in sizes)
    px = np.zeros((len(sizes), V, 3, SIDE, SIDE), np.float32)
    for b, (w, h) in enumerate(sizes):
        px[b, :1 + tiles(hf, w, h)] = rng.normal(size=(1 + tiles(hf, w, h), 3, SIDE, SIDE))
    return ids, am, px, np.array([[h, w] for w, h in sizes], np.int64)


def video_prompts(batch: int, frames: int, seed: int = 2, padding: str = "left"):
    """Video prompts: (input_ids, attention_mask, pixel_values_videos float32[B, F, 3, 32, 32]); each video is
    F x 3 x 3 pooled tokens + 1 newline."""
    rng = np.random.default_rng(seed)
    seqs = [[1] + list(rng.integers(3, 140, 2 + 2 * b)) + [VIDEO_TOKEN] * (frames * 9 + 1)
            + list(rng.integers(3, 140, 4)) for b in range(batch)]
    ids, am = pad_prompts(seqs, padding)
    return ids, am, rng.normal(size=(batch, frames, 3, SIDE, SIDE)).astype(np.float32)
