"""Video-LLaVA in Flax NNX: an image and a video CLIP tower, one shared 2-layer GELU projector, a Llama decoder.

Axes: B batch, T prompt slots, I images, V videos, F frames per video, P patches per frame, D text width,
V vocab (in logits), H heads, Q rows.

Usage::

    model = VideoLlava(VideoLlavaConfig.from_hf_config(path), rngs=nnx.Rngs(0))    # or jaxdebias.convert.load
    out = model(input_ids, videos=pixel_values_videos, attention_mask=mask)      # logits float32[B, T, V]

As transformers' ``VideoLlavaForConditionalGeneration``: images (``pixel_values`` float[I, 3, S, S]) run the
image tower and drop CLS under "default" (P tokens each); videos (``pixel_values_videos`` float[V, F, 3, S, S])
run the video tower over every frame and keep every frame's CLS token (F x (P + 1) tokens each, CLS first in a
frame). Both go through the same projector and are written, in order, at their own placeholders:
``image_token_id`` and ``video_token_id``. Images are written before videos; the offsets are never assumed.

For pruning and generation (``jaxdebias.models.generate``) the model offers one visual span per prompt: the video
(or, in a prompt without video tokens, the image): ``visual_token_id`` and ``n_visual`` say which, and
``frame_layout`` how it splits into frames (for per-frame debiasing). ``embed`` takes the pixels either as an
image array (rank 4), a video array (rank 5) or an (images, videos) pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdebias.models.clip import ClipVisionConfig, ClipVisionTower
from jaxdebias.models.family import ImageViews, LlavaFamily
from jaxdebias.models.interventions import TriangleMix, VarSpec
from jaxdebias.models.layers import Output, Taps
from jaxdebias.models.llama import LlamaConfig, LlamaModel
from jaxdebias.models.llava import Projector, hf_config_dict


FRAME_TRENDS = ("frame", "video")


@dataclasses.dataclass(frozen=True)
class VideoLlavaConfig:
    """``vision``: the towers' CLIP config (both towers share it; the image tower's select strategy is the
    model's ``vision_feature_select_strategy``, the video tower always keeps CLS); ``frames``: frames per video
    (8 in the release; the processor samples them uniformly); ``frame_trend``: how the debias plug-in's
    positional trend runs over a video: "frame" (within each frame's raster; the index restarts at each frame)
    or "video" (one index over all frames). The paper does not say which its Video-LLaVA numbers use, and its
    released curves are fitted on LLaVA-1.5's 576-token grid only; "frame" is our default because the recency
    trend the curves describe is a raster trend within one CLIP view."""

    vision: ClipVisionConfig = ClipVisionConfig(image_size=224)
    text: LlamaConfig = LlamaConfig(vocab_size=32064)
    image_token_id: int = 32000
    video_token_id: int = 32001
    frames: int = 8
    projector_bias: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 2
    frame_trend: str = "frame"

    def __post_init__(self):
        if self.frame_trend not in FRAME_TRENDS:
            raise ValueError(f"frame_trend must be one of {FRAME_TRENDS}, got {self.frame_trend!r}: 'frame' fits the "
                             "positional trend within each frame's raster, 'video' across all frames.")

    @property
    def video(self) -> ClipVisionConfig:
        """The video tower's view of the vision config: every frame keeps its CLS token."""
        return dataclasses.replace(self.vision, select_strategy="full")

    @property
    def frame_tokens(self) -> int:
        """Visual tokens per frame: P patches + CLS (257 for CLIP ViT-L/14 at 224)."""
        return self.video.num_features

    @property
    def video_tokens(self) -> int:
        """Visual tokens per video: frames x (P + 1) (8 x 257 = 2056 in the release)."""
        return self.frames * self.frame_tokens

    @classmethod
    def video_llava_7b(cls, dtype=jnp.bfloat16) -> VideoLlavaConfig:
        """LanguageBind/Video-LLaVA-7B-hf's shapes: LanguageBind image/video towers (CLIP ViT-L/14 at 224) +
        Vicuna-7B-v1.5. The vocabulary (32000 + <image>, <video>, padded to a multiple of 64 = 32064) is our reading
        of transformers' conversion script, not checked against the Hub file; loading a checkpoint reads the real
        value from its config.json (``from_hf_config``)."""
        return cls(ClipVisionConfig(image_size=224, dtype=dtype, param_dtype=dtype),
                   LlamaConfig.llama2_7b(vocab_size=32064, dtype=dtype, param_dtype=dtype))

    @classmethod
    def from_hf_config(cls, hf, dtype=jnp.float32, frames: int = 8) -> VideoLlavaConfig:
        """From a transformers VideoLlavaConfig, its dict, or a path to a config.json / checkpoint directory.
        ``frames``: frames per video (the config does not store it; ``video_seq_length`` / 257 when present)."""
        d = hf_config_dict(hf, "video_llava", "Video-LLaVA")
        vision = ClipVisionConfig.from_hf_config(
            d["vision_config"], feature_layer=d.get("vision_feature_layer", -2),
            select_strategy=d.get("vision_feature_select_strategy", "default"), dtype=dtype, param_dtype=dtype)
        per_frame = vision.grid**2 + 1
        seq = d.get("video_seq_length")
        if seq is not None:
            if seq % per_frame:
                raise ValueError(f"video_seq_length {seq} is not a whole number of frames of {per_frame} tokens "
                                 f"({vision.grid}x{vision.grid} patches + CLS); check the config.")
            frames = seq // per_frame
        tc = d["text_config"]
        eos = tc.get("eos_token_id") or 2
        return cls(vision, LlamaConfig.from_hf_config(tc, dtype=dtype, param_dtype=dtype),
                   image_token_id=int(d.get("image_token_index", d.get("image_token_id", 32000))),
                   video_token_id=int(d.get("video_token_index", d.get("video_token_id", 32001))),
                   frames=int(frames), projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   pad_token_id=int(tc.get("pad_token_id") or d.get("pad_token_id") or 0),
                   eos_token_id=int(eos[0] if isinstance(eos, list) else eos))


def split_pixels(pixels):
    """(images float[I, 3, S, S] or None, videos float[V, F, 3, S, S] or None) from what ``embed`` takes: None,
    an image array, a video array or an (images, videos) pair."""
    if pixels is None:
        return None, None
    if isinstance(pixels, (tuple, list)):
        if len(pixels) != 2:
            raise ValueError("Pass pixels as (images or None, videos or None); got a sequence of "
                             f"{len(pixels)} items.")
        return pixels[0], pixels[1]
    rank = jnp.ndim(pixels)
    if rank == 4:
        return pixels, None
    if rank == 5:
        return None, pixels
    raise ValueError(f"Pixels must be images float[I, 3, S, S] or videos float[V, F, 3, S, S]; got shape "
                     f"{jnp.shape(pixels)}.")


class VideoLlava(LlavaFamily, nnx.Module):
    model_type = "video_llava"

    def __init__(self, cfg: VideoLlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_tower = ClipVisionTower(cfg.vision, rngs=rngs)
        self.video_tower = ClipVisionTower(cfg.video, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, rngs=rngs)
        self.language_model = LlamaModel(cfg.text, rngs=rngs)

    def image_features(self, pixel_values):
        """float[I, 3, S, S] -> float[I, P, D] (CLS dropped under "default")."""
        return self.multi_modal_projector(self.image_tower(jnp.asarray(pixel_values)).astype(self.cfg.text.dtype))

    def video_features(self, videos):
        """float[V, F, 3, S, S] -> float[V, F (P + 1), D]: each frame's CLS then its patches, frame by frame."""
        videos = jnp.asarray(videos)
        V, F = videos.shape[:2]
        frames = self.video_tower(videos.reshape(V * F, *videos.shape[2:])).astype(self.cfg.text.dtype)
        return self.multi_modal_projector(frames).reshape(V, F * frames.shape[1], -1)

    @staticmethod
    def _scatter(h, is_slot, feats):
        """h [B, T, D] with the rows of feats [N, P, D], in order, at the True slots of is_slot bool[B, T]."""
        flat = feats.reshape(-1, feats.shape[-1])
        order = jnp.clip(jnp.cumsum(is_slot.reshape(-1)) - 1, 0, flat.shape[0] - 1)
        merged = jnp.take(flat, order, axis=0).reshape(h.shape).astype(h.dtype)
        return jnp.where(is_slot[..., None], merged, h)

    def embed(self, input_ids, pixels=None):
        """Token embeddings with image and video features at their placeholders. Returns (h [B, T, D], the
        features of the visual span ``visual_token_id`` names (videos' [V, F (P + 1), D], else images') or None)."""
        ids = jnp.asarray(input_ids)
        cfg = self.cfg
        is_img, is_vid = ids == cfg.image_token_id, ids == cfg.video_token_id
        h = self.language_model.embed_tokens(jnp.where(is_img | is_vid, 0, ids))
        images, videos = split_pixels(pixels)
        feats = None
        if images is not None:
            feats = self.image_features(images)
            h = self._scatter(h, is_img, feats)
        if videos is not None:
            feats = self.video_features(videos)
            h = self._scatter(h, is_vid, feats)
        return h, feats

    # --- the one visual span that pruning, VAR and the debias plug-in work on -------------------------------
    def visual_token_id(self, pixels=None) -> int:
        """The placeholder of the pruned span: the video's when the prompt has a video, else the image's."""
        return self.cfg.image_token_id if split_pixels(pixels)[1] is None else self.cfg.video_token_id

    def n_visual(self, pixels=None) -> int:
        """Tokens of that span: frames x (P + 1) for a video (2056 in the release), P for an image (256)."""
        return self.cfg.vision.num_features if split_pixels(pixels)[1] is None else self.cfg.video_tokens

    def frame_layout(self, pixels=None) -> tuple[int, int]:
        """(frames, tokens per frame) of that span: (F, P + 1) for a video, (1, P) for an image."""
        if split_pixels(pixels)[1] is None:
            return 1, self.cfg.vision.num_features
        return self.cfg.frames, self.cfg.frame_tokens

    def visual_capacity(self) -> int:
        """The most visual tokens one prompt's pruned span has: a video's, frames x (P + 1)."""
        return self.cfg.video_tokens

    def num_visual(self, pixels=None) -> int:
        """The pruning interface's name for ``n_visual``."""
        return self.n_visual(pixels)

    def image_views(self, pixels=None):
        """((view int[B, N], local int[B, N]), static view sizes, None) for ``jd.debias_views``: with
        ``cfg.frame_trend == "frame"`` each frame is a view (the trend restarts at every frame's CLS; the online fit
        runs per frame), with "video" the whole span is one view (one trend over F x (P + 1) indices)."""
        images, videos = split_pixels(pixels)
        B = jnp.shape(images if videos is None else videos)[0]
        frames, per = self.frame_layout(pixels)
        i = jnp.broadcast_to(jnp.arange(frames * per, dtype=jnp.int32), (B, frames * per))
        if self.cfg.frame_trend == "video":
            return ImageViews((jnp.zeros_like(i), i), (frames * per,))
        return ImageViews((i // per, i % per), (per,) * frames)

    def at_tau(self, pixels, tau: float):
        raise ValueError("Video-LLaVA's processor resizes and centre-crops images and frames: there is no letterbox "
                         "padding to suppress. Debias with the positional curve only (pad_tau=None, --debias "
                         "curve).")

    def padding_content(self, pixels, image_sizes, tau: float, geometry: str):
        self.at_tau(pixels, tau)

    def with_frame_trend(self, trend: str) -> VideoLlava:
        """Sets how the positional trend is fitted over a video (``cfg.frame_trend``) and returns the model."""
        self.cfg = dataclasses.replace(self.cfg, frame_trend=trend)
        return self

    def check_inputs(self, input_ids, pixels, attention_mask=None):
        """Eager checks with clear messages (placeholder counts against the pixels given; skipped when traced)."""
        if jnp.ndim(input_ids) != 2:
            raise ValueError(f"input_ids must be int[B, T], got shape {jnp.shape(input_ids)}.")
        if attention_mask is not None and jnp.shape(attention_mask) != jnp.shape(input_ids):
            raise ValueError(f"attention_mask {jnp.shape(attention_mask)} must match input_ids "
                             f"{jnp.shape(input_ids)}.")
        images, videos = split_pixels(pixels)
        cfg = self.cfg
        if videos is not None and tuple(jnp.shape(videos)[1:3]) != (cfg.frames, cfg.vision.num_channels):
            raise ValueError(f"pixel_values_videos must be float[V, {cfg.frames}, {cfg.vision.num_channels}, "
                             f"{cfg.vision.image_size}, {cfg.vision.image_size}] ({cfg.frames} frames per video, "
                             f"as this checkpoint was trained); got {jnp.shape(videos)}. Sample {cfg.frames} "
                             "frames uniformly.")
        if isinstance(input_ids, jax.core.Tracer):
            return
        ids = np.asarray(input_ids)
        for name, token, arr, per in (("image", cfg.image_token_id, images, cfg.vision.num_features),
                                      ("video", cfg.video_token_id, videos, cfg.video_tokens)):
            n_tok = int(np.sum(ids == token))
            n_in = 0 if arr is None else int(jnp.shape(arr)[0])
            if n_tok != n_in * per:
                raise ValueError(f"input_ids hold {n_tok} {name} tokens (id {token}) but {n_in} {name}(s) give "
                                 f"{n_in * per} features ({per} each). Expand each <{name}> placeholder to one "
                                 "token per feature (the HF processor does this).")

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, *,
                 pixel_values_videos=None, taps: Taps = Taps(), var: VarSpec | None = None,
                 triangle: TriangleMix | None = None) -> Output:
        """Full forward. input_ids int[B, T]; pixel_values float[I, 3, S, S] (images, or a rank-5 video array);
        pixel_values_videos float[V, F, 3, S, S]; attention_mask [B, T] (1 = real token; left or right padding).
        Returns Output with logits float32[B, T, V], the requested taps, and ``image_features`` the features of
        the visual span (videos when given)."""
        pixels = pixel_values if pixel_values_videos is None else (pixel_values, pixel_values_videos)
        return self.forward(input_ids, pixels, attention_mask, position_ids, taps=taps, var=var, triangle=triangle)
