"""The array side of the pruning methods: how a stage scores, rates, fuses and merges visual tokens.

Pure functions (jit- and vmap-able); ``jaxdebias.methods`` says which of them each method's stages use.

Axes: B batch, H heads, Q voting query rows, S key slots, N visual tokens in the current sequence, K kept slots,
M other tokens (dropped, recycled), C clusters or contextual tokens, D width, E key dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdebias.prune import kept_mask, select_topk


def information_scores(x, valid):
    """Each token's contribution to the singular values of the token matrix X = U S V^T (rows = tokens):
    c_i = sum_j s_j |U_ij|. Computed from the Gram matrix X X^T = U S^2 U^T (``eigh``, N x N) rather than an
    N x D SVD; singular values below 1e-3 of the largest are dropped (they are round-off in the Gram route).

    x: float[B, N, D]; valid: bool[B, N] (invalid rows are left out of X). Returns float32[B, N], 0 at invalid."""
    x = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
    lam, u = jnp.linalg.eigh(jnp.einsum("bnd,bmd->bnm", x, x))  # ascending eigenvalues, u[:, :, j] eigvectors
    lam = jnp.where(lam > 1e-6 * lam[:, -1:], lam, 0.0)
    return jnp.where(valid, jnp.einsum("bnj,bj->bn", jnp.abs(u), jnp.sqrt(lam)), 0.0)



def carve_scores(attn, info, valid, info_weight: float):
    """(1 - w) * minmax(attn) + w * minmax(info), min and max over each sample's valid tokens (0 elsewhere).

    attn, info: float[B, N]; valid: bool[B, N]. Returns float32[B, N]."""
    def minmax(s):
        s = s.astype(jnp.float32)
        lo = jnp.min(jnp.where(valid, s, jnp.inf), 1, keepdims=True)
        hi = jnp.max(jnp.where(valid, s, -jnp.inf), 1, keepdims=True)
        return (s - lo) / jnp.where(hi > lo, hi - lo, 1.0)

    return jnp.where(valid, (1 - info_weight) * minmax(attn) + info_weight * minmax(info), 0.0)



def merge_into(x_keep, keep_valid, x_drop, drop_valid):
    """Each valid dropped token joins the valid kept token whose feature is most cosine-similar; a kept token
    becomes the mean of itself and the tokens that joined it.

    x_keep: float[B, K, D]; keep_valid: bool[B, K]; x_drop: float[B, M, D]; drop_valid: bool[B, M].
    Returns float32[B, K, D] (invalid kept slots unchanged)."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

    sim = jnp.where(keep_valid[:, None, :], jnp.einsum("bmd,bkd->bmk", unit(x_drop), unit(x_keep)), -jnp.inf)
    joining = drop_valid & jnp.any(keep_valid, 1, keepdims=True)  # [B, M]
    joins = jax.nn.one_hot(jnp.argmax(sim, -1), x_keep.shape[1]) * joining[..., None]  # [B, M, K]
    total = x_keep.astype(jnp.float32) + jnp.einsum("bmk,bmd->bkd", joins, x_drop.astype(jnp.float32))
    return total / (1.0 + jnp.sum(joins, 1))[..., None]



def text_raters(h_visual, h_text, text_valid):
    """SparseVLM's raters: R = softmax_j(H_v H_t^T / sqrt(D)) over the text tokens j, r_j = mean_i R_ij over the
    visual tokens; a text token rates when r_j >= mean_j r_j.

    h_visual: float[B, N, D]; h_text: float[B, T, D]; text_valid: bool[B, T]. Returns bool[B, T]."""
    d = h_visual.shape[-1]
    logits = jnp.einsum("bnd,btd->bnt", h_visual.astype(jnp.float32), h_text.astype(jnp.float32)) / jnp.sqrt(d)
    logits = jnp.where(text_valid[:, None, :], logits, -jnp.inf)
    r = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)  # [B, T]
    m = jnp.sum(jnp.where(text_valid, r, 0.0), 1, keepdims=True) / jnp.maximum(jnp.sum(text_valid, 1, keepdims=True), 1)
    return text_valid & (r >= m)



