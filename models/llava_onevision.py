"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration``) in Flax NNX: SigLIP, anyres-max, video.

Axes: B batch, T prompt slots, I images (or videos), V views of an image (1 base view + tiles, a tile-count bucket)
or frames of a video, G patch-grid side of one view (27), N visual slots of a span (a bucket), K interpolation
taps (4), D text width.

The pieces are LLaVA-NeXT's (``llava_next.py``) with a SigLIP tower (``siglip.py``: no CLS, every patch, the last
layer without post_layernorm), a Qwen2 decoder (``llama.py``'s qkv-bias variant) and OneVision's packing:

- Images, "anyres_max_9": the base view (the image squashed to S x S) and the tiles of its best pinpoint resolution
  go through the tower and the projector; the tiles' features form one grid whose padding rows (or columns) are cut
  (``unpad_image``); when that grid holds more than 1.1**2 x 9 views' worth of patches it is bilinearly downscaled
  by ``ratio = sqrt(rows * cols / (9 G^2))`` to ``(int(rows // ratio), int(cols // ratio))``; one ``image_newline``
  follows each row. Token order: base view (G * G), then rows x (cols + 1).
- Videos: each frame through the tower and the projector, each frame's G x G grid bilinearly pooled to
  ceil(G / 2) x ceil(G / 2) (14 x 14 at G = 27), frames in order, then one ``image_newline``. Placeholders are
  ``video_token_id``.

Both resamplings are torch's ``interpolate(mode="bilinear", align_corners=False)``, which reads at most 4 input
features per output. Here the host computes, per span slot, the 4 source indices and weights (``OnevisionVisual``);
the model gathers the projected features and sums. The span is padded to its bucket's slot count (images: the
tile-count bucket, ``LlavaOnevisionConfig.slots``; videos: frames x pooled grid + 1) with masked slots, so one
program serves every image of a bucket, as on LLaVA-NeXT.

Sizes: ``image_sizes`` here are (width, height), as everywhere in this package; transformers' OneVision takes
(height, width). One image per sample (transformers' multi-image samples skip anyres: not supported here).

    model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))            # or jaxdebias.convert.load(...) / from_hf(...)
    images = model.images(pixel_values, [(w, h)])            # pixel_values float[I, V', 3, S, S] (processor)
    ids, mask = expand_prompt(input_ids, attention_mask, images, model.cfg)
    out = model(ids, images, mask)                           # out.logits float32[B, T, V]
    video = model.videos(pixel_values_videos)                # float[I, F, 3, S, S]
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdebias.methods import Block, EncoderInputs
from jaxdebias.models import llava_next
from jaxdebias.models.family import ImageViews
from jaxdebias.models.llama import LlamaConfig
from jaxdebias.models.llava import hf_config_dict
from jaxdebias.models.llava_next import EMPTY, NEWLINE, LlavaNext, LlavaNextConfig
from jaxdebias.models.onevision_layout import OnevisionVisual, image_layout, video_layout
from jaxdebias.models.siglip import SiglipVisionConfig, SiglipVisionTower

PINPOINTS = tuple((h * 384, w * 384) for h in range(1, 7) for w in range(1, 7))  # transformers' default, in order

# transformers' Qwen2Config defaults: a checkpoint's text_config leaves out the values equal to them
QWEN2_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
                  "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "tie_word_embeddings": False, "use_sliding_window": False}


def _qwen2(dtype, **kw) -> LlamaConfig:
    base = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True, dtype=dtype,
                param_dtype=dtype)
    return LlamaConfig(**{**base, **kw})


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionConfig(LlavaNextConfig):
    vision: SiglipVisionConfig = SiglipVisionConfig()
    text: LlamaConfig = _qwen2(jnp.float32, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_layers=24, num_heads=14, num_kv_heads=2, tie_word_embeddings=True)
    image_token_id: int = 151646
    pad_token_id: int = 151643
    eos_token_id: int = 151645  # <|im_end|>
    grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS
    video_token_id: int = 151647
    max_tiles: int = 9  # vision_aspect_ratio "anyres_max_9": the tile grid is downscaled past ~9 views of patches

    @classmethod
    def onevision_qwen2_0_5b(cls, dtype=jnp.bfloat16) -> LlavaOnevisionConfig:
        """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP so400m (26 layers) + Qwen2-0.5B (GQA 14/2, tied)."""
        return cls(SiglipVisionConfig(dtype=dtype, param_dtype=dtype),
                   _qwen2(dtype, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                          num_heads=14, num_kv_heads=2, tie_word_embeddings=True))

    @classmethod
    def onevision_qwen2_7b(cls, dtype=jnp.bfloat16) -> LlavaOnevisionConfig:
        """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m (26 layers) + Qwen2-7B (GQA 28/4)."""
        return cls(SiglipVisionConfig(dtype=dtype, param_dtype=dtype),
                   _qwen2(dtype, vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28,
                          num_heads=28, num_kv_heads=4))

    @classmethod
    def from_hf_config(cls, hf, dtype=jnp.float32) -> LlavaOnevisionConfig:
        """From a transformers LlavaOnevisionConfig, its dict, or a path to a config.json / checkpoint directory.
        Keys a config.json leaves out take transformers' defaults."""
        d = hf_config_dict(hf, "llava_onevision", "LLaVA-OneVision")
        aspect = str(d.get("vision_aspect_ratio", "anyres_max_9"))
        if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_"):].isdigit():
            raise ValueError(f"vision_aspect_ratio {aspect!r}: this port runs 'anyres_max_<N>' packing.")
        vision = SiglipVisionConfig.from_hf_config(
            d.get("vision_config") or {}, feature_layer=d.get("vision_feature_layer", -1),
            select_strategy=d.get("vision_feature_select_strategy", "full"), dtype=dtype, param_dtype=dtype)
        tc = {**QWEN2_DEFAULTS, "model_type": "qwen2", **(d.get("text_config") or {})}
        text = LlamaConfig.from_hf_config(tc, dtype=dtype, param_dtype=dtype)
        pinpoints = tuple((int(h), int(w)) for h, w in d.get("image_grid_pinpoints") or PINPOINTS)
        tile = vision.image_size
        if any(h % tile or w % tile for h, w in pinpoints):
            raise ValueError(f"image_grid_pinpoints {pinpoints} must be multiples of the tower's image_size {tile}.")
        eos, pad = (next((x for x in (tc.get(k), d.get(k)) if x is not None), None)
                    for k in ("eos_token_id", "pad_token_id"))
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(vision, text, image_token_id=int(d.get("image_token_id", d.get("image_token_index", 151646))),
                   projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   pad_token_id=int(pad if pad is not None else 151643),
                   eos_token_id=int(eos if eos is not None else 151645), grid_pinpoints=pinpoints,
                   video_token_id=int(d.get("video_token_id", d.get("video_token_index", 151647))),
                   max_tiles=int(aspect[len("anyres_max_"):]))

    def packed(self, rows: int, cols: int, grid: int | None = None) -> tuple[int, int]:
        """The tile grid's (rows, cols) after the anyres_max downscale of an unpadded rows x cols grid (``grid``:
        the side of one view's features, the tower's by default)."""
        g = grid or self.vision.grid
        ratio = math.sqrt(rows * cols / (self.max_tiles * g ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def packed_shapes(self):
        """(tiles, rows, cols) of every packed tile grid an image can have: each pinpoint's grid with any number of
        rows or columns cut by unpad_image (never both), then downscaled."""
        t, g = self.vision.image_size, self.vision.grid
        for h, w in self.grid_pinpoints:
            R, C = h // t * g, w // t * g
            for shape in [(r, C) for r in range(1, R + 1)] + [(R, c) for c in range(1, C)]:
                yield (h // t) * (w // t), *self.packed(*shape)

    @functools.cached_property
    def _bucket_slots(self) -> dict[int, int]:
        longest = {}
        for k, r, c in self.packed_shapes():
            longest[k] = max(longest.get(k, 0), r * (c + 1))
        out, best, g = {}, 0, self.vision.grid
        for k in sorted(longest):
            best = max(best, longest[k])
            out[k] = g * g + best
        return out

    def slots(self, tiles: int) -> int:
        """N: the visual slots of an image span for a tile-count bucket: base view + the longest packed tile grid
        (with its newlines) of any image whose pinpoint has at most that many tiles."""
        return self._bucket_slots[tiles]

    @property
    def pooled(self) -> int:
        """Side of a video frame's pooled grid: ceil(G / 2) (14 at G = 27)."""
        return -(-self.vision.grid // 2)

    def video_slots(self, frames: int) -> int:
        """N of a video span: frames x pooled grid, then one newline."""
        return frames * self.pooled ** 2 + 1

    def merged_grid(self, kept: int) -> int:
        """The side of a view whose features an encoder stage cut to ``kept`` (iLLaVA: 361 -> 19): the release
        lays the kept tokens out as a square grid, so ``kept`` must be a square."""
        side = math.isqrt(kept)
        if kept < 1 or side * side != kept:
            raise ValueError(f"An encoder stage leaves {kept} tokens of each {self.vision.grid}x{self.vision.grid} "
                             "view; LLaVA-OneVision packs them as a square grid (as the release that merges in every view "
                             "does), so that must be a square (729 - 4 x 92 = 361 = 19^2). Choose vit_layers and vit_r to match.")
        return side


class LlavaOnevision(LlavaNext):
    """LLaVA-NeXT's model with a SigLIP tower, OneVision's anyres-max packing and its video path. Takes
    ``OnevisionVisual`` (``images`` or ``videos``)."""

    model_type = "llava_onevision"
    tower = SiglipVisionTower

    def images(self, pixel_values, sizes, *, tau: float = 0.5, tiles: int | None = None) -> OnevisionVisual:
        """Host-side layout of a list of images, one per sample. pixel_values float[I, V', 3, S, S] (the
        processor's views, zero views padded at the end) or a list of [V_i, 3, S, S]; sizes: I (width, height)
        pairs; tiles: the tile-count bucket (default: the smallest holding every image)."""
        views, sizes, bucket = self.tile_views(pixel_values, sizes, tiles)
        parts = [image_layout(self.cfg, int(w), int(h), self.cfg.slots(bucket), tau) for w, h in sizes]
        return self._visual(jnp.asarray(views), jnp.asarray(sizes, jnp.int32), parts, tau, video=False)

    def videos(self, pixel_values_videos) -> OnevisionVisual:
        """Host-side layout of videos, one per sample: float[I, F, 3, S, S] (the video processor's frames)."""
        cfg = self.cfg
        px = np.asarray(pixel_values_videos, np.float32)
        if px.ndim != 5 or px.shape[2:] != (cfg.vision.num_channels,) + (cfg.vision.image_size,) * 2:
            raise ValueError(f"Videos must be float[I, F, {cfg.vision.num_channels}, {cfg.vision.image_size}, "
                             f"{cfg.vision.image_size}] (the video processor's pixel_values_videos), got {px.shape}.")
        part = video_layout(cfg, px.shape[1])
        sizes = np.full((px.shape[0], 2), cfg.vision.image_size, np.int32)
        return self._visual(jnp.asarray(px), jnp.asarray(sizes), [part] * px.shape[0], 0.5, video=True)

    def _visual(self, pixels, sizes, parts, tau, *, video, grid=None):
        src, w, view, local, content = (jnp.asarray(np.stack(p)) for p in zip(*parts))
        g = grid or self.cfg.vision.grid
        return OnevisionVisual(pixels, sizes, src, view, local, content, tau=float(tau), base=0 if video else g * g,
                               weight=w, video=video, grid=g)

    def option_family(self, visual=None) -> str:
        """iLLaVA's release publishes other defaults for videos than for images."""
        return "llava_onevision_video" if getattr(visual, "video", False) else "llava_onevision"

    def for_encoder(self, visual: OnevisionVisual, encoder, method: str = "this method") -> OnevisionVisual:
        """The inputs with the layout of the views an encoder stage leaves (each view's kept tokens as a square
        grid, packed as OneVision packs a view: iLLaVA's release), over the stage's ``size`` slots."""
        kept = encoder.view_tokens(self.cfg.vision.num_features)
        if kept is None:
            raise ValueError(f"{method}'s encoder stage runs on one single-view image (it reads a CLS token or one "
                             "view's raster); LLaVA-OneVision has no CLS token and several views or frames. Choose a "
                             "method whose encoder stage merges in every view, or one that prunes inside the decoder.")
        g, slots = self.cfg.merged_grid(kept), encoder.size
        if visual.video:
            parts = [video_layout(self.cfg, visual.pixels.shape[1], slots, g)] * visual.pixels.shape[0]
        else:
            parts = [image_layout(self.cfg, int(w), int(h), slots, visual.tau, g) for w, h in np.asarray(visual.sizes)]
        return dataclasses.replace(visual, merged=self._visual(visual.pixels, visual.sizes, parts, visual.tau,
                                                               video=visual.video, grid=g))

    def encoder_stage(self, encoder, visual: OnevisionVisual, debias, limit, method: str):
        """An encoder stage in every view (or frame) on its own (iLLaVA's release on OneVision), the kept tokens
        packed by the merged layout ``for_encoder`` made. Returns (block over its slots, projected features, the
        merged layout)."""
        if visual.merged is None:
            raise ValueError(f"{method}'s encoder stage needs the inputs laid out for it: "
                             "model.for_encoder(visual, plan.encoder) (generate does this).")
        I, V = visual.pixels.shape[:2]
        views = visual.pixels.reshape((I * V,) + visual.pixels.shape[2:])
        n = self.cfg.vision.num_features
        ones = jnp.ones((I * V, n), bool)
        inputs = EncoderInputs(self.vision_tower, views, n, self.cfg.vision.grid, lambda raw: raw, ones, limit,
                               jnp.zeros((I * V,), jnp.uint32))
        block = encoder.encode(inputs)  # [I * V, kept] in raster order
        dtype = self.cfg.text.dtype
        feats = self.multi_modal_projector(block.h.astype(dtype)).astype(dtype)
        merged = visual.merged
        h = self.packed_features(feats.reshape(I, -1, feats.shape[-1]), merged)
        kind = merged.slot_kind
        span = jnp.broadcast_to(jnp.arange(merged.num_slots), kind.shape)
        return Block(h, kind != EMPTY, span), h, merged

    def image_features(self, visual: OnevisionVisual):
        """The span features float[I, N, D]: each slot's taps of the projected view (or frame) features, summed
        with their weights; ``image_newline`` on newline slots, zeros on empty ones."""
        if not isinstance(visual, OnevisionVisual):
            raise TypeError("LLaVA-OneVision takes OnevisionVisual (model.images(pixel_values, sizes) or "
                            "model.videos(pixel_values_videos)), not raw pixels.")
        px = visual.pixels
        I, V = px.shape[:2]
        feats = self.vision_tower(px.reshape((I * V,) + px.shape[2:])).astype(self.cfg.text.dtype)
        return self.packed_features(self.multi_modal_projector(feats).reshape(I, -1, self.cfg.text.hidden_size),
                                    visual)

    def packed_features(self, feats, visual: OnevisionVisual):
        """feats float[I, V * G * G, D] projected view features -> the span float[I, N, D] by the layout."""
        picked = jax.vmap(lambda f, s: f[s])(feats, jnp.clip(visual.source, 0))  # [I, N, K, D]
        out = jnp.einsum("inkd,ink->ind", picked, visual.weight.astype(picked.dtype))
        kind = visual.source[..., 0]
        out = jnp.where((kind == NEWLINE)[..., None], self.image_newline[...].astype(out.dtype), out)
        return jnp.where((kind == EMPTY)[..., None], 0, out)

    def visual_token_id(self, visual=None) -> int:
        return self.cfg.video_token_id if getattr(visual, "video", False) else self.cfg.image_token_id

    def check_inputs(self, input_ids, visual, attention_mask=None):
        if visual is not None and not isinstance(visual, OnevisionVisual):
            raise TypeError("LLaVA-OneVision takes OnevisionVisual (model.images(pixel_values, sizes) or "
                            "model.videos(pixel_values_videos)), not raw pixels.")
        if not self.check_prompt_shapes(input_ids, attention_mask):
            return
        ids = np.asarray(input_ids)
        vocab = self.cfg.text.vocab_size
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.size:
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab}) (e.g. {outside[0]}); an id past "
                             "the vocabulary embeds as NaN. Pad with the tokenizer's pad id.")
        token = self.visual_token_id(visual)
        other = self.cfg.image_token_id if token == self.cfg.video_token_id else self.cfg.video_token_id
        if np.any(ids == other):
            raise ValueError(f"input_ids hold placeholders of id {other}, but the visual input is "
                             f"{'a video' if token == self.cfg.video_token_id else 'images or nothing'}; one kind "
                             "per batch here.")
        n_tok, per = int(np.sum(ids == token)), 0 if visual is None else visual.num_slots
        n_in = 0 if visual is None else visual.source.shape[0]
        if n_tok != n_in * per:
            raise ValueError(f"input_ids hold {n_tok} placeholders (id {token}) but {n_in} input(s) have {per} slots "
                             "each (their bucket). Use expand_prompt to pad each span to its bucket.")

    def var_span(self, visual) -> int:
        """The fewest real visual tokens of a span: the base view's (images) or the pooled frames' (videos)."""
        return visual.num_slots - 1 if visual.video else self.cfg.vision.num_features

    def at_tau(self, visual: OnevisionVisual, tau: float) -> OnevisionVisual:
        if visual.video or abs(visual.tau - tau) <= 1e-12:
            return visual
        parts = [image_layout(self.cfg, int(w), int(h), visual.num_slots, tau) for w, h in np.asarray(visual.sizes)]
        return dataclasses.replace(visual, content=jnp.asarray(np.stack([p[4] for p in parts])), tau=float(tau))

    def padding_content(self, visual: OnevisionVisual, image_sizes, tau: float, geometry: str):
        if visual.video:
            return visual.content  # frames are squashed to S x S: no padding
        return super().padding_content(visual, image_sizes, tau, geometry)

    def image_views(self, visual: OnevisionVisual):
        """Images: the base view and the tile grid; a video: one view, its pooled frames in order. Newlines and
        empty slots are never kept."""
        if visual.video:
            frames = visual.pixels.shape[1]
            return ImageViews((visual.view, visual.local), (frames * (-(-visual.grid // 2)) ** 2,), visual.view >= 0)
        views = super().image_views(visual)
        if visual.grid != self.cfg.vision.grid:  # iLLaVA's merged views: the release's span counts newlines too
            return views._replace(selectable=visual.slot_kind != EMPTY)
        return views

    def max_content_tokens(self) -> int:
        """The most content tokens one image can have: base view + the longest packed tile grid, newlines
        excluded."""
        return self.cfg.vision.grid ** 2 + max(r * c for _, r, c in self.cfg.packed_shapes())


def expand_prompt(input_ids, attention_mask, visual: OnevisionVisual, cfg: LlavaOnevisionConfig,
                  pad_id: int | None = None):
    """A processor's prompt (each placeholder expanded to the input's real token count, one image or video per
    sample) -> the prompt with each span padded to N slots. Returns numpy (input_ids int[B, T'], attention_mask)."""
    token = cfg.video_token_id if visual.video else cfg.image_token_id
    return llava_next.expand_prompt(input_ids, attention_mask, visual, dataclasses.replace(cfg, image_token_id=token),
                                    pad_id=pad_id)
