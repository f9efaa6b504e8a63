"""TokenCarve (Tan et al. 2025; ShawnTan86/TokenCarve@a57bd59:TokenCarve/modeling_llama.py L1140-1256, mode 0).

At work layer W (2): the last token's attention in layer W - 1 (debiased) and the singular-value score of layer
W's input over the image rows are fused by rank with weight 0.5; the top int(1.5 n) are split in halves A, B, and
the int(n / 2) B tokens most similar to A are merged into their best A token: exactly n kept at their original
positions, and the caches of layers < W keep only the kept tokens (the release gathers them). Decoding continues
at the last original position + 1. The debias paper runs n = 64.

``keep`` is n, the tokens layers >= W see.

Axes: B batch, N tokens of the span, R = int(1.5 n) ranked candidates, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdebias import _checks
from jaxdebias.methods.base import Block, Method, Stage, StageInputs
from jaxdebias.prune import kept_mask


@dataclasses.dataclass(frozen=True)
class CarveStage(Stage):
    """TokenCarve's rank fusion (weight ``info_weight`` on attention) and A/B merge at layer ``layer``."""

    info_weight: float = 0.5

    bucketed = False  # R and the merge count follow from the exact n
    maskable = False

    @property
    def merge(self) -> int:
        """int(n / 2): the B tokens merged into A."""
        return int(self.keep / 2)

    def check(self, prev: int, method: str) -> None:
        if not 0 <= self.info_weight <= 1:
            raise ValueError(f"{method}: info_weight must be in [0, 1], got {self.info_weight}.")
        if self.source != "tap":
            raise ValueError(f"{method}: TokenCarve needs source 'tap' (the last token's attention in layer "
                             f"{self.layer - 1}), got {self.source!r}.")
        if int(self.keep / 2 * 3) > prev:
            raise ValueError(f"{method}: TokenCarve keeps n={self.keep} of int(1.5 n)={int(self.keep / 2 * 3)} "
                             f"candidates, but there are only {prev} tokens; keep at most {prev * 2 // 3}.")

    def select(self, inp: StageInputs) -> Block:
        fused = rank_fusion(inp.scores, sv_scores(inp.h, inp.valid), inp.valid, self.info_weight)
        idx, slot, feats = tokencarve_select(fused, inp.h, inp.valid, self.slots)
        return Block(feats.astype(inp.h.dtype), slot, idx, cache_keep=kept_mask(idx, slot, inp.valid.shape[1]))


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    return (CarveStage(2 if layer is None else layer, keep, "last", "tap",
                       info_weight=options.get("info_weight", 0.5)),)


METHOD = Method("tokencarve", "ShawnTan86/TokenCarve@a57bd59", stages, budget="n, the tokens kept from layer W (2)",
                positions="original", pad_tau=0.5, options=(("info_weight", 0.5),))


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