def dpc_knn_merge(x, valid, clusters: int, k: int = 7):
    """Density-peak clustering with k nearest neighbours (DPC-KNN, as in TCFormer) and the mean of each cluster.

    density_i = exp(-mean of the squared distances to its k nearest neighbours) (distances / sqrt(D)); parent
    distance = the distance to the nearest denser token (the largest distance for the densest); the ``clusters``
    tokens with the largest density * parent distance are the centres; every token joins its nearest centre.

    x: float[B, M, D]; valid: bool[B, M]. Returns (merged float32[B, clusters, D], cluster_valid bool[B, clusters]).
    """
    B, M, D = x.shape
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, -1)
    dist = jnp.sqrt(jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum("bmd,bnd->bmn", x, x), 0.0))
    dist = dist / jnp.sqrt(D)
    pair = valid[:, :, None] & valid[:, None, :]
    big = jnp.max(jnp.where(pair, dist, 0.0), axis=(1, 2), keepdims=True)
    kk = max(1, min(k, M))
    near = -jax.lax.top_k(-jnp.where(valid[:, None, :], dist, jnp.inf), kk)[0]  # [B, M, kk] (self included)
    nv = jnp.sum(valid, 1)[:, None, None]
    near_ok = jnp.arange(kk)[None, None, :] < jnp.minimum(nv, kk)
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



def stage_scores(probs, query_valid, key_slots, key_valid):
    """Mean over heads and voting rows of the attention each visual slot receives.

    probs: float[B, H, Q, S]; query_valid: bool[B, Q]; key_slots: int[B, Nv] slots of the visual tokens;
    key_valid: bool[B, Nv]. Returns float32[B, Nv] (0 at invalid slots).
    """
    per_row = jnp.mean(probs.astype(jnp.float32), axis=1)  # [B, Q, S]
    q = query_valid.astype(jnp.float32)[..., None]
    per_key = jnp.sum(per_row * q, 1) / jnp.maximum(jnp.sum(q, 1), 1.0)  # [B, S]
    return jnp.where(key_valid, jnp.take_along_axis(per_key, key_slots, axis=1), 0.0)



def visionzip_select(cls_attn, keys, valid, dominant: int, contextual: int, limit=None):
    """VisionZip (Yang et al., CVPR 2025) on the tower's feature layer, checked against the released code
    (dvlab-research/VisionZip, PyPI ``visionzip`` 0.1.3, ``clip_encoder.py``); the CLS feature that the release
    puts first among the dominant tokens is added by the caller (``PruneSpec.visionzip_cls``).

    Dominant tokens: the ``dominant`` patches the CLS token attends to most (heads summed). Contextual tokens:
    among the remaining patches, ``contextual`` targets are taken evenly spaced (every ``n_rest // contextual``-th);
    every other remaining patch joins the target whose key (heads averaged, L2-normalised) is most similar; a
    contextual token is its target's feature plus the mean of the features that joined it.

    Args:
      cls_attn: float[B, N] CLS-to-patch attention; keys: float[B, N, Dk] of the same layer; valid: bool[B, N]
        candidate patches (e.g. content); dominant, contextual: static counts; limit: optional traced number of
        dominant tokens actually kept (<= dominant; the surplus slots are masked and their patches can merge).

    Returns:
      (dominant_idx int32[B, dominant] ascending, dominant_mask bool[B, dominant],
       merge float32[B, C, N]: contextual token c = sum_n merge[b, c, n] * feature[b, n],
       contextual_mask bool[B, C]).
    """
    idx, slot = select_topk(cls_attn, dominant, valid=valid, limit=limit)
    B, N = cls_attn.shape
    rest = valid & ~kept_mask(idx, slot, N)
    if contextual == 0:
        return idx, slot, jnp.zeros((B, 0, N), jnp.float32), jnp.zeros((B, 0), bool)
    order = jnp.cumsum(rest, axis=1) - 1  # rank of each remaining patch, in raster order
    step = jnp.maximum(jnp.sum(rest, axis=1, keepdims=True) // max(contextual, 1), 1)
    is_target = rest & (order % step == 0) & (order // step < contextual)
    target = jax.nn.one_hot(jnp.where(is_target, order // step, contextual), contextual + 1)[..., :contextual]
    k = keys.astype(jnp.float32)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    target_keys = jnp.einsum("bnc,bnd->bcd", target, k)  # [B, C, Dk]
    sim = jnp.einsum("bnd,bcd->bnc", k, target_keys)
    sim = jnp.where(jnp.any(target > 0, axis=1, keepdims=True), sim, -jnp.inf)  # groups without a target
    joins = (rest & ~is_target)[..., None] * jax.nn.one_hot(jnp.argmax(sim, -1), contextual)  # [B, N, C]
    mean = joins / jnp.maximum(jnp.sum(joins, axis=1, keepdims=True), 1.0)
    merge = jnp.swapaxes(target + mean, 1, 2)
    return idx, slot, merge, jnp.any(target > 0, axis=1)
