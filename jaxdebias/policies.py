"""The array side of the pruning methods: how a stage scores, rates, fuses and merges visual tokens.

Pure functions (jit- and vmap-able); ``jaxdebias.methods`` says which of them each method's stages use. Each
default is the released rule of ``shared/reference/methods.md`` (the repo@commit:path is in each docstring);
earlier project variants survive only as named options of these functions.

Axes: B batch, H heads, Q voting query rows, S key slots, N visual tokens in the current sequence, K kept slots,
M other tokens (dropped, recycled), C clusters or contextual tokens, D width, E key dim, T text tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdebias import _checks
from jaxdebias.prune import kept_mask, select_topk


def sv_scores(x, valid):
    """TokenCarve's information score (ShawnTan86/TokenCarve@a57bd59:TokenCarve/modeling_llama.py L1160-1167):
    with the token matrix X = U S V^T (rows = tokens, an fp32 SVD), SV_i = sum_j S_j |U_ij|.

    In the release X is the decoder-layer output of layer W-1 on all 576 image rows (no padding exclusion): pass
    ``valid`` = the real image slots. Invalid rows are zeroed, which leaves the SVD of the valid rows unchanged
    (a zero row has U_ij = 0 wherever S_j > 0). With repeated singular values U is not unique and neither is SV
    (as in the release).

    x: float[B, N, D]; valid: bool[B, N]. Returns float32[B, N], 0 at invalid rows."""
    x = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
    u, s, _ = jnp.linalg.svd(x, full_matrices=False)  # u [B, N, min(N, D)], s [B, min(N, D)]
    return jnp.where(valid, jnp.einsum("bnj,bj->bn", jnp.abs(u), s), 0.0)



def descending_ranks(s, valid):
    """0-based rank of each valid token when the valid tokens are sorted by descending ``s`` (ties: the lower
    index first, as ``lax.top_k``); invalid tokens rank after all valid ones.

    s: float[B, N]; valid: bool[B, N]. Returns int32[B, N]."""
    _, order = jax.lax.top_k(jnp.where(valid, s.astype(jnp.float32), -jnp.inf), s.shape[-1])
    return jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation



def rank_fusion(av, sv, valid, w: float = 0.5):
    """TokenCarve's score fusion (ShawnTan86/TokenCarve@a57bd59:TokenCarve/modeling_llama.py L1170-1175):
    score_i = w (N - rank_AV(i)) + (1 - w) (N - rank_SV(i)), with 0-based descending ranks among the N valid
    tokens (ties: lower index first). ``w = 1`` ranks by AV alone (the release's mode 2) and ``w = 0`` by SV alone
    (mode 1): their top-R is the plain top-R of AV or SV.

    av, sv: float[B, N] (debiasing applies to ``av`` only); valid: bool[B, N]; w: static weight on AV in [0, 1].
    Returns float32[B, N]: valid scores lie in [1, N], invalid tokens get 0 (below every valid one)."""
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    ra = descending_ranks(av, valid).astype(jnp.float32)
    rs = descending_ranks(sv, valid).astype(jnp.float32)
    return jnp.where(valid, w * (n - ra) + (1.0 - w) * (n - rs), 0.0)



def _unit(x):
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)



def tokencarve_select(score, x, valid, n: int):
    """TokenCarve's selection and similarity merging (ShawnTan86/TokenCarve@a57bd59:TokenCarve/modeling_llama.py
    L1185-1211, counts from TokenCarve_model_vqa_loader.py L104-105).

    R = int(1.5 n) tokens with the highest ``score``, in descending-score order (ties: lower index first);
    A = the first int(R / 2), B = the rest. On unit-normalised ``x`` each b in B finds its most cosine-similar a
    in A (ties: the earlier a in A's order). The min(|A|, int(n / 2)) B tokens with the largest such cosine (ties:
    earlier in B's order) are merged into their a: a' = (a + sum of its merged b) / (1 + their count), all
    sources read before any write. Kept = A and the unmerged B: exactly n tokens when N >= R tokens are valid.

    Args:
      score: float[B, N] (e.g. ``rank_fusion``); x: float[B, N, D] the features that are compared and merged
        (the release: the decoder-layer output of layer W-1); valid: bool[B, N] tokens that may be selected;
        n: static number of kept tokens, with int(1.5 n) <= N.

    Returns:
      (idx int32[B, n] kept tokens in ascending original order, slot_mask bool[B, n] (False only when fewer than
       R tokens are valid; such a slot's idx points at an unkept token and must be masked),
       features float32[B, n, D] the kept tokens' features after merging, slot-aligned with idx).
    """
    n = _checks.check_positive_int("n", n)
    N = x.shape[1]
    R, M = int(n / 2 * 3), int(n / 2)  # as the release's loader spells them
    if R > N:
        raise ValueError(f"TokenCarve keeps n={n} of int(1.5 n)={R} candidates, but there are only N={N} tokens; "
                         f"keep at most {N * 2 // 3}.")
    half = int(R / 2)
    merges = min(half, M)
    _, top = jax.lax.top_k(jnp.where(valid, score.astype(jnp.float32), -jnp.inf), R)  # [B, R] descending
    top_ok = jnp.take_along_axis(valid, top, axis=1)
    xt = jnp.take_along_axis(x.astype(jnp.float32), top[..., None], axis=1)  # [B, R, D]
    xa, xb, ok_a, ok_b = xt[:, :half], xt[:, half:], top_ok[:, :half], top_ok[:, half:]
    merged = jnp.zeros(ok_b.shape, bool)
    xa_new = xa
    if merges > 0:
        ut = _unit(xt)
        cos = jnp.where(ok_a[:, None, :], jnp.einsum("bjd,bid->bji", ut[:, half:], ut[:, :half]), -jnp.inf)
        best, target = jnp.max(cos, -1), jnp.argmax(cos, -1)  # [B, R - half]
        best = jnp.where(ok_b, best, -jnp.inf)
        mval, mpos = jax.lax.top_k(best, merges)
        merged = jnp.any(jax.nn.one_hot(mpos, R - half, dtype=bool) & (mval > -jnp.inf)[..., None], axis=1)
        joins = jax.nn.one_hot(target, half) * merged[..., None]  # [B, R - half, half]
        xa_new = (xa + jnp.einsum("bji,bjd->bid", joins, xb)) / (1.0 + jnp.sum(joins, 1))[..., None]
    keep = jnp.concatenate([ok_a, ok_b & ~merged], axis=1)  # [B, R]
    order = jnp.argsort(jnp.where(keep, top, N + top), axis=1)[:, :n]  # kept first, ascending index
    idx = jnp.take_along_axis(top, order, axis=1).astype(jnp.int32)
    slot = jnp.take_along_axis(keep, order, axis=1)
    feats = jnp.take_along_axis(jnp.concatenate([xa_new, xb], axis=1), order[..., None], axis=1)
    return idx, slot, feats



def text_raters(h_visual, h_text, text_valid, *, scaled: bool = False, strict: bool = True):
    """SparseVLM v1.5's raters (Gumpest/SparseVLMs@734d900:llava/model/language_model/modelling_sparse_llama.py
    L200-204), from the layer-0 input embeddings: M = softmax over the text tokens j of the raw dot products
    H_v H_t^T, m_j = mean_i M_ij over the visual tokens i; a text token rates when m_j > mean_j m_j (strict).
    Computed in fp32 (the release: fp16).

    h_visual: float[B, N, D]; h_text: float[B, T, D] (the release: every token after the image);
    text_valid: bool[B, T] (softmax and mean over these only); scaled: the project's earlier variant, logits
    divided by sqrt(D); strict: False for the earlier ``>=``. Returns bool[B, T]."""
    logits = jnp.einsum("bnd,btd->bnt", h_visual.astype(jnp.float32), h_text.astype(jnp.float32))
    if scaled:
        logits = logits / jnp.sqrt(jnp.float32(h_visual.shape[-1]))
    logits = jnp.where(text_valid[:, None, :], logits, -jnp.inf)
    m = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)  # [B, T]
    mean = jnp.sum(jnp.where(text_valid, m, 0.0), 1, keepdims=True) / jnp.maximum(
        jnp.sum(text_valid, 1, keepdims=True), 1)
    return text_valid & ((m > mean) if strict else (m >= mean))



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


# ---------------------------------------------------------------------------------------------------- iLLaVA
# hulianyuyy/iLLaVA@4068149 (arXiv 2412.06263); 0-based layers. Published OneVision image defaults (README):
ILLAVA_ONEVISION_VIT_LAYERS, ILLAVA_ONEVISION_VIT_R = (5, 6, 7, 8), 92  # illava_vit_k/_r: SigLIP 729 -> 361
ILLAVA_ONEVISION_LLM_LAYER, ILLAVA_ONEVISION_LLM_R = 8, 0.70  # illava_llm_k/_r (video: k = 2)
# OURS for LLaVA-1.5 (no release): the same layers of CLIP-L/336's 23 that run, r scaled to 576 patches (72/576
# vs 92/729 per layer): 576 -> 288 patches, CLS never merged; the LLM stage merges 86 of 288 and keeps 202.
ILLAVA_LLAVA15_VIT_LAYERS, ILLAVA_LLAVA15_VIT_R = (5, 6, 7, 8), 72
ILLAVA_LLAVA15_LLM_LAYER, ILLAVA_LLAVA15_LLM_R = 8, 0.70


def _weighted_rows(x, rows, w):
    """x float[B, P, D], rows int[B, Q], w float[B, Q] -> float32[B, D] sum w x[rows] / sum w (or x[rows[:, 0]])."""
    vals = jnp.take_along_axis(x.astype(jnp.float32), rows[..., None], axis=1)  # [B, Q, D]
    total = jnp.sum(w, axis=1, keepdims=True)
    merged = jnp.einsum("bq,bqd->bd", w, vals) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, merged, vals[:, 0])


def illava_encoder_merge(x, attn, r: int, protected: int = 0):
    """iLLaVA's encoder stage (src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py L390-420),
    between a layer's attention residual and its MLP. a_p = mean over query rows of mean_h attn[..., p] (the
    attention token p receives); idx = the r + 1 least-attended tokens, ascending (the release's
    ``topk(r + 1, largest=False)`` leaves ties open; ours: lower index first); x[idx[-1]] <- sum_j w_j x[idx[j]] /
    sum_j w_j with w = (r + 1, r, ..., 1), the least attended weighing most (fp32 as released, cast back to
    x.dtype as it casts to fp16); idx[:-1] are dropped, the others keep their order. The release runs SigLIP
    without CLS (``protected=0``); ``protected=1`` never merges or drops CLIP's CLS at index 0 (ours, LLaVA-1.5).

    x: float[B, P, D]; attn: float[B, H, P, P] probabilities (rows: queries); r: static, r + 1 <= P - protected;
    protected: static count of leading tokens that are never candidates.
    Returns (x' float[B, P - r, D] in x.dtype, kept int32[B, P - r] ascending indices into P)."""
    x, attn = jnp.asarray(x), jnp.asarray(attn)
    B, P, _ = x.shape
    if attn.ndim != 4 or attn.shape[-2:] != (P, P) or attn.shape[0] != B:
        raise ValueError(f"attn must be float[B, H, P, P] with (B, P) = {(B, P)}, got shape {attn.shape}.")
    if not 0 <= r <= P - protected - 1:
        raise ValueError(f"iLLaVA merges r + 1 of {P - protected} tokens: r={r} not in [0, {P - protected - 1}].")
    a = jnp.mean(jnp.mean(attn.astype(jnp.float32), axis=1), axis=1)  # [B, P] received attention
    a = jnp.where(jnp.arange(P) < protected, jnp.inf, a)
    idx = jax.lax.top_k(-a, r + 1)[1]  # [B, r + 1] ascending a, ties lower index first
    merged = _weighted_rows(x, idx, jnp.broadcast_to(jnp.arange(r + 1, 0, -1, dtype=jnp.float32), idx.shape))
    rows = jnp.arange(B)[:, None]
    x = x.at[rows[:, 0], idx[:, -1]].set(merged.astype(x.dtype))
    dropped = jnp.zeros((B, P), bool).at[rows, idx[:, :-1]].set(True)
    kept = jnp.argsort(dropped, axis=1, stable=True)[:, :P - r].astype(jnp.int32)  # the others, ascending
    return jnp.take_along_axis(x, kept[..., None], axis=1), kept


def illava_llm_count(n: int, llm_r: float) -> int:
    """r, the tokens iLLaVA's LLM stage merges away (``forward_illava`` L1035-1038): round(n (1 - llm_r)) for
    0 < llm_r < 1, else round(llm_r) (Python's round: halves to even; the release leaves llm_r = 1 undefined)."""
    r = round(n * (1 - llm_r)) if 0 < llm_r < 1 else round(llm_r) if llm_r >= 1 else -1
    if not 0 <= r <= n - 1:
        raise ValueError(f"llm_r={llm_r!r}: a kept fraction in (0, 1) or a merged count in [1, n - 1], n={n}.")
    return int(r)


def illava_llm_merge(x, scores, r: int, valid=None):
    """iLLaVA's LLM stage (src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py
    ``forward_illava`` L1019-1062), at decoder layer k on its input rows of the N visual tokens.

    scores = mean_h A^{k-1}[last, o:o+N]; idx = all N tokens by descending score (ties: lower index first, as
    ``lax.top_k``); the r + 1 lowest idx[N-r-1:] are merged into idx[N-r-1] with weights (1, 2, ..., r + 1) in
    that order (the least attended weighs most; fp32 here, float64 in the release; cast back to x.dtype as it
    casts to fp16); sort(idx[:N-r]) are kept. ``valid`` (ours, for padding): invalid tokens rank below every
    valid one and merge with weight 0 (a target whose whole group is invalid keeps its own row).

    x: float[B, N, D]; scores: float[B, N]; r: static count in [0, N - 1] (``illava_llm_count``);
    valid: optional bool[B, N]. Returns (kept int32[B, N - r] ascending, features float[B, N - r, D] in x.dtype,
    slot-aligned with kept; the merged slot is kept[b, j] == idx[b, N-r-1])."""
    x, scores = jnp.asarray(x), jnp.asarray(scores)
    B, N, _ = x.shape
    _checks.check_same_shape("scores", scores, "x[..., 0]", x[..., 0])
    if not 0 <= r <= N - 1:
        raise ValueError(f"iLLaVA merges r + 1 of N={N} tokens: r={r} not in [0, {N - 1}].")
    s = scores.astype(jnp.float32)
    idx = jax.lax.top_k(s if valid is None else jnp.where(valid, s, -jnp.inf), N)[1]  # [B, N] descending
    group = idx[:, N - r - 1:]  # [B, r + 1]: the merge target first
    w = jnp.broadcast_to(jnp.arange(1, r + 2, dtype=jnp.float32), group.shape)
    w = w if valid is None else w * jnp.take_along_axis(valid, group, axis=1)
    x = x.at[jnp.arange(B), group[:, 0]].set(_weighted_rows(x, group, w).astype(x.dtype))
    kept = jnp.sort(idx[:, :N - r], axis=1).astype(jnp.int32)
    return kept, jnp.take_along_axis(x, kept[..., None], axis=1)
