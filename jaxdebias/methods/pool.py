"""Average pooling, the spatial baseline token-pruning papers report beside the attention methods (ours: no
release).

Before the projector, the tower's G x G patch features are average-pooled to an r x c grid with r * c <= ``keep``
(the largest near-square grid: c = r or r + 1), with the bins of an adaptive average pool (bin i covers rows
floor(i G / r) .. ceil((i + 1) G / r) - 1, as ``torch.nn.functional.adaptive_avg_pool2d``): 64 -> 8 x 8 (3 x 3
patches each on LLaVA-1.5's 24 x 24), 128 -> 11 x 11, 192 -> 13 x 14, 144 -> 12 x 12 (2 x 2 each). The pooled
tokens, in raster order of the pooled grid, go through the projector and the decoder sees them at contiguous
positions; decoding continues from its caches. Nothing is scored, so debiasing does not apply.

``keep`` is the most pooled tokens the decoder receives.

Axes: B batch, N = G x G patches, K = r x c pooled tokens, D width.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxdebias.methods.base import Block, EncoderInputs, EncoderStage, Method, no_stages


def pooled_grid(keep: int) -> tuple[int, int]:
    """(rows, cols): the largest r x c <= keep with c in (r, r + 1)."""
    r = math.isqrt(keep)
    return (r, r + 1) if r * (r + 1) <= keep else (r, r)


def pool_matrix(grid: int, rows: int, cols: int) -> np.ndarray:
    """float32[rows * cols, grid * grid]: row k averages the patches of pooled cell k (adaptive pooling bins)."""
    def bins(size):
        return [(i * grid // size, -(-(i + 1) * grid // size)) for i in range(size)]

    out = np.zeros((rows * cols, grid * grid), np.float32)
    for i, (r0, r1) in enumerate(bins(rows)):
        for j, (c0, c1) in enumerate(bins(cols)):
            cell = np.zeros((grid, grid), np.float32)
            cell[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            out[i * cols + j] = cell.reshape(-1)
    return out


@dataclasses.dataclass(frozen=True)
class Pool(EncoderStage):
    """The patch grid average-pooled to ``rows`` x ``cols`` tokens (``size`` = rows * cols)."""

    rows: int = 1
    cols: int = 1

    def check(self, n: int, method: str) -> None:
        grid = math.isqrt(n)
        if grid * grid != n or self.rows > grid or self.cols > grid:
            raise ValueError(f"{method}: pools a square patch grid to {self.rows} x {self.cols}; the image has "
                             f"{n} tokens. Keep at most {n}.")

    def encode(self, inp: EncoderInputs) -> Block:
        feats = inp.tower(inp.pixels)  # [B, N, Dv]
        weights = jnp.asarray(pool_matrix(inp.grid, self.rows, self.cols))
        h = jnp.einsum("kn,bnd->bkd", weights, feats.astype(jnp.float32)).astype(feats.dtype)
        B, K = h.shape[:2]
        return Block(h, jnp.ones((B, K), bool), jnp.full((B, K), -1, jnp.int32))


def encoder(keep: int, n: int, options: dict) -> EncoderStage:
    rows, cols = pooled_grid(keep)
    return Pool(rows * cols, rows, cols)


METHOD = Method("pool", "ours (the usual spatial average-pooling baseline)", no_stages, encoder=encoder,
                budget="the most pooled tokens the decoder receives (the largest near-square grid)",
                positions="reindex", debias=False)
