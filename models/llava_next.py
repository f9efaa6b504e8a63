"""LLaVA-NeXT (llava-v1.6, transformers ``LlavaNextForConditionalGeneration``) in Flax NNX: anyres tiles.

Axes: B batch, T prompt slots, I images, V views of an image (1 base view + tiles, a tile-count bucket), G patch-grid
side of one view, N visual slots of an image's span (a bucket), D text width.

An image becomes a base view (the whole image squashed to one tile) and tiles of its best resolution from
``image_grid_pinpoints``; each view goes through CLIP and the projector. The tiles' features form one grid, whose
padding rows (or columns) are cut (``unpad_image``), and one ``image_newline`` follows each of its rows. Token order:
base view (G * G, CLS dropped), then rows x (cols + 1). Same weights as transformers, same logits.

Static shapes. The token count of an image depends on its size; here each image's span is padded to the slot count
of its tile-count bucket (``LlavaNextConfig.slots``): the first tokens are the image's, the rest are placeholder
slots with attention mask 0 (``expand_prompt`` inserts them into a processor's prompt). Positions come from the
mask, so the padded slots change nothing, and one program serves every image of a bucket.

Sizes: ``image_sizes`` here are (width, height), as everywhere in this package; transformers' LlavaNext takes
(height, width).

    model = LlavaNext(cfg, rngs=nnx.Rngs(0))                 # or jaxdebias.convert.load(...) / from_hf(...)
    images = model.images(pixel_values, [(w, h)])            # pixel_values float[I, V', 3, S, S] (processor)
    ids, mask = expand_prompt(input_ids, attention_mask, images, model.cfg)
    out = model(ids, images, mask)                           # out.logits float32[B, T, V]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models.clip import ClipVisionConfig
from jaxdebias.models.family import ImageViews
from jaxdebias.models.llama import LlamaConfig
from jaxdebias.models.llava import Llava, LlavaConfig, hf_config_dict

NEWLINE, EMPTY = -1, -2  # ``AnyresImages.source`` codes: an image_newline token, a padded (masked) slot


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    grid_pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

    @classmethod
    def llava_v1_6_mistral_7b(cls, dtype=jnp.bfloat16) -> LlavaNextConfig:
        """llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14-336 + Mistral-7B-Instruct-v0.2 (GQA 32/8)."""
        text = LlamaConfig(vocab_size=32064, intermediate_size=14336, num_kv_heads=8, rope_theta=1e6,
                           max_position_embeddings=32768, sliding_window=None, dtype=dtype, param_dtype=dtype)
        return cls(ClipVisionConfig(dtype=dtype, param_dtype=dtype), text)

    @classmethod
    def llava_v1_6_vicuna_7b(cls, dtype=jnp.bfloat16) -> LlavaNextConfig:
        """llava-hf/llava-v1.6-vicuna-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B-v1.5."""
        return cls(ClipVisionConfig(dtype=dtype, param_dtype=dtype),
                   LlamaConfig.llama2_7b(vocab_size=32064, dtype=dtype, param_dtype=dtype))

    @classmethod
    def from_hf_config(cls, hf, dtype=jnp.float32) -> LlavaNextConfig:
        """From a transformers LlavaNextConfig, its dict, or a path to a config.json / checkpoint directory."""
        d = hf_config_dict(hf, "llava_next", "LLaVA-NeXT")
        if d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy 'full' is not supported: the anyres "
                             "layout here drops CLS from every view ('default', as llava-v1.6 does).")
        base = LlavaConfig.from_hf_config({**d, "model_type": "llava"}, dtype=dtype)
        pinpoints = tuple((int(h), int(w)) for h, w in d.get("image_grid_pinpoints") or cls.grid_pinpoints)
        tile = base.vision.image_size
        if any(h % tile or w % tile for h, w in pinpoints):
            raise ValueError(f"image_grid_pinpoints {pinpoints} must be multiples of the tower's image_size {tile}.")
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)},
                   grid_pinpoints=pinpoints)

    @property
    def tile_buckets(self) -> tuple[int, ...]:
        """The tile counts of the pinpoints, ascending: one compiled program per bucket."""
        t = self.vision.image_size
        return tuple(sorted({(h // t) * (w // t) for h, w in self.grid_pinpoints}))

    def slots(self, tiles: int) -> int:
        """N: the visual slots of an image span for a tile-count bucket (base view + the largest unpadded grid of
        a pinpoint with at most that many tiles, with its newlines)."""
        t, g = self.vision.image_size, self.vision.grid
        fits = [(h // t * g) * (w // t * g + 1) for h, w in self.grid_pinpoints if (h // t) * (w // t) <= tiles]
        return g * g + max(fits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AnyresImages:
    """Images with their anyres token layout (built on the host by ``LlavaNext.images``).

    pixels float[I, V, 3, S, S] (view 0 the base view; views past an image's tiles are zeros, never read);
    sizes int[I, 2] (width, height); over each image's N span slots: source int[I, N] (index into the image's
    V * G * G view features, ``NEWLINE`` or ``EMPTY``), view int[I, N] (0 base view, 1 tile grid, -1 newline or
    empty), local int[I, N] (index within the view's raster: base view y * G + x, tile grid r * cols + c, 0
    elsewhere), content bool[I, N] (``jd.pad_mask_anyres`` at ``tau``: True for content tokens, False for padding
    patches, newlines and empty slots); tau: the padding threshold of ``content`` (static)."""

    pixels: jax.Array
    sizes: jax.Array
    source: jax.Array
    view: jax.Array
    local: jax.Array
    content: jax.Array
    tau: float = dataclasses.field(default=0.5, metadata={"static": True})
    base: int = dataclasses.field(default=576, metadata={"static": True})  # G * G tokens of the base view

    @property
    def num_slots(self) -> int:
        return self.source.shape[1]

    @property
    def slot_kind(self) -> jax.Array:
        """int[I, N]: each slot's first source (a view feature index >= 0, ``NEWLINE`` or ``EMPTY``)."""
        return self.source if self.source.ndim == 2 else self.source[..., 0]

    @property
    def view_sizes(self) -> tuple[int, int]:
        """Static raster lengths of the two views: base G * G, the tile grid at most N - G * G."""
        return self.base, self.num_slots - self.base


