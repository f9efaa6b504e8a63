"""SparseVLM v1.5 (Gumpest/SparseVLMs@734d900:llava/model/language_model/) on LLaVA-1.5.

Text raters (``jaxdebias.scores.text_raters``, the "raters" query) vote with the attention of layers 2, 6 and 15
themselves ("self"); each of those layers runs on the current set and its *output* keeps min(list[stage], n_v - 1)
tokens: 300/200/110 (budget 192), 303/110/36 (128), 66/30/17 (64); other budgets scale the 128 list (ours). Of
the p pruned tokens the int(0.3 p) + 1 best by *raw* score are grouped by DPC-kNN into int(m / 10) + 1 merged
tokens that follow the kept ones (``RecycleStage``). Positions are re-indexed; decoding continues from the pruned
caches (the new token's position is the layer's cache length, as released). Padding: the bilinearly resized
mask at 0.5, a candidate still.

``keep`` is the budget whose released list is used (64 / 128 / 192), else the 128 list scaled.

Axes: B batch, M tokens of the stage's span, R recycled tokens, C clusters, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdebias.methods.base import Block, Method, Stage, StageInputs
from jaxdebias.prune import gather_tokens, kept_mask, select_topk

KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
LAYERS = (2, 6, 15)


@dataclasses.dataclass(frozen=True)
class RecycleStage(Stage):
    """Keep the best ``keep`` by debiased score; the ``recycle`` best pruned tokens by raw score become
    ``clusters`` DPC-kNN means after the kept ones."""

    query: str = "raters"
    source: str = "self"
    recycle: int = 0
    clusters: int = 0

    bucketed = False  # cluster counts follow from the exact keep: one program per budget
    maskable = False

    @property
    def extra(self) -> int:
        return self.clusters

    def check(self, prev: int, method: str) -> None:
        if self.recycle < self.clusters or (self.recycle and self.keep + self.recycle > prev):
            raise ValueError(f"{method}: stage at layer {self.layer} recycles {self.recycle} of the "
                             f"{prev - self.keep} pruned tokens into {self.clusters} clusters; need clusters <= "
                             "recycled <= pruned.")

    def select(self, inp: StageInputs) -> Block:
        idx, slot = select_topk(inp.scores, self.slots, valid=inp.candidates, limit=inp.limit)
        if not self.recycle:
            return Block(gather_tokens(inp.h, idx), slot, idx)
        pruned = inp.valid & ~kept_mask(idx, slot, inp.valid.shape[1])
        ridx, rslot = select_topk(inp.raw, self.recycle, valid=pruned)  # raw scores, as released
        merged, mvalid = dpc_knn_merge(gather_tokens(inp.h, ridx), rslot, self.clusters)
        return Block(jnp.concatenate([gather_tokens(inp.h, idx), merged.astype(inp.h.dtype)], 1),
                     jnp.concatenate([slot, mvalid], 1),
                     jnp.concatenate([idx, jnp.full(mvalid.shape, -1, jnp.int32)], 1), merged=(ridx, rslot))


def schedule(keep: int, layers=LAYERS, n: int = 576, recycle: float = 0.3, per_cluster: int = 10):
    ks = KEEPS.get(keep) or tuple(max(1, round(k * keep / 128)) for k in KEEPS[128])
    out, prev = [], n
    for layer, k in zip(layers, ks):
        k = min(k, prev - 1)
        m = int((prev - k) * recycle) + 1
        c = int(m / per_cluster) + 1
        out.append(RecycleStage(layer, k, recycle=m, clusters=c))
        prev = k + c
    return tuple(out)


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    return schedule(keep, n=n)


METHOD = Method("sparsevlm", "Gumpest/SparseVLMs@734d900", stages, aliases=("sparse_vlm",),
                budget="the released per-stage lists for 64 / 128 / 192 (others: the 128 list scaled)",
                positions="reindex", pad_tau=0.5, pad_geometry="bilinear")


def dpc_knn_merge(x, valid, clusters: int, k: int | None = None):
    """SparseVLM v1.5's recycling clusters (Gumpest/SparseVLMs@734d900:llava/model/language_model/utils.py
    L247-310, ``cluster_and_merge``): density-peak clustering with k nearest neighbours, then the plain mean of
    each cluster.

    d_ij = ||x_i - x_j|| / sqrt(D) (D = the feature width: the release divides by C ** 0.5 with C = x.shape[-1],
    4096 on 7B); rho_i = exp(-mean of d^2 over the k nearest tokens, self included); delta_i = the distance to
    the nearest strictly denser token (the largest distance for the densest); centres = the ``clusters`` tokens
    with the largest delta * rho (in that order: cluster c of the output is the c-th centre); every token joins
    its nearest centre (ties: the earlier centre), centres join themselves. The release adds U(0, 1) * 1e-6 to
    rho to break density ties; this function adds no noise (ties: neither token is denser). Distances use the
    Gram expansion on features centred on the valid tokens' mean (fp32).

    x: float[B, M, D]; valid: bool[B, M]; clusters: static C; k: static neighbours, default C (the release);
    the project's earlier variant used k=7. Returns (merged float32[B, C, D], cluster_valid bool[B, C]; a
    cluster is invalid only when fewer than C tokens are valid)."""
    B, M, D = x.shape
    kk = max(1, min(clusters if k is None else k, M))
    x = x.astype(jnp.float32)
    nv = jnp.sum(valid, 1)
    centre = jnp.sum(jnp.where(valid[..., None], x, 0.0), 1, keepdims=True) / jnp.maximum(nv, 1)[:, None, None]
    xc = jnp.where(valid[..., None], x - centre, 0.0)
    sq = jnp.sum(xc * xc, -1)
    d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum("bmd,bnd->bmn", xc, xc), 0.0)
    dist = jnp.where(jnp.eye(M, dtype=bool), 0.0, jnp.sqrt(d2)) / jnp.sqrt(jnp.float32(D))
    pair = valid[:, :, None] & valid[:, None, :]
    big = jnp.max(jnp.where(pair, dist, 0.0), axis=(1, 2), keepdims=True)
    near = -jax.lax.top_k(-jnp.where(valid[:, None, :], dist, jnp.inf), kk)[0]  # [B, M, kk] (self included)
    near_ok = jnp.arange(kk)[None, None, :] < jnp.minimum(nv, kk)[:, None, None]
    density = jnp.exp(-jnp.sum(jnp.where(near_ok, near**2, 0.0), -1) / jnp.maximum(jnp.sum(near_ok, -1), 1))
    denser = (density[:, None, :] > density[:, :, None]) & valid[:, None, :]
    parent = jnp.min(jnp.where(denser, dist, big), axis=-1)
    score = jnp.where(valid, parent * density, -jnp.inf)
    centre_score, centres = jax.lax.top_k(score, clusters)  # [B, C]
    centre_ok = centre_score > -jnp.inf
    to_centre = jnp.take_along_axis(dist, centres[:, :, None], axis=1)  # [B, C, M]
    assign = jnp.argmin(jnp.where(centre_ok[:, :, None], to_centre, jnp.inf), axis=1)  # [B, M]
    onehot = jax.nn.one_hot(assign, clusters) * valid[..., None]  # [B, M, C]
    is_centre = jnp.zeros((B, M), bool).at[jnp.arange(B)[:, None], centres].set(centre_ok)
    own = jnp.zeros((B, M), jnp.int32).at[jnp.arange(B)[:, None], centres].set(jnp.arange(clusters)[None])
    onehot = jnp.where(is_centre[..., None], jax.nn.one_hot(own, clusters), onehot)  # centres join themselves
    counts = jnp.sum(onehot, 1)  # [B, C]
    merged = jnp.einsum("bmc,bmd->bcd", onehot, x) / jnp.maximum(counts, 1.0)[..., None]
    return merged, centre_ok & (counts > 0)
