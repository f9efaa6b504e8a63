"""Language-to-vision attention reduced to one importance score per visual token.

Axes: B batch, H heads, Q query rows (a subset of the sequence), T sequence (keys), N visual tokens.

The methods differ in which query rows they read (one vocabulary with the pruning stages, ``names.QUERY_KINDS``):
  FastV         the last token of the prompt                       ``query_mask("last", ...)``
  PyramidDrop   the last instruction token                         ``query_mask("instruction", ..., position=)``
  SparseVLM     selected text "raters"                             ``query_mask("raters", ..., raters=)``
  HiMAP         all text after the image; then the image tokens    ``query_mask("text" | "image", ...)``
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxdebias import _checks
from jaxdebias.names import canonical_query

_REDUCE = {"mean", "sum", "max"}


def visual_positions(visual_mask, n: int):
    """Indices of the first ``n`` visual positions of each row, in sequence order.

    Args:
      visual_mask: bool[B, T], True at image-token positions.
      n: static number of visual tokens per sample.

    Returns:
      (positions int32[B, N], valid bool[B, N]); ``valid`` is False for slots past a sample's visual count
      (their position is 0 and must be masked).
    """
    _checks.check_rank("visual_mask", visual_mask, 2, "bool[B, T]")
    n = _checks.check_positive_int("n", n)

    def one(mask_t):
        (pos,) = jnp.nonzero(mask_t, size=n, fill_value=0)
        return pos.astype(jnp.int32), jnp.arange(n) < jnp.sum(mask_t)

    return jax.vmap(one)(visual_mask.astype(bool))


def _reduce(x, mask, how: str, axis: int):
    if how == "sum":
        return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    if how == "mean":
        count = jnp.maximum(jnp.sum(mask, axis=axis), 1)
        return jnp.sum(jnp.where(mask, x, 0.0), axis=axis) / count
    return jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis)


def reduce_rows(attn, query_valid, head_reduce: str = "mean", query_reduce: str = "mean"):
    """The one head/row reduction: attn float[B, H, Q, S] over the voting rows (query_valid bool[B, Q]) and the
    heads -> float32[B, S] (rows reduced per head, then heads)."""
    per_head = _reduce(attn.astype(jnp.float32), query_valid[:, None, :, None], query_reduce, axis=2)  # [B, H, S]
    return {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[head_reduce](per_head, axis=1)


def stage_scores(probs, query_valid, key_slots, key_valid):
    """What a pruning stage scores with: ``reduce_rows`` (heads and voting rows averaged) read at the visual
    slots. probs: float[B, H, Q, S]; query_valid: bool[B, Q]; key_slots: int[B, M] slots of the visual tokens;
    key_valid: bool[B, M]. Returns float32[B, M] (0 at invalid slots)."""
    per_key = reduce_rows(probs, query_valid)
    return jnp.where(key_valid, jnp.take_along_axis(per_key, key_slots, axis=1), 0.0)


@partial(jax.jit, static_argnames=("n", "head_reduce", "query_reduce"))
def _visual_scores(attn, visual_mask, query_mask, *, n, head_reduce, query_reduce):
    per_tok = reduce_rows(attn, query_mask, head_reduce, query_reduce)  # [B, T]
    pos, valid = visual_positions(visual_mask, n)
    scores = jnp.take_along_axis(per_tok, pos, axis=1)
    any_query = jnp.any(query_mask, axis=1, keepdims=True)
    return jnp.where(valid & any_query, scores, 0.0)


def visual_scores(attn, visual_mask, query_mask=None, *, n: int | None = None, head_reduce: str = "mean",
                  query_reduce: str = "mean"):
    """Per-visual-token importance from attention rows.

    Args:
      attn: float[B, H, Q, T] attention probabilities of Q query rows over all T keys.
      visual_mask: bool[B, T], True at the image-token positions (keys).
      query_mask: bool[B, Q] or bool[Q], which of the Q rows vote (default: all).
      n: static number of visual tokens per sample N. Defaults to the largest count in ``visual_mask``, which
        needs concrete values; pass it explicitly under jit.
      head_reduce, query_reduce: "mean", "sum" or "max" over heads / voting rows.

    Returns:
      float[B, N] scores in image-token order; 0 for slots past a sample's visual count and for samples
      with no voting row.
    """
    _checks.check_rank("attn", attn, 4, "float[B, H, Q, T]")
    _checks.check_rank("visual_mask", visual_mask, 2, "bool[B, T]")
    B, _, Q, T = attn.shape
    if visual_mask.shape != (B, T):
        raise ValueError(f"visual_mask must be bool[B, T] = {(B, T)} to match attn {attn.shape}, got "
                         f"{visual_mask.shape}.")
    if query_mask is None:
        query_mask = jnp.ones((B, Q), bool)
    query_mask = jnp.asarray(query_mask, bool)
    if query_mask.ndim == 1:
        query_mask = jnp.broadcast_to(query_mask, (B, Q))
    if query_mask.shape != (B, Q):
        raise ValueError(f"query_mask must be bool[B, Q] = {(B, Q)} or bool[Q], got {query_mask.shape}.")
    for name, how in (("head_reduce", head_reduce), ("query_reduce", query_reduce)):
        if how not in _REDUCE:
            raise ValueError(f"{name} must be one of {sorted(_REDUCE)}, got {how!r}.")
    if n is None:
        if not _checks.is_concrete(visual_mask):
            raise ValueError("visual_scores under jit needs the static number of visual tokens: pass n=...")
        n = int(jnp.max(jnp.sum(visual_mask, axis=1)))
        if n == 0:
            raise ValueError("visual_mask marks no visual token in any sample; nothing to score.")
    return _visual_scores(attn, jnp.asarray(visual_mask, bool), query_mask, n=n, head_reduce=head_reduce,
                          query_reduce=query_reduce)


def query_mask(kind: str, *, attention_mask, visual_mask=None, position=None, raters=None):
    """Boolean query-row masks over the sequence for the usual query sets (the pruning stages' vocabulary).

    Args:
      kind: "last" (last real token: FastV), "instruction" (the given per-sample ``position``: PyramidDrop's last
        instruction token), "text" (every real token after the last image token: HiMAP), "image" (the image
        tokens: HiMAP's second stage) or "raters" (the ``raters`` among the text after the image: SparseVLM).
        "after_image" and "position" are accepted aliases of "text" and "instruction".
      attention_mask: bool/int[B, T], 1 for real tokens (left or right padding both work).
      visual_mask: bool[B, T], needed for "text", "image" and "raters".
      position: int[B], needed for "instruction"; raters: bool[B, T], needed for "raters".

    Returns:
      bool[B, T], True at the voting rows. Use it to pick the rows to tap, or as ``query_mask`` when the
      attention you hold covers all T rows.
    """
    _checks.check_rank("attention_mask", attention_mask, 2, "int[B, T]")
    kind = canonical_query(kind)
    real = jnp.asarray(attention_mask).astype(bool)
    idx = jnp.arange(real.shape[1])
    if kind == "last":
        last = jnp.max(jnp.where(real, idx, -1), axis=1)
        return idx[None, :] == last[:, None]
    if kind == "instruction":
        if position is None:
            raise ValueError("query_mask('instruction') needs position (int[B]).")
        return idx[None, :] == jnp.asarray(position)[:, None]
    if visual_mask is None:
        raise ValueError(f"query_mask({kind!r}) needs visual_mask (bool[B, T]).")
    visual = jnp.asarray(visual_mask, bool)
    if kind == "image":
        return real & visual
    last_img = jnp.max(jnp.where(visual, idx, -1), axis=1)
    text = real & (idx[None, :] > last_img[:, None]) & (last_img[:, None] >= 0)
    if kind == "raters":
        if raters is None:
            raise ValueError("query_mask('raters') needs raters (bool[B, T], e.g. from jd.text_raters).")
        return text & jnp.asarray(raters, bool)
    return text


def voting_rows(kind: str, *, attention_mask, visual_mask, span: int, position=None, raters=None):
    """``query_mask`` as row indices with a static count, for tapping only the voting rows.

    kind, attention_mask, visual_mask, position, raters: as ``query_mask``; span: static length of the (contiguous)
    visual span. Returns (rows int32[B, Q] ascending, valid bool[B, Q]) with Q = 1 ("last", "instruction"),
    ``span`` ("image") or T - span ("text", "raters"); a sample with fewer rows has invalid slots after them."""
    kind = canonical_query(kind)
    mask = query_mask(kind, attention_mask=attention_mask, visual_mask=visual_mask, position=position,
                      raters=raters)
    T = mask.shape[1]
    Q = 1 if kind in ("last", "instruction") else span if kind == "image" else max(T - span, 1)
    rows = jax.vmap(lambda m: jnp.nonzero(m, size=Q, fill_value=0)[0])(mask).astype(jnp.int32)
    return rows, jnp.arange(Q)[None, :] < jnp.sum(mask, axis=1, keepdims=True)


def text_raters(h_visual, h_text, text_valid, *, scaled: bool = False, strict: bool = True):
    """The "raters" query rows: SparseVLM v1.5's raters (Gumpest/SparseVLMs@734d900:llava/model/language_model/modelling_sparse_llama.py
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