def image_layout(cfg: LlavaNextConfig, width: int, height: int, slots: int, tau: float):
    """One image's span (numpy, length ``slots``): (source, view, local, content) as in ``AnyresImages``."""
    g, tile = cfg.vision.grid, cfg.vision.image_size
    m = jd.pad_mask_anyres(width, height, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints], tile=tile, grid=g,
                           tau=tau)
    th, tw = m.best_resolution
    tiles_x = tw // tile
    rows, cols = m.grid_shape
    r0, c0 = (th // tile * g - rows) // 2, (tw // tile * g - cols) // 2  # unpad_image cuts both sides equally
    y, x = np.meshgrid(np.arange(rows) + r0, np.arange(cols) + c0, indexing="ij")
    grid_src = (1 + (y // g) * tiles_x + x // g) * g * g + (y % g) * g + (x % g)  # [rows, cols]
    n = g * g + rows * (cols + 1)
    if n > slots:
        raise ValueError(f"Image {width}x{height} needs {n} visual slots, more than the {slots} of its bucket.")
    src = np.full(slots, EMPTY, np.int32)
    view = np.full(slots, -1, np.int32)
    local = np.zeros(slots, np.int32)
    src[:g * g], view[:g * g], local[:g * g] = np.arange(g * g), 0, np.arange(g * g)
    body = np.concatenate([grid_src, np.full((rows, 1), NEWLINE)], 1).reshape(-1)
    src[g * g:n] = body
    view[g * g:n] = np.where(body >= 0, 1, -1)
    local[g * g:n] = np.concatenate([np.arange(rows * cols).reshape(rows, cols), np.zeros((rows, 1), int)],
                                    1).reshape(-1)
    content = np.zeros(slots, bool)
    content[:n] = m.content & ~m.newline
    return src, view, local, content


class LlavaNext(Llava):
    """LLaVA-1.5's pieces (CLIP tower, projector, decoder, decode) plus the anyres image block and
    ``image_newline``. Takes ``AnyresImages`` where LLaVA-1.5 takes pixel values."""

    model_type = "llava_next"

    def __init__(self, cfg: LlavaNextConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        d = cfg.text.hidden_size
        self.image_newline = nnx.Param(nnx.initializers.normal(d ** -0.5)(rngs.params(), (d,), cfg.text.param_dtype))

    def images(self, pixel_values, sizes, *, tau: float = 0.5, tiles: int | None = None) -> AnyresImages:
        """Host-side layout of a list of images. pixel_values float[I, V', 3, S, S] (the processor's views, zero
        views padded at the end) or a list of [V_i, 3, S, S]; sizes: I (width, height) pairs; tiles: the
        tile-count bucket (default: the smallest holding every image)."""
        views, sizes, bucket = self.tile_views(pixel_values, sizes, tiles)
        parts = [image_layout(self.cfg, int(w), int(h), self.cfg.slots(bucket), tau) for w, h in sizes]
        return AnyresImages(jnp.asarray(views), jnp.asarray(sizes, jnp.int32),
                            *(jnp.asarray(np.stack(p)) for p in zip(*parts)), tau=float(tau),
                            base=self.cfg.vision.grid ** 2)

    def tile_views(self, pixel_values, sizes, tiles: int | None = None):
        """The checked views of a list of images padded to one tile-count bucket: (float32[I, 1 + bucket, 3, S, S],
        sizes int64[I, 2] (width, height), bucket)."""
        cfg = self.cfg
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
        need = [jd.pad_mask_anyres(int(w), int(h), grid_pinpoints=[list(p) for p in cfg.grid_pinpoints],
                                   tile=cfg.vision.image_size, grid=cfg.vision.grid).best_resolution for w, h in sizes]
        counts = [(h // cfg.vision.image_size) * (w // cfg.vision.image_size) for h, w in need]
        bucket = tiles if tiles is not None else min(b for b in cfg.tile_buckets if b >= max(counts))
        if bucket < max(counts) or bucket not in cfg.tile_buckets:
            raise ValueError(f"tiles={tiles} is not a tile bucket of this model ({cfg.tile_buckets}) holding "
                             f"{max(counts)} tiles.")
        views = []
        for i, px in enumerate(pixel_values):
            px = np.asarray(px, np.float32)
            if px.ndim != 4 or px.shape[1:] != (cfg.vision.num_channels,) + (cfg.vision.image_size,) * 2:
                raise ValueError(f"Image {i}: views must be float[V, {cfg.vision.num_channels}, "
                                 f"{cfg.vision.image_size}, {cfg.vision.image_size}] (base view + tiles), got "
                                 f"{px.shape}.")
            if px.shape[0] < 1 + counts[i]:
                raise ValueError(f"Image {i} ({sizes[i][0]}x{sizes[i][1]}) has {counts[i]} tiles + a base view, but "
                                 f"only {px.shape[0]} views were given. Pass the processor's pixel_values.")
            out = np.zeros((1 + bucket,) + px.shape[1:], np.float32)
            out[:1 + counts[i]] = px[:1 + counts[i]]
            views.append(out)
        if len(views) != len(sizes):
            raise ValueError(f"{len(views)} images but {len(sizes)} sizes: give one (width, height) per image.")
        return np.stack(views), sizes, bucket

    def image_features(self, images: AnyresImages):
        """The span features float[I, N, D] of each image: base view, unpadded tile rows each + newline, and
        zeros on the empty slots."""
        if not isinstance(images, AnyresImages):
            raise TypeError("LLaVA-NeXT takes AnyresImages (model.images(pixel_values, sizes)), not raw pixels.")
        px = images.pixels
        I, V = px.shape[:2]
        feats = self.vision_tower(px.reshape((I * V,) + px.shape[2:])).astype(self.cfg.text.dtype)
        feats = self.multi_modal_projector(feats).reshape(I, -1, self.cfg.text.hidden_size)  # [I, V*G*G, D]
        picked = jnp.take_along_axis(feats, jnp.clip(images.source, 0)[..., None], axis=1)
        newline = self.image_newline[...].astype(feats.dtype)
        out = jnp.where((images.source == NEWLINE)[..., None], newline, picked)
        return jnp.where((images.source == EMPTY)[..., None], 0, out)

    def check_inputs(self, input_ids, images, attention_mask=None):
        if images is not None and not isinstance(images, AnyresImages):
            raise TypeError("LLaVA-NeXT takes AnyresImages (model.images(pixel_values, sizes)), not raw pixels.")
        if jnp.ndim(input_ids) != 2:
            raise ValueError(f"input_ids must be int[B, T], got shape {jnp.shape(input_ids)}.")
        window = self.cfg.text.sliding_window
        if window is not None and jnp.shape(input_ids)[1] > window:
            raise ValueError(f"The prompt has {jnp.shape(input_ids)[1]} slots, past the decoder's sliding window "
                             f"({window}); this port runs full attention only. Shorten the prompt.")
        if isinstance(input_ids, jax.core.Tracer):
            return
        n_tok = int(np.sum(np.asarray(input_ids) == self.cfg.image_token_id))
        per = 0 if images is None else images.num_slots
        n_img = 0 if images is None else images.source.shape[0]
        if n_tok != n_img * per:
            raise ValueError(f"input_ids hold {n_tok} image slots (id {self.cfg.image_token_id}) but {n_img} "
                             f"image(s) have {per} slots each (their tile bucket). Use expand_prompt to pad each "
                             "image's placeholders to its bucket.")

    def num_visual(self, images) -> int:
        """N, the static visual slots of one image span."""
        return images.num_slots

    def var_span(self, images) -> int:
        """Every image has at least its base view's tokens (the span's empty slots are not real)."""
        return self.cfg.vision.num_features

    def visual_capacity(self) -> int:
        """The most visual tokens a pruning stage can keep from every image (what ``--keep`` is checked against):
        base view + the largest grid of the smallest tile bucket (1728 for llava-v1.6). A larger static budget
        would not fit the span of an image in that bucket; the largest image has ``max_content_tokens()``."""
        t, g = self.cfg.vision.image_size, self.cfg.vision.grid
        least = min(self.cfg.tile_buckets)
        return g * g + max((h // t * g) * (w // t * g) for h, w in self.cfg.grid_pinpoints
                           if (h // t) * (w // t) <= least)

    def max_content_tokens(self) -> int:
        """The most content tokens one image can have: base view + the largest tile grid, newlines excluded
        (2880 for llava-v1.6)."""
        t, g = self.cfg.vision.image_size, self.cfg.vision.grid
        return g * g + max((h // t * g) * (w // t * g) for h, w in self.cfg.grid_pinpoints)

    def at_tau(self, images: AnyresImages, tau: float) -> AnyresImages:
        """The same images with their content mask at ``tau`` (recomputed on the host when it differs)."""
        if abs(images.tau - tau) <= 1e-12:
            return images
        sizes = np.asarray(images.sizes)
        parts = [image_layout(self.cfg, int(w), int(h), images.num_slots, tau) for w, h in sizes]
        return dataclasses.replace(images, content=jnp.asarray(np.stack([p[3] for p in parts])), tau=float(tau))

    def padding_content(self, images: AnyresImages, image_sizes, tau: float, geometry: str):
        """The anyres content mask built with the images (``jd.pad_mask_anyres``; its own geometry)."""
        if abs(images.tau - tau) > 1e-12:
            raise ValueError(f"The images' padding mask was built at tau={images.tau}, the pruning spec asks for "
                             f"tau={tau}: build them with model.images(..., tau={tau}).")
        return images.content

    def image_views(self, images: AnyresImages):
        """The base view and the tile grid as two views; newlines and empty slots are never kept."""
        return ImageViews((images.view, images.local), images.view_sizes, images.view >= 0)


def image_tokens(images: AnyresImages) -> np.ndarray:
    """int[I]: the tokens each image really has (transformers' placeholder count), the rest of N are empty."""
    return np.asarray(jnp.sum(images.slot_kind != EMPTY, axis=1))


def expand_prompt(input_ids, attention_mask, images: AnyresImages, cfg: LlavaNextConfig, pad_id: int | None = None):
    """A processor's prompt (each image's placeholders expanded to its real token count, one image per sample
    here) -> the prompt with each image span padded to N slots (masked placeholders after the real ones).
    Returns numpy (input_ids int[B, T'], attention_mask int[B, T'])."""
    ids, am = np.asarray(input_ids), np.asarray(attention_mask)
    counts, N = image_tokens(images), images.num_slots
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    rows, masks = [], []
    for b in range(len(ids)):
        where = np.nonzero(ids[b] == cfg.image_token_id)[0]
        if len(where) != counts[b]:
            raise ValueError(f"Sample {b} holds {len(where)} image placeholders; its image ({images.sizes[b][0]}x"
                             f"{images.sizes[b][1]}) has {counts[b]} tokens. Expand <image> as the processor does.")
        end = where[-1] + 1
        extra = N - counts[b]
        rows.append(np.concatenate([ids[b, :end], np.full(extra, cfg.image_token_id), ids[b, end:]]))
        masks.append(np.concatenate([am[b, :end], np.zeros(extra, am.dtype), am[b, end:]]))
    T = max(map(len, rows))
    out_ids = np.stack([np.pad(r, (0, T - len(r)), constant_values=pad_id) for r in rows])
    out_am = np.stack([np.pad(m, (0, T - len(m))) for m in masks])
    return out_ids, out_am
