"""Attention-row maths shared by the decoder, its interventions and the pruning stages (a leaf module).

Axes: B batch, T query slots, S key slots, Q selected query rows, H query heads, G key/value heads, R query heads
per key/value head (H / G), E head dim.

Masks are built from slots, not positions: slot j is visible to query slot i when j <= i and slot j holds a real
token (plus i == j, so that a padding row never sees an empty set). Positions only feed RoPE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def slot_mask(q_slots, key_valid):
    """bool[B, T, S]: causal over slots, real keys only, and always the diagonal.

    q_slots: int[B, T] slot of each query; key_valid: bool[B, S] keys holding a real token."""
    k_slots = jnp.arange(key_valid.shape[1])
    causal = k_slots[None, None, :] <= q_slots[:, :, None]
    return (causal & key_valid[:, None, :]) | (k_slots[None, None, :] == q_slots[:, :, None])


def take_rows(x, rows):
    """x[b, rows[b, q], ...] for x [B, T, ...] and rows int[B, Q] -> [B, Q, ...]."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


def row_probs(q_rows, k, mask_rows):
    """Softmax probabilities, fp32, of queries q_rows [B, Q, H, E] against keys k [B, S, G, E] under
    mask_rows bool[B, Q, S]. Returns float32[B, H, Q, S]."""
    q_rows = q_rows.astype(jnp.float32)
    B, Q, H, E = q_rows.shape
    G = k.shape[2]
    q_grouped = q_rows.reshape(B, Q, G, H // G, E)
    logits = jnp.einsum("bqgre,bsge->bgrqs", q_grouped, k.astype(jnp.float32)) / math.sqrt(E)
    logits = jnp.where(mask_rows[:, None], logits.reshape(B, H, Q, -1), -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def attention_rows(q, k, mask, rows):
    """Exact softmax probabilities of a few query rows, fp32.

    q: [B, T, H, E]; k: [B, S, G, E]; mask: bool[B, T, S]; rows: int[B, Q] query slots. Returns float32[B, H, Q, S].
    """
    return row_probs(take_rows(q, rows), k, take_rows(mask, rows))


def weighted_values(probs, v):
    """probs float32[B, H, Q, S] times values v [B, S, G, E] (grouped-query heads) -> float32[B, Q, H, E]."""
    B, H, Q, S = probs.shape
    G = v.shape[2]
    grouped = probs.reshape(B, G, H // G, Q, S)
    return jnp.einsum("bgrqs,bsge->bqgre", grouped, v.astype(jnp.float32)).reshape(B, Q, H, -1)


def put_rows(out, rows, row_valid, new):
    """out [B, T, H, E] with the rows int[B, Q] (where row_valid) replaced by new [B, Q, H, E]."""
    T = out.shape[1]
    target = jnp.where(row_valid, rows, T)  # invalid rows write out of bounds: dropped
    batch = jnp.arange(out.shape[0])[:, None]
    return out.at[batch, target].set(new.astype(out.dtype), mode="drop")


def rows_after_image(is_image, real, span: int):
    """The query rows after each sample's image span: (rows int[B, Q], valid bool[B, Q]), Q = T - span.

    is_image: bool[B, T] the (contiguous) image span; real: bool[B, T] real slots; span: static span length.
    A sample without image slots has no valid row."""
    B, T = is_image.shape
    last = jnp.max(jnp.where(is_image, jnp.arange(T), -1), axis=1)
    rows = last[:, None] + 1 + jnp.arange(max(T - span, 1))[None, :]
    ok = (rows < T) & (last[:, None] >= 0)
    rows = jnp.clip(rows, 0, T - 1)
    return rows, ok & jnp.take_along_axis(real & ~is_image, rows, axis=1)


def causal_attention(q, k, v, mask, blocks: int = 4, min_block: int = 128):
    """Prompt attention that skips the keys no query can see. q [B, T, H, E] at slots [0, T); k, v [B, S, G, E]
    with S >= T (a cache may hold empty slots after the prompt); mask bool[B, T, S], causal over slots (as
    ``slot_mask`` builds it: query slot i never sees a key slot j > i).

    The queries are cut into at most ``blocks`` row blocks of >= ``min_block`` rows; block [a, b) attends to key
    slots [0, b) only, through ``jax.nn.dot_product_attention`` (the same per-row maths and rounding as one call
    over all S slots: the skipped keys are masked out there). At T = 640 that computes 400 key columns per row on
    average instead of S. Returns [B, T, H, E]."""
    T = q.shape[1]
    size = max(min_block, -(-T // blocks))
    if T <= size:
        return jax.nn.dot_product_attention(q, k[:, :T], v[:, :T], mask=mask[:, None, :, :T])
    return jnp.concatenate([
        jax.nn.dot_product_attention(q[:, a:a + size], k[:, :min(T, a + size)], v[:, :min(T, a + size)],
                                     mask=mask[:, None, a:a + size, :min(T, a + size)])
        for a in range(0, T, size)], axis=1)
