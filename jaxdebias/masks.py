"""Which visual tokens are letterbox padding, computed from the image geometry alone.

Axes: ``...`` a batch of image sizes, G grid side (24 for CLIP ViT-L/14 at 336 px), N = G * G tokens in raster
order. Masks are True for content, False for padding, so ``scores * mask`` suppresses the padding sink.

A patch is padding when the fraction of its area that lies on the padded canvas exceeds ``tau``
(0.5 in most published methods, 0.01 in PyramidDrop's debiased variant).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxdebias import _checks


def _check_sizes(width, height):
    for name, v in (("width", width), ("height", height)):
        if _checks.is_concrete(v) and np.any(np.asarray(v) <= 0):
            raise ValueError(f"Image {name} must be positive (pixels), got {v!r}.")


def _overlap(lo, hi, a, b):
    return jnp.clip(jnp.minimum(hi, b) - jnp.maximum(lo, a), 0, None)


def pad_mask_expand2square(width, height, *, grid: int = 24, canvas: int = 336, tau: float = 0.5):
    """Content mask of LLaVA-1.5's ``expand2square`` letterbox.

    The image (W x H) is pasted on a square of side S = max(W, H) at offset (S - min(W, H)) // 2 along its short
    side (as PIL ``paste`` in LLaVA's ``expand2square``), resized to ``canvas`` and cut into ``grid x grid``
    patches. The padded fraction of a patch is independent of the resize, so it is computed exactly in the
    original pixel units.

    Args:
      width, height: int or int[...] original image size in pixels (may be traced).
      grid: static patch-grid side G.
      canvas: static square side the processor resizes to (must be a multiple of ``grid``).
      tau: a patch is padding when its padded area fraction is > tau; tau in [0, 1].

    Returns:
      bool[..., G * G] in raster order, True = content.
    """
    grid = _checks.check_positive_int("grid", grid)
    canvas = _checks.check_positive_int("canvas", canvas)
    if canvas % grid:
        raise ValueError(f"canvas ({canvas}) must be a multiple of grid ({grid}): patches are canvas // grid px.")
    _checks.check_fraction("tau", tau)
    _check_sizes(width, height)
    w = jnp.asarray(width, jnp.int32)
    h = jnp.asarray(height, jnp.int32)
    side = jnp.maximum(w, h)
    short = jnp.minimum(w, h)
    offset = (side - short) // 2
    k = jnp.arange(grid, dtype=jnp.int32)
    # Everything scaled by `grid` so patch edges k * S / G become the integers k * S.
    s = side[..., None]
    content = _overlap(k * s, (k + 1) * s, offset[..., None] * grid, (offset + short)[..., None] * grid)
    is_content = (s - content).astype(jnp.float32) <= tau * s.astype(jnp.float32)  # [..., G] along short axis
    rows = jnp.where((w >= h)[..., None], is_content, True)  # wide image: padded rows (top/bottom)
    cols = jnp.where((w < h)[..., None], is_content, True)  # tall image: padded columns (left/right)
    return (rows[..., :, None] & cols[..., None, :]).reshape(*rows.shape[:-1], grid * grid)


class AnyresMask(NamedTuple):
    """LLaVA-NeXT token layout of one image: the base view, then the unpadded tile grid row by row, each row
    followed by one ``image_newline`` token.

    content: bool[L] True = content (base view tokens and newline tokens are always True).
    newline: bool[L] True at the newline tokens.
    base_tokens: number of base-view tokens (G * G) at the start.
    grid_shape: (rows, cols) of the unpadded tile grid, without the newline column.
    best_resolution: (height, width) chosen from the pinpoints.
    """

    content: np.ndarray
    newline: np.ndarray
    base_tokens: int
    grid_shape: tuple[int, int]
    best_resolution: tuple[int, int]


def _best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    return best


def pad_mask_anyres(width: int, height: int, *, grid_pinpoints, tile: int = 336, grid: int = 24,
                    tau: float = 0.5, newline: bool = True) -> AnyresMask:
    """Content mask of a LLaVA-NeXT "anyres" image, in the order the model lays out its tokens.

    Geometry (transformers' LlavaNext processor and ``pack_image_features``): the base view is the whole image
    squashed to ``tile x tile`` (no padding). For the tiles, the best resolution (th, tw) is picked from
    ``grid_pinpoints``; the image is resized to fit it keeping its aspect ratio (ceil on the scaled side) and
    centred with zero padding; the tiles' features form a (th / tile * G) x (tw / tile * G) grid, from which the
    model removes whole padding rows (or columns) with ``unpad_image``. The patches that survive at the border
    may still be partly padding; those with a padded fraction > tau are marked False here.

    The token count depends on the image size, so sizes are Python ints here (not traced).

    Args:
      width, height: original image size in pixels.
      grid_pinpoints: list of (height, width) resolutions, as in the model config.
      tile: tile side in pixels (the vision tower's image size); grid: patches per tile side.
      tau: padding threshold in [0, 1]; newline: whether the model appends ``image_newline`` per row.

    Returns:
      AnyresMask.
    """
    _checks.check_fraction("tau", tau)
    width, height = int(width), int(height)
    _check_sizes(width, height)
    if not grid_pinpoints:
        raise ValueError("grid_pinpoints is empty; pass the model config's image_grid_pinpoints.")
    th, tw = _best_resolution(height, width, grid_pinpoints)
    if th % tile or tw % tile:
        raise ValueError(f"Pinpoint {(th, tw)} is not a multiple of the tile size {tile}.")
    # Resized content size inside the best resolution (ceil on the scaled side, capped).
    sw, sh = tw / width, th / height
    if sw < sh:
        new_w, new_h = tw, min(math.ceil(height * sw), th)
    else:
        new_h, new_w = th, min(math.ceil(width * sh), tw)
    pad_y, pad_x = (th - new_h) // 2, (tw - new_w) // 2
    rows, cols = th // tile * grid, tw // tile * grid
    patch = tile / grid

    def frac(n, lo, size):
        k = np.arange(n)
        return np.clip(np.minimum((k + 1) * patch, lo + size) - np.maximum(k * patch, lo), 0, None) / patch

    content = (1.0 - np.outer(frac(rows, pad_y, new_h), frac(cols, pad_x, new_w))) <= tau
    # unpad_image, in feature units, exactly as the model does it.
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        cut = (rows - kept) // 2
        content = content[cut:rows - cut, :]
    else:
        kept = int(round(width * (rows / height), 7))
        cut = (cols - kept) // 2
        content = content[:, cut:cols - cut]
    grid_shape = content.shape
    nl = np.zeros_like(content)
    if newline:
        content = np.concatenate([content, np.ones((grid_shape[0], 1), bool)], axis=1)
        nl = np.concatenate([nl, np.ones((grid_shape[0], 1), bool)], axis=1)
    base = grid * grid
    return AnyresMask(
        content=np.concatenate([np.ones(base, bool), content.reshape(-1)]),
        newline=np.concatenate([np.zeros(base, bool), nl.reshape(-1)]),
        base_tokens=base,
        grid_shape=(int(grid_shape[0]), int(grid_shape[1])),
        best_resolution=(th, tw),
    )
