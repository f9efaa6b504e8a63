"""LLaVA-NeXT images on the command line: anyres preprocessing and batches padded to a tile-count bucket.

Axes: V views of an image (the base view, then the tiles row by row), S the tower's side (336), N visual slots of
an image span (its tile bucket's, ``LlavaNextConfig.slots``).

Preprocessing follows the llava-hf LLaVA-NeXT processor: the base view is the whole image resized to S x S
(bicubic, no letterbox); for the tiles the image is resized into its best pinpoint resolution keeping its aspect
ratio (the scaled side rounded up), centred on black (divmod padding) and cut into S x S tiles; every view is
scaled to [0, 1] and normalised. The prompt holds one placeholder per real token of the image (as the processor
expands ``<image>``); ``make_batch`` pads each span to its bucket with masked placeholders.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

import jaxdebias as jd
from jaxdebias.cli.inputs import LoadedModel, Request, build_prompt
from jaxdebias.models.generate import Batch
from jaxdebias.models.llava_next import LlavaNext, LlavaNextConfig, expand_prompt, image_layout


def pinpoint_tiles(cfg: LlavaNextConfig, width: int, height: int):
    """(best resolution (height, width), the content's resized (height, width) inside it)."""
    mask = jd.pad_mask_anyres(width, height, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints],
                              tile=cfg.vision.image_size, grid=cfg.vision.grid)
    th, tw = mask.best_resolution
    sw, sh = tw / width, th / height
    if sw < sh:
        return (th, tw), (min(math.ceil(height * sw), th), tw)
    return (th, tw), (th, min(math.ceil(width * sh), tw))


def preprocess(image: Image.Image, cfg: LlavaNextConfig, mean, std):
    """Returns (views float32[V, 3, S, S], the base view as a PIL image (for figures), (width, height), the
    image's real token count)."""
    side = cfg.vision.image_size
    width, height = image.size
    (th, tw), (nh, nw) = pinpoint_tiles(cfg, width, height)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    base = image.resize((side, side), Image.BICUBIC)
    tiles = [canvas.crop((x, y, x + side, y + side)) for y in range(0, th, side) for x in range(0, tw, side)]
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    views = np.stack([((np.asarray(v, np.float32) / 255.0 - m) / s).transpose(2, 0, 1) for v in [base] + tiles])
    mask = jd.pad_mask_anyres(width, height, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints], tile=side,
                              grid=cfg.vision.grid)
    return views, base, (width, height), int(mask.content.size)


def make_batch(model: LlavaNext, requests, pad_id: int) -> Batch:
    """Right-padded requests (``inputs.Request``: ids with the image's real placeholders, views, size) into a
    ``Batch`` whose images share one tile bucket and whose spans are padded to it (image_sizes (width, height))."""
    images = model.images([r.pixel_values for r in requests], [r.size for r in requests])
    length = max(len(r.input_ids) for r in requests)
    ids = np.full((len(requests), length), pad_id, np.int32)
    am = np.zeros((len(requests), length), np.int32)
    for b, r in enumerate(requests):
        ids[b, :len(r.input_ids)], am[b, :len(r.input_ids)] = r.input_ids, 1
    ids, am = expand_prompt(ids, am, images, model.cfg, pad_id)
    counts = np.asarray([np.sum(np.asarray(r.input_ids) == model.cfg.image_token_id) for r in requests])
    shift = images.num_slots - counts  # the instruction sits after the image: the padded slots push it on
    return Batch(ids, images, am.astype(bool), image_sizes=np.asarray([r.size for r in requests], np.int32),
                 instruction_pos=np.asarray([r.instruction_pos for r in requests], np.int32) + shift)


def content_mask(model: LlavaNext, size, tau: float = 0.5) -> np.ndarray:
    """bool[N] over the image's span in its own tile bucket: True = content (base view and unpadded tile
    patches), False for padding patches, newlines and the bucket's empty slots."""
    w, h = size
    mask = jd.pad_mask_anyres(w, h, grid_pinpoints=[list(p) for p in model.cfg.grid_pinpoints],
                              tile=model.cfg.vision.image_size, grid=model.cfg.vision.grid, tau=tau)
    tiles = (mask.best_resolution[0] // model.cfg.vision.image_size) * (
        mask.best_resolution[1] // model.cfg.vision.image_size)
    slots = model.cfg.slots(min(b for b in model.cfg.tile_buckets if b >= tiles))
    out = np.zeros(slots, bool)
    out[:mask.content.size] = mask.content & ~mask.newline
    return out


def view_sizes(model: LlavaNext) -> tuple[int, int]:
    """The static raster lengths a per-view calibration uses: the base view (G * G) and the largest tile grid."""
    g2 = model.cfg.vision.grid ** 2
    return g2, model.max_content_tokens() - g2


def image_views(model: LlavaNext, size, slots: int, tau: float = 0.5):
    """(view int[N], local int[N], content bool[N]) of one image laid out over ``slots`` span slots (the batch's
    N, at least its own bucket's), as ``AnyresImages`` holds them."""
    _, view, local, content = image_layout(model.cfg, int(size[0]), int(size[1]), slots, tau)
    return view, local, content


@dataclasses.dataclass
class NextLoadedModel(LoadedModel):
    """A LLaVA-NeXT checkpoint: anyres requests (base view + tiles), batches padded to a tile bucket, content
    masks over the image's span, one positional curve per view."""

    view_curves = True

    @property
    def keep_scope(self) -> str:
        return ("every LLaVA-NeXT image: its base view + the tile grid of the smallest tile bucket, newlines "
                "excluded, so that each image's span holds the budget")

    @property
    def span_sizes(self) -> tuple[int, ...]:
        return tuple(self.model.cfg.slots(b) for b in self.model.cfg.tile_buckets)

    @property
    def calibration_keep(self) -> int:
        return self.model.cfg.vision.grid ** 2  # any budget: only the first stage's scores are wanted

    @property
    def trend_length(self) -> int:
        return self.model.cfg.vision.grid ** 2  # the base view's raster (the tiles have their own curve)

    def content_mask(self, size, tau: float = 0.5) -> np.ndarray:
        return content_mask(self.model, size, tau)

    @property
    def view_sizes(self) -> tuple[int, int]:
        """The raster lengths of a per-view calibration (``view_sizes``)."""
        return view_sizes(self.model)

    def image_views(self, request: Request, slots: int, tau: float = 0.5):
        """(view, local, content) of a request's image over ``slots`` span slots (``image_views``)."""
        return image_views(self.model, request.size, slots, tau)

    def request(self, image, question: str) -> Request:
        """Base view + tiles; ``letterboxed`` holds the base view (for figures)."""
        pixels, base, size, count = preprocess(image, self.model.cfg, self.image_mean, self.image_std)
        ids, instruction = build_prompt(self.tokenizer, question, count)
        return Request(ids, pixels, size, instruction, base)

    def batch(self, requests: list[Request]) -> Batch:
        return make_batch(self.model, requests, self.tokenizer.pad)
