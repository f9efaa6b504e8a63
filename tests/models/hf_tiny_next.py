"""Tiny random transformers LLaVA-NeXT models (CLIP 42 px / 14 -> 3 x 3 patches per view, a Mistral decoder) and
prompts in the processor's layout, for parity tests (built in the test, saved with save_pretrained)."""

from __future__ import annotations

import numpy as np

from .hf_tiny import for_parity, pad_prompts

IMAGE_TOKEN = 150
VOCAB = 151
PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42]]  # (height, width): 2, 2, 4 and 3 tiles of 42 px


def make_hf_next(seed: int = 0, layers: int = 3):
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                              image_size=42, patch_size=14, initializer_range=0.1, initializer_factor=1.0)
    text = MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=67, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
                         pad_token_id=0, sliding_window=4096, rope_theta=1e6, max_position_embeddings=4096)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                          image_grid_pinpoints=PINPOINTS)
    return for_parity(LlavaNextForConditionalGeneration(cfg).eval())


def hf_token_count(hf, width: int, height: int) -> int:
    """The image's token count as transformers' model packs it (image_sizes (height, width))."""
    import torch

    feats = [torch.zeros(1 + tiles(hf, width, height), 9, 1)]
    _, lens = hf.model.pack_image_features(feats, torch.tensor([[height, width]]), "default",
                                                image_newline=torch.zeros(1))
    return int(lens[0])


def tiles(hf, width: int, height: int) -> int:
    from transformers.image_processing_utils import select_best_resolution

    h, w = select_best_resolution((height, width), hf.config.image_grid_pinpoints)
    return (h // 42) * (w // 42)


def next_prompts(hf, sizes, seed: int = 1, padding: str = "left"):
    """One prompt per image (sizes: (width, height)), placeholders expanded to the model's count, padded on the
    given side. Returns (input_ids int64[B, T], attention_mask int64[B, T], pixel_values float32[B, V, 3, 42, 42]
    (zero views after each image's tiles), image_sizes_hw int64[B, 2] (height, width: transformers' order))."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i, (w, h) in enumerate(sizes):
        pre, post = (3, 7) if i % 2 == 0 else (5, 2)
        n = hf_token_count(hf, w, h)
        seqs.append([1] + list(rng.integers(3, 140, pre)) + [IMAGE_TOKEN] * n + list(rng.integers(3, 140, post)))
    ids, am = pad_prompts(seqs, padding)
    V = 1 + max(tiles(hf, w, h) for w, h in sizes)
    px = np.zeros((len(sizes), V, 3, 42, 42), np.float32)
    for b, (w, h) in enumerate(sizes):
        px[b, :1 + tiles(hf, w, h)] = rng.normal(size=(1 + tiles(hf, w, h), 3, 42, 42))
    return ids, am, px, np.array([[h, w] for w, h in sizes], np.int64)
