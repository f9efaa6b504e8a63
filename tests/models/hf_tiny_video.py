"""A tiny random transformers Video-LLaVA (two CLIP towers, 8 frames) for parity tests, built in the test."""

from __future__ import annotations

import numpy as np

from .hf_tiny import for_parity, pad_prompts

IMAGE_TOKEN = 150
VIDEO_TOKEN = 151
VOCAB = 152
FRAMES = 8
PATCHES = 4  # a 28x28 frame in 14x14 patches
FRAME_TOKENS = PATCHES + 1  # a video frame keeps its CLS token


def make_hf_video_llava(seed: int = 0, text_layers: int = 3):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, initializer_range=0.1, initializer_factor=1.0)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=67, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1, pad_token_id=0)
    cfg = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                           video_token_index=VIDEO_TOKEN, image_seq_length=PATCHES,
                           video_seq_length=FRAMES * FRAME_TOKENS)
    return for_parity(VideoLlavaForConditionalGeneration(cfg).eval())  # the two towers' biases differ


def video_prompts(seed: int = 1, padding: str = "left", image: bool = False):
    """Two prompts of different lengths, one 8-frame video each (and, with ``image``, an image before it in the
    first prompt), padded on the given side.

    Returns (input_ids int64[2, T], attention_mask int64[2, T], pixel_values_videos float32[2, 8, 3, 28, 28],
    pixel_values float32[1, 3, 28, 28] or None)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for b, (pre, post) in enumerate(((3, 7), (5, 2))):
        img = [IMAGE_TOKEN] * PATCHES + [7] if image and b == 0 else []
        seqs.append([1] + list(rng.integers(3, 140, pre)) + img + [VIDEO_TOKEN] * (FRAMES * FRAME_TOKENS)
                    + list(rng.integers(3, 140, post)))
    ids, am = pad_prompts(seqs, padding)
    videos = rng.normal(size=(2, FRAMES, 3, 28, 28)).astype(np.float32)
    videos[1] = np.abs(videos[1]) * 2
    pixels = rng.normal(size=(1, 3, 28, 28)).astype(np.float32) if image else None
    return ids, am, videos, pixels


def save_char_tokenizer(path):
    """A character-level tokenizer whose ids fit the tiny vocabulary (0 unk, 1 bos, 2 eos, printable ASCII from
    3), saved as a transformers fast tokenizer beside a checkpoint."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) < IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(path)
