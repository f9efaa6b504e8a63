"""The sequence a pruned prefill carries between decoder segments, and what changes it: replacing the image span,
choosing the voting rows, the static segment lengths, mask-mode key masks and cache edits.

Axes: B batch, S slots of the current segment, M visual slots in it, N visual tokens of an image, Q voting rows,
H heads, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import jaxdebias as jd
from jaxdebias.methods import PruneSpec
from jaxdebias.models.interventions import VarSpec, var_context
from jaxdebias.models.llama import KVCache
from jaxdebias.models.rows import rows_after_image


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Seq:
    """The current sequence: h [B, S, D]; pos int[B, S]; valid, vis bool[B, S]; raster int[B, S] (raster index
    of a visual token, -1 otherwise); orig int[B, S] (slot in the original prompt, -1 for merged tokens);
    first int[B] slot of the first visual token; nv: static visual slot count M."""

    h: Any
    pos: Any
    valid: Any
    vis: Any
    raster: Any
    orig: Any
    first: Any
    nv: int = dataclasses.field(metadata={"static": True})


def replace_visual(seq: Seq, block_h, block_valid, block_raster, block_pos, positions: str) -> Seq:
    """Replaces the contiguous visual span of every sample by a block of M slots (kept or merged tokens)."""
    B, S, _ = seq.h.shape
    M = block_h.shape[1]
    S_new = S - seq.nv + M
    j = jnp.arange(S_new)[None, :]
    first = seq.first[:, None]
    in_block = (j >= first) & (j < first + M)
    src = jnp.where(j < first, j, j - M + seq.nv)
    src = jnp.clip(jnp.where(in_block, 0, src), 0, S - 1)
    bidx = jnp.clip(j - first, 0, M - 1)

    def pick(old, blk):
        o = jnp.take_along_axis(old, src.reshape(src.shape + (1,) * (old.ndim - 2)), axis=1)
        b = jnp.take_along_axis(blk, bidx.reshape(bidx.shape + (1,) * (blk.ndim - 2)), axis=1)
        return jnp.where(in_block.reshape(in_block.shape + (1,) * (old.ndim - 2)), b, o)

    valid = pick(seq.valid, block_valid)
    pos = pick(seq.pos, block_pos)
    if positions == "reindex":
        pos = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0)
    return Seq(h=pick(seq.h, block_h), pos=pos.astype(jnp.int32), valid=valid,
               vis=pick(seq.vis, jnp.ones(block_valid.shape, bool)),
               raster=pick(seq.raster, block_raster), orig=pick(seq.orig, jnp.full(block_raster.shape, -1)),
               first=seq.first, nv=M)


def seq_var_context(seq: Seq, var: VarSpec | None):
    """VAR on the current sequence: image span = its visual slots; rows = the text slots after them."""
    return var_context(var, seq.vis, seq.valid, seq.nv)


def voting_rows(seq: Seq, query: str, instruction_orig, raters=None):
    """(rows int[B, Q], row_valid bool[B, Q]) of the voting query slots in the current sequence, for a query kind
    of ``jaxdebias.names.QUERY_KINDS`` (the vocabulary of ``jd.query_mask``)."""
    B, S = seq.valid.shape
    slots = jnp.broadcast_to(jnp.arange(S), (B, S))
    last = jnp.max(jnp.where(seq.valid, slots, 0), axis=1)
    if query == "last":
        return last[:, None], jnp.ones((B, 1), bool)
    if query == "instruction":
        hit = seq.orig == instruction_orig[:, None]
        row = jnp.where(jnp.any(hit, 1), jnp.argmax(hit, 1), last)
        return row[:, None], jnp.ones((B, 1), bool)
    if query in ("text", "raters"):  # the slots after the image span
        rows, ok = rows_after_image(seq.vis, seq.valid, seq.nv)
        if query == "raters":  # raters: bool[B, T] over the original prompt
            orig = jnp.take_along_axis(seq.orig, rows, axis=1)
            ok &= jnp.take_along_axis(raters, jnp.clip(orig, 0), axis=1) & (orig >= 0)
        return rows, ok
    if query == "image":
        rows = seq.first[:, None] + jnp.arange(seq.nv)
        return rows, jnp.take_along_axis(seq.valid, rows, axis=1)
    raise ValueError(f"Unknown query kind {query!r}.")


def segments(T: int, shape: PruneSpec, n: int, L: int):
    """Static (first layer, stop layer, slots) of every decoder segment, for a shape spec (see PruneSpec.split)."""
    nv = shape.encoder_tokens(n)  # after the encoder stage (VisionZip, iLLaVA)
    segs, cur, S = [], 0, T - n + nv
    for s in shape.stages:
        segs.append((cur, s.boundary, S))
        if shape.mode == "mask":  # nothing leaves the sequence
            cur = s.boundary
            continue
        S, nv, cur = S - nv + s.keep + s.clusters, s.keep + s.clusters, s.boundary
    segs.append((cur, L, S))
    return segs, shape.stages


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MaskReselect:
    """FastV's released mask mode at decode: each new token's attention row in layer ``layer - 1`` re-selects the
    ``keep`` image tokens that layers >= ``layer`` may attend to (debiased as the prefill's selection).

    image_slots: int[B, N] cache slot of each image token (raster order); content: bool[B, N] candidates (padding
    excluded when debiasing); limit: int[] the real budget (<= keep); curve: a curve pytree or None."""

    image_slots: jax.Array
    content: jax.Array
    limit: jax.Array
    curve: Any
    layer: int = dataclasses.field(metadata={"static": True})
    keep: int = dataclasses.field(metadata={"static": True})
    online: bool = dataclasses.field(default=False, metadata={"static": True})
    padding: bool = dataclasses.field(default=False, metadata={"static": True})

    def __call__(self, probs):
        """probs float32[B, H, 1, S] (the new token's row in layer ``layer - 1``) -> keys allowed bool[B, S]."""
        B, S = probs.shape[0], probs.shape[-1]
        scores = jnp.take_along_axis(jnp.mean(probs[:, :, 0], axis=1), self.image_slots, axis=1)
        curve = "online" if self.online else self.curve
        scores = jd.debias(scores, curve=curve, pad_mask=self.content if self.padding else None)
        idx, slot = jd.select_topk(scores, self.keep, valid=self.content, limit=self.limit)
        kept = jd.kept_mask(idx, slot, scores.shape[1])
        return jnp.ones((B, S), bool).at[jnp.arange(B)[:, None], self.image_slots].set(kept)


def masked_keys(mask, key_keep):
    """A slot mask bool[B, T, S] whose keys where ``key_keep`` bool[B, S] is False are masked for every query,
    their own rows included (a pruned image token's row still sees the text before it); a row left empty (a
    padding slot) keeps its diagonal."""
    kept = mask & key_keep[:, None, :]
    own = jnp.arange(mask.shape[1])[:, None] == jnp.arange(mask.shape[2])[None, :]
    return kept | (own[None] & ~jnp.any(kept, -1, keepdims=True))


def keep_in_caches(cache: KVCache, start: int, stop: int, seq: Seq, keep) -> KVCache:
    """The caches of layers [start, stop) keep only the slots where ``keep`` bool[B, S] (over the current
    sequence's slots) is True: generated tokens no longer see the others there. TokenCarve's rule for the layers
    below its work layer (the release gathers them), and a mask-mode selection fixed at prefill."""
    S = keep.shape[1]
    return dataclasses.replace(cache, valid=tuple(
        v.at[:, :S].set(v[:, :S] & keep) if start <= layer < stop else v for layer, v in enumerate(cache.valid)))


def limits_array(limits) -> jax.Array:
    """The real (keep, merge) of each stage (``PruneSpec.split``) as the int32[stages + 1, 2] that the prefill
    takes (one spare row, so that a spec without stages still has an array)."""
    return jnp.asarray(tuple(limits) + ((0, 0),), jnp.int32)
