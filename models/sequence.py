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
from jaxdebias.models.interventions import VarSpec, var_context
from jaxdebias.models.llama import KVCache
from jaxdebias.spec import Plan


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


def stage_rows(seq: Seq, query: str, instruction_orig, raters=None):
    """(rows int[B, Q], row_valid bool[B, Q]) of a stage's voting query slots in the current sequence: the core's
    ``jd.voting_rows`` on it, with the instruction slot (an original slot, default the last real token) and the
    raters (bool[B, T] over the original prompt) carried to where they are now."""
    position = rater_slots = None
    if query == "instruction":
        S = seq.valid.shape[1]
        last = jnp.max(jnp.where(seq.valid, jnp.arange(S), 0), axis=1)
        hit = seq.orig == instruction_orig[:, None]
        position = jnp.where(jnp.any(hit, 1), jnp.argmax(hit, 1), last)
    if raters is not None:
        rater_slots = jnp.take_along_axis(raters, jnp.clip(seq.orig, 0), axis=1) & (seq.orig >= 0)
    return jd.voting_rows(query, attention_mask=seq.valid, visual_mask=seq.vis, span=seq.nv, position=position,
                          raters=rater_slots)


def block_positions(span_pos, span):
    """Position ids of a block's slots: a kept token's (``span`` int[B, K] >= 0 indexes ``span_pos`` int[B, M]);
    a new, merged token (span -1) sits at the span's last (largest) position, or at its first when no kept token precedes
    it (a CLS token in front). Used where a method keeps original positions."""
    got = jnp.take_along_axis(span_pos, jnp.clip(span, 0), axis=1)
    seen = jnp.cumsum(span >= 0, axis=1) > 0
    first, last = jnp.min(span_pos, axis=1, keepdims=True), jnp.max(span_pos, axis=1, keepdims=True)
    return jnp.where(span >= 0, got, jnp.where(seen, last, first))


def next_positions(seq: Seq):
    """int32[B]: the position of the first generated token, one past the prompt's last real position (with
    re-indexed positions the pruned length, with original ones the original length)."""
    return jnp.max(jnp.where(seq.valid, seq.pos, -1), axis=1) + 1


def segments(T: int, plan: Plan | None, n: int, L: int):
    """Static (first layer, stop layer, slots) of every decoder segment of a plan (None: one dense segment)."""
    if plan is None:
        return [(0, L, T)]
    nv = plan.decoder_visual(n)  # after the encoder stage
    segs, cur, S = [], 0, T - n + nv
    for s in plan.stages:
        segs.append((cur, s.boundary, S))
        if plan.mode != "mask":  # in mask mode nothing leaves the sequence
            S, nv = S - nv + s.slots + s.extra, s.slots + s.extra
        cur = s.boundary
    segs.append((cur, L, S))
    return segs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MaskReselect:
    """FastV's released mask mode at decode: each new token's attention row in layer ``layer - 1`` re-selects the
    ``slots`` image tokens that layers >= ``layer`` may attend to, debiased as the prefill's selection was (the
    same ``jd.debias_scores`` call, so LLaVA-NeXT's per-view curves apply too).

    image_slots: int[B, N] cache slot of each image token (span order); raster: int[B, N] their raster index;
    valid: bool[B, N] tokens that exist; content: bool[B, N] or None (padding suppression); candidates: bool[B, N]
    the tokens a selection may keep; limit: int[] the real budget (<= slots); curve: a curve pytree or None
    (``online``: the per-sample fit instead); views: (view, local) int[B, N] each, or None; n: the raster length;
    view_sizes: static view sizes."""

    image_slots: jax.Array
    raster: jax.Array
    valid: jax.Array
    content: Any
    candidates: jax.Array
    limit: jax.Array
    curve: Any
    views: Any
    layer: int = dataclasses.field(metadata={"static": True})
    slots: int = dataclasses.field(metadata={"static": True})
    n: int = dataclasses.field(metadata={"static": True})
    view_sizes: tuple = dataclasses.field(default=(), metadata={"static": True})
    online: bool = dataclasses.field(default=False, metadata={"static": True})

    def __call__(self, probs):
        """probs float32[B, H, 1, S] (the new token's row in layer ``layer - 1``) -> keys allowed bool[B, S]."""
        B, S = probs.shape[0], probs.shape[-1]
        raw = jnp.take_along_axis(jnp.mean(probs[:, :, 0], axis=1), self.image_slots, axis=1)
        scores = jd.debias_scores(raw, self.raster, self.valid, self.content, "online" if self.online else self.curve,
                                  self.n, self.views,
                                  self.view_sizes)
        idx, slot = jd.select_topk(scores, self.slots, valid=self.candidates, limit=self.limit)
        kept = jd.kept_mask(idx, slot, scores.shape[1])
        return jnp.ones((B, S), bool).at[jnp.arange(B)[:, None], self.image_slots].set(kept)


def masked_keys(mask, key_keep):
    """Mask mode's one helper: a slot mask bool[B, T, S] whose keys where ``key_keep`` bool[B, S] is False are
    masked for every query, their own rows included (a pruned image token's row still sees the text before it); a
    row left empty (a padding slot) keeps its diagonal."""
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
    """The real budget of each stage (``PruneSpec.plan``) as the int32[stages + 1] that the prefill takes (one
    spare entry, so that a dense plan still has an array)."""
    return jnp.asarray(tuple(limits) + (0,), jnp.int32)
