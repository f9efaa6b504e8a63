"""The prefill: one loop for every pruning method (and for none), with real token removal.

Axes: B batch, T prompt slots, S slots of the current segment, N visual tokens of an image (576), M visual slots
in the current segment, K slots of a stage's block, H heads, D width, V vocab.

    encoder stage (if the plan has one) -> for each segment: run its layers -> score the visual span -> the stage
    returns a ``Block`` -> the block replaces the visual span (or, in mask mode, only masks keys)

Every method-specific rule lives in its module of ``jaxdebias.methods``; this loop knows stages only through their
interface (``Stage.select``, ``EncoderStage.encode``). Slots a sample cannot fill are masked in attention, never
filled with padding. Shapes depend only on the prompt bucket and the plan, so a batch of mixed prompts, image
shapes and budgets compiles once per bucket.

    spec = jd.PruneSpec("fastv", keep=128, debias=jd.Debias.full("released", tau=0.5))
    result = jaxdebias.models.generate.generate(model, batch, prune=spec, max_new_tokens=32)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import jaxdebias as jd
from jaxdebias.methods import StageInputs
from jaxdebias.models import layers
from jaxdebias.models.family import VisualModel, sample_keys  # noqa: F401 (sample_keys: its old home)
from jaxdebias.models.interventions import TriangleMix, VarSpec
from jaxdebias.models.layers import Taps
from jaxdebias.models.llama import KVCache, rope_inv_freq
from jaxdebias.models.rows import slot_mask
from jaxdebias.models.sequence import (MaskReselect, Seq, block_positions, keep_in_caches, masked_keys,
                                       next_positions, replace_visual, segments, seq_var_context, stage_rows)
from jaxdebias.prune import candidates
from jaxdebias.scores import stage_scores
from jaxdebias.spec import Plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefill:
    """What a prefill returns. logits: float32[B, V] at the last real token; cache: the per-layer KVCache;
    kept: per stage (encoder stage first) a tuple (raster int[B, K] (-1: a merged token), kept bool[B, K], span
    int[B, K] index into that stage's input span); scores / debiased: float32[B, N] the first stage's scores over
    the raster grid before and after debiasing (0 where not scored); merged: per stage that merges input tokens
    into new ones, (span idx int[B, R], valid bool[B, R]); reselect: the mask-mode re-selection state for decode
    (``sequence.MaskReselect``) or None."""

    logits: Any
    cache: Any
    kept: tuple
    scores: Any
    debiased: Any
    merged: tuple
    reselect: Any = None


class _DebiasStep:
    """The plan's debias step over tokens identified by raster index; it applies to the first stage of the
    encoder and of the decoder (every stage with ``every_stage``) and records the first decoder-or-encoder
    stage's scores over the raster grid."""

    def __init__(self, plan: Plan, content, n: int, views, view_sizes):
        on = plan.debias.enabled
        self.curve = plan.debias.curve_for(plan.method) if plan.debias.curve is not None else None
        self.content, self.on, self.plan, self.n = content, on, plan, n
        self.views, self.view_sizes = views, view_sizes
        self.recorded = None

    def applies(self, i: int) -> bool:
        return self.on and (i == 0 or self.plan.debias.every_stage)

    def content_of(self, i, raster, valid):
        """bool[B, M] content (merged tokens count as content), or None when padding is not suppressed."""
        if not self.applies(i) or self.content is None:
            return None
        return valid & (jnp.take_along_axis(self.content, jnp.clip(raster, 0), 1) | (raster < 0))

    def candidates(self, i, raster, valid):
        return candidates(valid, self.content_of(i, raster, valid), self.plan.pad_candidates)

    def __call__(self, i, raw, raster, valid):
        """float32[B, M] debiased scores of stage i (``raw`` where it does not apply); stage 0's are recorded."""
        debiased = jnp.where(valid, raw, 0.0)
        if self.applies(i):
            debiased = jd.debias_scores(raw, raster, valid, self.content_of(i, raster, valid), self.curve, self.n,
                                        self.views, self.view_sizes)
        if i == 0 and self.recorded is None:
            B = raw.shape[0]
            at = jnp.arange(B)[:, None], jnp.clip(raster, 0)
            zeros = jnp.zeros((B, self.n))
            self.recorded = (zeros.at[at].set(jnp.where(valid, raw, 0.0)),
                             zeros.at[at].set(jnp.where(valid, debiased, 0.0)))
        return debiased


def prefill(model: VisualModel, input_ids, pixel_values, real, image_sizes, instruction_pos, limits,
            plan: Plan | None, extra: int, var: VarSpec | None = None, triangle: TriangleMix | None = None
            ) -> Prefill:
    """The prefill of a ``Plan`` (``PruneSpec.plan``; None: dense) with the real per-stage budgets ``limits``
    int32[stages + 1] (``sequence.limits_array``). ``extra``: cache slots left for generated tokens. ``var`` (a
    ``VarSpec``) runs VAR on each segment's sequence (image span: the kept image tokens; edited rows: the text
    after them); ``triangle`` (TriangleMix) needs a dense plan."""
    cfg, lm = model.cfg, model.language_model
    L, n = cfg.text.num_layers, model.num_visual(pixel_values)
    B, T = input_ids.shape
    dtype = cfg.text.dtype
    real = real.astype(bool)
    is_img = input_ids == model.visual_token_id(pixel_values)
    vslots, _ = jd.visual_positions(is_img, n)
    segs = segments(T, plan, n, L)
    cache = KVCache.empty(cfg.text, B, [S + extra for a, b, S in segs for _ in range(a, b)])
    stages = () if plan is None else plan.stages
    encoder = None if plan is None else plan.encoder
    views, view_sizes, selectable = model.image_views(pixel_values)  # LLaVA-NeXT: base view + tile grid
    content = None
    if plan is not None and plan.pad_tau is not None:
        content = model.padding_content(pixel_values, image_sizes, plan.pad_tau, plan.pad_geometry)
    debias = None if plan is None else _DebiasStep(plan, content, n, views, view_sizes)
    kept, merged, reselect = [], [], None
    h, _ = model.embed(input_ids, None if encoder is not None else pixel_values)
    raster = jnp.where(is_img, jnp.cumsum(is_img, axis=1) - 1, -1)
    seq = Seq(h, layers.default_positions(real), real, is_img, raster, jnp.broadcast_to(jnp.arange(T), (B, T)),
              vslots[:, 0], n)
    if encoder is not None:
        with jax.named_scope(f"encoder_stage_{type(encoder).__name__}"):
            block, block_h, span_input = model.encoder_stage(encoder, pixel_values, debias, limits[0], plan.method)
        kept.append((block.span, block.valid & (block.span >= 0), block.span))
        if span_input is not pixel_values:  # the block has its own layout (LLaVA-OneVision's merged views)
            n = model.num_visual(span_input)
            views, view_sizes, selectable = model.image_views(span_input)
            if plan.pad_tau is not None:
                content = model.padding_content(span_input, image_sizes, plan.pad_tau, plan.pad_geometry)
            debias = _DebiasStep(plan, content, n, views, view_sizes)
        image_pos = jd.gather_tokens(seq.pos, vslots)
        seq = replace_visual(seq, block_h, block.valid, block.span, block_positions(image_pos, block.span),
                             plan.positions if not stages else "reindex")  # the decoder's image is the block
    instr = jnp.max(jnp.where(real, jnp.arange(T), 0), 1) if instruction_pos is None else instruction_pos
    raters = None
    if any(s.query == "raters" for s in stages):
        text = real & ~is_img & (jnp.arange(T)[None] >= vslots[:, :1] + n)
        raters = jd.text_raters(jd.gather_tokens(seq.h, vslots), seq.h, text)
    inv_freq = jnp.asarray(rope_inv_freq(cfg.text))
    offset = int(encoder is not None)
    key_keep = fixed_keep = None
    for i, (start, stop, S) in enumerate(segs):
        cache = cache.with_prompt(start, stop, seq.valid, next_positions(seq))
        mask = slot_mask(jnp.broadcast_to(jnp.arange(S), (B, S)), cache.valid[start])
        if key_keep is not None:  # mask mode: layers after the stage may not attend to the pruned image tokens
            mask = masked_keys(mask, jnp.ones(cache.valid[start].shape, bool).at[:, :S].set(key_keep))
        stage = stages[i] if i < len(stages) else None
        taps = Taps()
        if stage is not None:
            rows, row_valid = stage_rows(seq, stage.query, instr, raters)
            if stage.source != "probe":  # "tap": layer boundary - 1 = layer - 1; "self": the stage layer itself
                taps = Taps(attn_layers=(stage.boundary - 1,), rows=rows)
        with jax.named_scope(f"layers_{start}_{stop}"):
            run = lm.run_layers(seq.h, seq.pos, mask, start=start, stop=stop, cache=cache, taps=taps,
                                real=seq.valid, var=seq_var_context(seq, var), triangle=triangle)
        seq, cache = dataclasses.replace(seq, h=run.h), run.cache
        if stage is None:
            break
        with jax.named_scope(f"stage_{i}_{type(stage).__name__}"):
            if stage.source == "probe":
                probs = lm.layers[stage.layer].probe(seq.h, seq.pos, inv_freq, mask, rows)
            else:
                probs = run.tapped.attentions[stage.boundary - 1]
            span = seq.first[:, None] + jnp.arange(seq.nv)
            valid = jnp.take_along_axis(seq.valid, span, axis=1)
            span_raster = jnp.take_along_axis(seq.raster, span, axis=1)
            if selectable is not None:  # LLaVA-NeXT's newlines are never kept as content
                valid &= jnp.take_along_axis(selectable, jnp.clip(span_raster, 0), axis=1) | (span_raster < 0)
            raw = stage_scores(probs, row_valid, span, valid)
            block = stage.select(StageInputs(jd.gather_tokens(seq.h, span), raw, debias(i, raw, span_raster, valid),
                                             valid, debias.candidates(i, span_raster, valid), limits[offset + i]))
        own = block.span >= 0
        block_raster = jnp.where(own, jnp.take_along_axis(span_raster, jnp.clip(block.span, 0), 1), -1)
        kept.append((block_raster, block.valid & own, block.span))
        if block.merged is not None:
            merged.append(block.merged)
        kept_in_span = jd.kept_mask(block.span, block.valid & own, seq.nv)
        if plan.mode == "mask":  # the tokens stay; later layers (and decode) mask the pruned ones
            kept_slots = jnp.zeros(seq.valid.shape, bool).at[jnp.arange(B)[:, None], span].set(kept_in_span)
            key_keep = ~seq.vis | kept_slots
            if plan.reselect == "every_token":
                curve = debias.curve if debias.applies(i) else None
                online = isinstance(curve, str)
                reselect = MaskReselect(span, span_raster, valid, debias.content_of(i, span_raster, valid),
                                        debias.candidates(i, span_raster, valid), limits[offset + i],
                                        None if online else curve, views, stage.boundary, stage.slots, n,
                                        tuple(view_sizes), online)
            else:  # the prefill's selection serves every generated token: the caches drop the pruned keys once
                fixed_keep = (stage.boundary, key_keep)  # the last segment has written its prompt flags
            continue
        if block.cache_keep is not None:  # the caches of the layers below keep only these input tokens
            lower = jnp.zeros(seq.valid.shape, bool).at[jnp.arange(B)[:, None], span].set(block.cache_keep)
            cache = keep_in_caches(cache, 0, stage.boundary, seq, ~seq.vis | lower)
        span_pos = jnp.take_along_axis(seq.pos, span, axis=1)
        seq = replace_visual(seq, block.h.astype(dtype), block.valid, block_raster,
                             block_positions(span_pos, block.span), plan.positions)
    if fixed_keep is not None:
        cache = keep_in_caches(cache, fixed_keep[0], L, seq, fixed_keep[1])
    scores = debiased = jnp.zeros((B, n))
    if debias is not None and debias.recorded is not None:
        scores, debiased = debias.recorded
    return Prefill(lm.logits(layers.last_real(seq.h, seq.valid)), cache, tuple(kept), scores, debiased,
                   tuple(merged), reselect)
