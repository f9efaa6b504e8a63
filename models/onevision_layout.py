"""LLaVA-OneVision's token layouts, computed on the host (numpy): which projected view features each span slot
sums, with which bilinear weights (``OnevisionVisual``'s source / weight), and each slot's view, raster index and
content flag.

Axes: N span slots, K interpolation taps (4).

transformers packs an image's tile grid (unpad, then the anyres_max bilinear downscale) and pools video frames with
``interpolate(mode="bilinear", align_corners=False)``, which reads at most 2 x 2 inputs per output: each slot is
therefore a fixed weighted sum of at most K = 4 view features, and the model gathers and sums them (static shapes,
one program per bucket)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

import jaxdebias as jd
from jaxdebias.models.llava_next import EMPTY, NEWLINE, AnyresImages

TAPS = 4  # a bilinear resample reads at most 2 x 2 inputs per output


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OnevisionVisual(AnyresImages):
    """Images or videos with their OneVision token layout (built on the host by ``images`` / ``videos``).

    As ``AnyresImages``, except: source int[I, N, K] and weight float32[I, N, K]: each slot is the weighted sum of K
    projected view features (index into the I-th input's V * G * G features), or ``NEWLINE`` / ``EMPTY`` in every
    tap; video (static): frames instead of views, placeholders ``video_token_id``."""

    weight: jax.Array = None
    video: bool = dataclasses.field(default=False, metadata={"static": True})
    grid: int = dataclasses.field(default=27, metadata={"static": True})  # side of each view's features
    merged: Any = None  # ``for_encoder``: the layout of the views an encoder stage leaves (an OnevisionVisual)



def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) along one axis: (index int[n_out, 2], weight float32[n_out, 2])."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = (src - i0).astype(np.float32)
    return np.stack([i0, i1], 1), np.stack([1 - l1, l1], 1)


def resample_taps(rows: int, cols: int, out_rows: int, out_cols: int):
    """2-D bilinear taps of a rows x cols grid read at out_rows x out_cols: (index into the grid's raster
    int[out_rows, out_cols, 4], weight float32[out_rows, out_cols, 4])."""
    (yi, yw), (xi, xw) = bilinear_taps(rows, out_rows), bilinear_taps(cols, out_cols)
    index = yi[:, None, :, None] * cols + xi[None, :, None, :]  # [r, c, 2, 2]
    weight = yw[:, None, :, None] * xw[None, :, None, :]
    return index.reshape(out_rows, out_cols, TAPS), weight.reshape(out_rows, out_cols, TAPS).astype(np.float32)


def image_layout(cfg, width: int, height: int, slots: int, tau: float, grid: int | None = None):
    """One image's span (numpy, length ``slots``): (source [N, K], weight [N, K], view, local, content); ``grid``:
    the side of each view's features (the tower's, or what an encoder stage left)."""
    g, tile = grid or cfg.vision.grid, cfg.vision.image_size
    m = jd.pad_mask_anyres(width, height, grid_pinpoints=[list(p) for p in cfg.grid_pinpoints], tile=tile, grid=g,
                           tau=tau, newline=False)
    th, tw = m.best_resolution
    tiles_x = tw // tile
    rows, cols = m.grid_shape
    r0, c0 = (th // tile * g - rows) // 2, (tw // tile * g - cols) // 2  # unpad_image cuts both sides equally
    y, x = np.meshgrid(np.arange(rows) + r0, np.arange(cols) + c0, indexing="ij")
    grid_src = ((1 + (y // g) * tiles_x + x // g) * g * g + (y % g) * g + (x % g)).reshape(-1)  # unpadded raster
    pr, pc = cfg.packed(rows, cols, g)
    if (pr, pc) == (rows, cols):
        index = np.zeros((rows, cols, TAPS), np.int64)
        index[..., 0] = np.arange(rows * cols).reshape(rows, cols)
        weight = np.zeros((rows, cols, TAPS), np.float32)
        weight[..., 0] = 1
    else:
        index, weight = resample_taps(rows, cols, pr, pc)
    content_grid = (np.sum(m.content.reshape(-1)[index] * weight, -1) >= 0.5)  # a blended patch is content when
    n = g * g + pr * (pc + 1)                                                    # most of its weight is
    if n > slots:
        raise ValueError(f"Image {width}x{height} needs {n} visual slots, more than the {slots} of its bucket.")
    src = np.full((slots, TAPS), EMPTY, np.int32)
    w = np.zeros((slots, TAPS), np.float32)
    view = np.full(slots, -1, np.int32)
    local = np.zeros(slots, np.int32)
    src[:g * g] = np.arange(g * g)[:, None]
    w[:g * g, 0] = 1
    view[:g * g], local[:g * g] = 0, np.arange(g * g)
    body = np.concatenate([grid_src[index], np.full((pr, 1, TAPS), NEWLINE)], 1).reshape(-1, TAPS)
    src[g * g:n] = body
    w[g * g:n] = np.concatenate([weight, np.zeros((pr, 1, TAPS), np.float32)], 1).reshape(-1, TAPS)
    is_feat = body[:, 0] >= 0
    view[g * g:n] = np.where(is_feat, 1, -1)
    local[g * g:n] = np.concatenate([np.arange(pr * pc).reshape(pr, pc), np.zeros((pr, 1), int)], 1).reshape(-1)
    content = np.zeros(slots, bool)
    content[:g * g] = True  # the base view is squashed, never letterboxed
    content[g * g:n] = np.concatenate([content_grid, np.zeros((pr, 1), bool)], 1).reshape(-1)
    return src, w, view, local, content


def video_layout(cfg, frames: int, slots: int | None = None, grid: int | None = None):
    """A video's span (numpy): (source [N, K], weight [N, K], view, local, content), N = ``slots`` (default
    ``video_slots``); ``grid``: the side of each frame's features (the tower's, or what an encoder stage left)."""
    g = grid or cfg.vision.grid
    p = -(-g // 2)
    index, weight = resample_taps(g, g, p, p)  # [p, p, K] into one frame's G * G raster
    n = frames * p * p
    slots = n + 1 if slots is None else slots
    if n + 1 > slots:
        raise ValueError(f"A {frames}-frame video needs {n + 1} visual slots, more than the {slots} given.")
    src = np.full((slots, TAPS), EMPTY, np.int32)
    src[:n] = (np.arange(frames)[:, None, None, None] * g * g + index[None]).reshape(-1, TAPS)
    src[n] = NEWLINE
    w = np.zeros((slots, TAPS), np.float32)
    w[:n] = np.broadcast_to(weight[None], (frames,) + weight.shape).reshape(-1, TAPS)
    view = np.where(np.arange(slots) < n, 0, -1).astype(np.int32)
    local = np.where(np.arange(slots) < n, np.arange(slots), 0).astype(np.int32)
    return src, w, view, local, view >= 0
