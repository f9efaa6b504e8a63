"""Which visual tokens are letterbox padding, computed from the image geometry alone.

Axes: ``...`` a batch of image sizes, G grid side (24 for CLIP ViT-L/14 at 336 px), N = G * G tokens in raster
order. Masks are True for content, False for padding, so ``scores * mask`` suppresses the padding sink.

The released masks (intcomp/attention-bias@e75ebe7):

- ``generate_pad_mask`` (patches/FastV.patch L505-557; the same function in the HiMAP, PyramidDrop and TokenCarve
  patches): on the 336-px canvas the content spans [pad, 336 - pad] on the short axis, pad = (S - s) / (2S) * 336,
  centred continuously; a 14-px patch is padding iff 1 - overlap / 196 > tau (0.5 for FastV, HiMAP and
  TokenCarve, 0.01 for PyramidDrop). ``pad_mask_expand2square`` (geometry "continuous").
- SparseVLM (patches/SparseVLMs.patch, ``expand2square`` / ``process_images`` in llava/mm_utils.py): a 0/1 PIL
  "L" mask of the letterboxed image (content pasted at PIL's floored offset) resized to G x G with
  ``Image.BILINEAR``; a token is content iff the resized value >= 0.5. ``pad_mask_resized``.

Both are computed in exact integer arithmetic (int32), so no float rounding decides a patch. The release's float64
arithmetic breaks exact ties (padded fraction exactly tau) either way: at tau = 0.01 it does so for 128 (size,
patch) pairs with sides up to 4000 px (48 padding, 80 content, e.g. 400 x 333); at tau = 0.5 its ties all come out
content, as here. Here a tie is content (``1 - overlap / 196 > tau`` is false).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdebias import _checks

GEOMETRIES = ("continuous", "pil", "bilinear", "unpad")
_RESIZED_MAX_SIDE = 80_000  # pad_mask_resized's int32 long division needs its weight sums below 2**30


def _check_sizes(width, height, max_side=None):
    for name, v in (("width", width), ("height", height)):
        if _checks.is_concrete(v) and np.any(np.asarray(v) <= 0):
            raise ValueError(f"Image {name} must be positive (pixels), got {v!r}.")
        if max_side is not None and _checks.is_concrete(v) and np.any(np.asarray(v) > max_side):
            raise ValueError(f"Image {name} must be at most {max_side} px here, got {v!r}; downscale it first "
                             "(the mask depends on the aspect ratio only up to rounding).")


def _tau_fraction(tau) -> Fraction:
    """tau as an exact fraction p/q (q <= 10**4: 0.01 -> 1/100, the decimal the user wrote)."""
    if not _checks.is_concrete(tau) or np.ndim(tau) != 0:
        raise TypeError(f"tau must be a Python float (it is compared exactly, so it is static), got {tau!r}.")
    _checks.check_fraction("tau", tau)
    return Fraction(float(tau)).limit_denominator(10_000)


def _floor_mul_div(a, p: int, q: int):
    """floor(a * p / q) for int32 a >= 0 without forming a * p."""
    return (a // q) * p + ((a % q) * p) // q


def _short_axis_to_mask(w, h, is_content, grid: int):
    rows = jnp.where((w >= h)[..., None], is_content, True)  # wide image: padded rows (top/bottom)
    cols = jnp.where((w < h)[..., None], is_content, True)  # tall image: padded columns (left/right)
    return (rows[..., :, None] & cols[..., None, :]).reshape(*rows.shape[:-1], grid * grid)


def pad_mask_expand2square(width, height, *, grid: int = 24, canvas: int = 336, tau: float = 0.5,
                           geometry: str = "continuous"):
    """Content mask of LLaVA-1.5's ``expand2square`` letterbox.

    The image (W x H) sits on a square of side S = max(W, H); along the short side (s = min(W, H)) its content
    starts at an offset of (S - s) / 2 pixels. The square is cut into ``grid x grid`` patches (the padded fraction
    of a patch does not depend on the resize to ``canvas``); a patch is padding iff its padded area fraction is
    > tau. Exact: computed in int32 units of 1 / (2G) px and with tau as the fraction p/q nearest to it with
    q <= 10**4 (0.01 -> 1/100).

    Args:
      width, height: int or int[...] original image size in pixels (may be traced; sides up to 44M px).
      grid: static patch-grid side G.
      canvas: static square side the processor resizes to (must be a multiple of ``grid``).
      tau: static padding threshold in [0, 1].
      geometry: "continuous" (default): offset (S - s) / 2 unfloored, the released ``generate_pad_mask`` of
        intcomp/attention-bias@e75ebe7 (patches/FastV.patch L505-557); "pil": offset (S - s) // 2 as PIL's
        ``paste`` places the pixels (the project's earlier default); "bilinear": SparseVLM's resized mask,
        ``pad_mask_resized`` (only tau = 0.5, its fixed threshold); "unpad": the debias code's FastV ``before``
        mask (``unpad_mask``, patches/FastV.patch ~L605), built as LLaVA-NeXT unpads a feature grid: along the
        short side ``new = floor(G * s / S)`` patches and ``pad = (G - new) // 2``, patches [pad, G - pad) are
        content; no threshold (``tau`` is ignored).

    Returns:
      bool[..., G * G] in raster order, True = content.
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}.")
    grid = _checks.check_positive_int("grid", grid)
    canvas = _checks.check_positive_int("canvas", canvas)
    if canvas % grid:
        raise ValueError(f"canvas ({canvas}) must be a multiple of grid ({grid}): patches are canvas // grid px.")
    frac = _tau_fraction(tau)
    if geometry == "bilinear":
        if frac != Fraction(1, 2):
            raise ValueError(f"geometry 'bilinear' (SparseVLM's resized mask) thresholds the resized mask at 0.5 "
                             f"only; got tau={tau}. Use tau=0.5 or geometry 'continuous'.")
        return pad_mask_resized(width, height, grid=grid)
    _check_sizes(width, height)
    w = jnp.asarray(width, jnp.int32)
    h = jnp.asarray(height, jnp.int32)
    side = jnp.maximum(w, h)[..., None]
    short = jnp.minimum(w, h)[..., None]
    if geometry == "unpad":  # int(short * (G / side)) as the release computes it in floats, exactly for sides < 2**26
        pad = (grid - short * grid // side) // 2
        k = jnp.arange(grid, dtype=jnp.int32)
        return _short_axis_to_mask(w, h, (k >= pad) & (k < grid - pad), grid)
    # Units of 1 / (2G) px: patch k spans [2kS, 2(k+1)S], the content [lo, lo + 2G s].
    lo = grid * (side - short) if geometry == "continuous" else 2 * grid * ((side - short) // 2)
    k = jnp.arange(grid, dtype=jnp.int32)
    overlap = jnp.clip(jnp.minimum((k + 1) * 2 * side, lo + 2 * grid * short) - jnp.maximum(k * 2 * side, lo), 0)
    padded = 2 * side - overlap  # padded length of each patch, out of 2S
    is_content = padded <= _floor_mul_div(2 * side, frac.numerator, frac.denominator)  # [..., G] short axis
    return _short_axis_to_mask(w, h, is_content, grid)


_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2 bits of fixed point for 8-bit images
_CHUNK = 64  # window pixels per loop step


def pad_mask_resized(width, height, *, grid: int = 24):
    """SparseVLM's padding mask, as released with the debias paper (intcomp/attention-bias@e75ebe7:
    patches/SparseVLMs.patch, llava/mm_utils.py ``expand2square`` and ``process_images``): an "L" image of the
    letterboxed square (S = max(W, H)) that is 1 on the content (pasted at PIL's offset (S - s) // 2) and 0 on the
    padding, ``resize((G, G), Image.BILINEAR)``; a token is content iff the resized value >= 0.5.

    Pillow's 8-bit resampling is reproduced exactly in integers (Resample.c ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``): output y averages the pixels i of its window with triangle weights
    a_i = max(fs - |2G i + G - (2y + 1) S|, 0), fs = max(2S, 2G) (units of 1 / (2G) px), rounded to fixed point
    k_i = round(a_i / sum(a) * 2**22) half up; the output is (2**21 + sum over content i of k_i) >> 22, i.e.
    content iff sum over content i of k_i >= 2**21. The mask is constant along the long axis, so only the short
    axis is resampled (the other pass maps constant lines to themselves).

    Args:
      width, height: int or int[...] original image size in pixels (may be traced; sides up to 80,000 px).
      grid: static output side G.

    Returns:
      bool[..., G * G] in raster order, True = content.
    """
    grid = _checks.check_positive_int("grid", grid)
    _check_sizes(width, height, _RESIZED_MAX_SIDE)
    w = jnp.asarray(width, jnp.int32)
    h = jnp.asarray(height, jnp.int32)
    side = jnp.maximum(w, h)[..., None]
    short = jnp.minimum(w, h)[..., None]
    off = (side - short) // 2
    centre2 = (2 * jnp.arange(grid, dtype=jnp.int32) + 1) * side  # 2G * centre of output y, [..., G]
    fs = jnp.maximum(2 * side, 2 * grid)  # 2G * support
    lo = jnp.maximum((centre2 - fs + grid) // (2 * grid), 0)  # Pillow's xmin
    hi = jnp.minimum((centre2 + fs + grid) // (2 * grid), side)  # Pillow's xmin + xmax
    chunks = (jnp.max(hi - lo) + _CHUNK - 1) // _CHUNK
    step = jnp.arange(_CHUNK, dtype=jnp.int32)

    def window_sum(term):
        def body(carry):
            c, acc = carry
            i = lo[..., None] + c * _CHUNK + step  # [..., G, CHUNK]
            weight = jnp.maximum(fs[..., None] - jnp.abs(2 * grid * i + grid - centre2[..., None]), 0)
            return c + 1, acc + jnp.sum(jnp.where(i < hi[..., None], term(i, weight), 0), -1)

        return jax.lax.while_loop(lambda carry: carry[0] < chunks, body, (jnp.int32(0), jnp.zeros_like(lo)))[1]

    total = window_sum(lambda i, a: a)  # sum of the weights, < 2**30

    def fixed_point(i, a):  # round(a / total * 2**22) half up, by long division
        t = total[..., None]
        q = a // t
        r = a - q * t
        for _ in range(_PRECISION_BITS + 1):
            r = 2 * r
            bit = (r >= t).astype(jnp.int32)
            q, r = 2 * q + bit, r - bit * t
        inside = (i >= off[..., None]) & (i < (off + short)[..., None])
        return jnp.where(inside, (q + 1) >> 1, 0)

    is_content = window_sum(fixed_point) >= (1 << (_PRECISION_BITS - 1))
    return _short_axis_to_mask(w, h, is_content, grid)


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
