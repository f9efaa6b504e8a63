"""Visual token pruning inside the LLaVA decoder: staged prefill with real token removal, then generation.

Axes: B batch, T prompt slots, S slots of the current segment, N visual tokens of an image (576), M visual slots
in the current segment, K kept slots (a bucket), Q voting rows, H heads, D width, V vocab.

The prefill runs the decoder in segments. Before each stage layer the visual tokens are scored (by the method's
policy in ``jaxdebias.methods``), optionally debiased, and the top-K are gathered into a shorter sequence: the
next layers compute on fewer tokens and their KV caches are shorter. Slots a sample cannot fill (fewer valid
tokens than the bucket) are masked in attention, never filled with padding. Shapes depend only on the prompt
bucket and the keep buckets, so a batch of mixed prompts, image shapes and budgets compiles once per bucket.

    spec = jd.PruneSpec("fastv", keep=128, debias=jd.Debias.full("released", tau=0.5))
    result = jaxdebias.models.generate.generate(model, batch, prune=spec, max_new_tokens=32)

``prefill`` is the one prefill of the package: without a spec (or with no stages) it is the dense prefill.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import jaxdebias as jd
from jaxdebias.methods import PruneSpec
from jaxdebias.models import layers
from jaxdebias.models.interventions import TriangleMix, VarSpec
from jaxdebias.models.llama import KVCache, Taps, rope_inv_freq
from jaxdebias.models.llava import Llava
from jaxdebias.models.rows import slot_mask
from jaxdebias.models.sequence import (MaskReselect, Seq, keep_in_caches, masked_keys, replace_visual, segments,
                                       seq_var_context, voting_rows)
from jaxdebias.policies import (dpc_knn_merge, illava_llm_merge, rank_fusion, stage_scores, sv_scores, text_raters,
                                tokencarve_select, visionzip_select)


def prefill(model: Llava, input_ids, pixel_values, real, image_sizes, instruction_pos, limits, spec: PruneSpec,
            extra: int, var: VarSpec | None = None, triangle: TriangleMix | None = None):
    """The staged prefill for a shape spec (``PruneSpec.split``) and the real per-stage counts (``limits_array``);
    a spec without stages runs the dense prefill. ``extra``: cache slots left for generated tokens.
    Returns (logits float32[B, V] at the last real token, KVCache, info dict).

    info: "kept" list (per stage) of (raster idx int[B, K] (-1 for a merged token), slot mask bool[B, K], index
    in the stage's visual span int[B, K]); "scores" / "debiased":
    float32[B, N] first-stage scores over the raster grid before and after debiasing (0 where not scored);
    "recycled": per recycling stage (span idx int[B, R], slot mask bool[B, R]) of the tokens merged by DPC-kNN.
    ``var`` (an ``attention.VarSpec``) runs VAR on each segment's sequence: the image span is the kept image
    tokens, the edited rows the text after them. ``triangle`` (TriangleMix) needs a spec without stages."""
    cfg = model.cfg
    lm = model.language_model
    L, n = cfg.text.num_layers, model.num_visual(pixel_values)
    B, T = input_ids.shape
    real = real.astype(bool)
    is_img = input_ids == model.visual_token_id(pixel_values)
    vslots, _ = jd.visual_positions(is_img, n)
    segs, stages = segments(T, spec, n, L)
    cache = KVCache.empty(cfg.text, B, [S + extra for a, b, S in segs for _ in range(a, b)])
    content = None  # bool[B, N] over the raster grid: not letterbox padding
    tau = spec.debias.tau_for(spec.method)
    views, view_sizes, selectable = model.image_views(pixel_values)  # LLaVA-NeXT: base view + tile grid
    grid = None if views is not None else cfg.vision.grid
    if tau is not None:
        content = model.padding_content(pixel_values, image_sizes, tau, spec.debias.geometry_for(spec.method))
    curve = spec.debias.curve_for(spec.method) if spec.debias.curve is not None else None
    info = {"kept": [], "scores": jnp.zeros((B, n)), "debiased": jnp.zeros((B, n)), "reselect": None,
            "recycled": []}
    debias_on = spec.debias.enabled
    raster = jnp.where(is_img, jnp.cumsum(is_img, axis=1) - 1, -1)
    orig = jnp.broadcast_to(jnp.arange(T), (B, T))

    def debiasing(i):
        """(curve, padding mask) of stage i: the first stage only, unless every_stage."""
        use = debias_on and (i == 0 or spec.debias.every_stage)
        return (curve, content) if use else (None, None)

    def record(i, raw, debiased, seq_raster, valid):
        if i == 0:  # the first stage's scores over the raster grid, before and after debiasing
            at = jnp.arange(B)[:, None], jnp.clip(seq_raster, 0)
            info["scores"] = info["scores"].at[at].set(jnp.where(valid, raw, 0.0))
            info["debiased"] = info["debiased"].at[at].set(jnp.where(valid, debiased, 0.0))

    def candidates(i, seq_raster, valid):
        """Tokens a content-capped selection may keep (FastV, VisionZip): padding excluded while debiasing."""
        pad = debiasing(i)[1]
        return valid if pad is None else valid & (jnp.take_along_axis(pad, jnp.clip(seq_raster, 0), 1) | (
            seq_raster < 0))

    def debiased_scores(i, raw, seq_raster, valid):
        """The debias step alone (for policies that select their own way: VisionZip, TokenCarve)."""
        stage_curve, pad = debiasing(i)
        content_here = None if pad is None else candidates(i, seq_raster, valid)
        debiased = jd.debias_scores(raw, seq_raster, valid, content_here, stage_curve, n, views, view_sizes)
        record(i, raw, debiased, seq_raster, valid)
        return debiased

    def debias_and_select(i, raw, seq_raster, valid, keep, limit):
        """The core's step (``jd.debias_and_select``) on the current tokens, identified by their raster index."""
        stage_curve, pad = debiasing(i)
        idx, slot, debiased = jd.debias_and_select(raw, keep, curve=stage_curve, pad_mask=pad, valid=valid,
                                                   raster=seq_raster, limit=limit, grid=grid,
                                                   pad_candidates=spec.pad_candidates, views=views,
                                                   view_sizes=view_sizes)
        record(i, raw, debiased, seq_raster, valid)
        return idx, slot, debiased

    # The encoder stage (layer 0): VisionZip and iLLaVA hand the decoder a shorter image block
    encoder = spec.encoder_tokens(n) != n or spec.method == "visionzip"
    if encoder and views is not None:
        raise ValueError(f"{spec.method}'s encoder stage runs on one CLIP view (LLaVA-1.5); on a multi-view "
                         "LLaVA-NeXT image or a Video-LLaVA video use a decoder-side method (fastv, pdrop, "
                         "sparsevlm, himap, tokencarve).")
    h, _ = model.embed(input_ids, None if encoder else pixel_values)
    seq = Seq(h, layers.default_positions(real), real, is_img, raster, orig, vslots[:, 0], n)
    if spec.method == "visionzip":
        feats, cls_feat, cls_attn, keys = model.vision_tower.with_cls_attention(pixel_values)
        ctx, cls = spec.visionzip_contextual, int(spec.visionzip_cls)
        grid_raster, ones = jnp.broadcast_to(jnp.arange(n), (B, n)), jnp.ones((B, n), bool)
        scores = debiased_scores(0, cls_attn, grid_raster, ones)
        idx, slot, merge, cmask = visionzip_select(scores, keys, candidates(0, grid_raster, ones),
                                                   spec.keep - ctx - cls, ctx, limit=limits[0, 0])
        feats = feats.astype(cfg.text.dtype)
        block_v = jnp.concatenate([cls_feat[:, None, :].astype(feats.dtype)[:, :cls], jd.gather_tokens(feats, idx),
                                   jnp.einsum("bcn,bnd->bcd", merge, feats)], 1)  # [CLS], dominant, contextual
        info["kept"].append((idx, slot, idx))
        block_valid = jnp.concatenate([jnp.ones((B, cls), bool), slot, cmask], 1)
        block_raster = jnp.concatenate([jnp.full((B, cls), -1), idx, jnp.full((B, ctx), -1)], 1)
        img_pos = jd.gather_tokens(seq.pos, vslots[:, 0:1] + jnp.concatenate([jnp.zeros((B, cls), int), idx], 1))
        last_pos = jnp.max(jnp.where(is_img, seq.pos, 0), 1, keepdims=True)
        block_pos = jnp.concatenate([img_pos, jnp.broadcast_to(last_pos, (B, ctx))], 1)
        positions = spec.positions
    elif encoder:  # iLLaVA: CLIP merges tokens away in its middle layers
        block_v, block_raster = model.vision_tower.with_merges(pixel_values, spec.illava_vit_layers,
                                                                spec.illava_vit_r)
        block_valid = jnp.ones(block_raster.shape, bool)
        block_pos, positions = jnp.zeros(block_raster.shape, jnp.int32), "reindex"  # contiguous, as released
        info["kept"].append((block_raster, block_valid, block_raster))
    if encoder:
        block_h = model.multi_modal_projector(block_v.astype(cfg.text.dtype)).astype(cfg.text.dtype)
        seq = replace_visual(seq, block_h, block_valid, block_raster, block_pos, positions)
    instr = jnp.max(jnp.where(real, jnp.arange(T), 0), 1) if instruction_pos is None else instruction_pos
    raters = None
    if any(s.query == "raters" for s in stages):
        text = real & ~is_img & (jnp.arange(T)[None] >= vslots[:, :1] + n)
        raters = text_raters(jd.gather_tokens(seq.h, vslots), seq.h, text)
    inv_freq = jnp.asarray(rope_inv_freq(cfg.text))
    n_real = jnp.sum(real, 1)
    key_keep = fixed_keep = None
    for i, (start, stop, S) in enumerate(segs):
        cache = cache.with_prompt(start, stop, seq.valid,
                                  n_real if spec.positions == "keep" else jnp.sum(seq.valid, 1))
        mask = slot_mask(jnp.broadcast_to(jnp.arange(S), (B, S)), cache.valid[start])
        if key_keep is not None:  # mask mode: layers after the stage may not attend to the pruned image tokens
            mask = masked_keys(mask, jnp.ones(cache.valid[start].shape, bool).at[:, :S].set(key_keep))
        stage = stages[i] if i < len(stages) else None
        taps, rows = Taps(), None
        if stage is not None:
            rows, row_valid = voting_rows(seq, stage.query, instr, raters)
            if stage.source != "probe":  # "tap": layer boundary - 1 = layer - 1; "self": the stage layer itself
                taps = Taps(attn_layers=(stage.boundary - 1,), rows=rows)
        h, cache, tapped = lm.run_layers(seq.h, seq.pos, mask, start=start, stop=stop, cache=cache, taps=taps,
                                         real=seq.valid, var=seq_var_context(seq, var), triangle=triangle)
        seq = dataclasses.replace(seq, h=h)
        if stage is None:
            break
        if stage.source == "probe":
            probs = lm.layers[stage.layer].probe(seq.h, seq.pos, inv_freq, mask, rows)
        else:
            probs = tapped["attentions"][stage.boundary - 1]
        kslots = seq.first[:, None] + jnp.arange(seq.nv)
        kvalid = jnp.take_along_axis(seq.valid, kslots, axis=1)
        seq_raster = jnp.take_along_axis(seq.raster, kslots, axis=1)
        if selectable is not None:  # LLaVA-NeXT's newlines are never kept as content
            kvalid &= jnp.take_along_axis(selectable, jnp.clip(seq_raster, 0), axis=1) | (seq_raster < 0)
        raw = stage_scores(probs, row_valid, kslots, kvalid)
        take = lambda x, idx: jd.gather_tokens(x, seq.first[:, None] + idx)  # noqa: E731
        if stage.info_weight:  # TokenCarve: (debiased) attention and SV ranks fused; padding may still win by SV
            av = debiased_scores(i, raw, seq_raster, kvalid)
            x = take(seq.h, jnp.broadcast_to(jnp.arange(seq.nv), kvalid.shape))  # layer W's input, image rows
            fused = rank_fusion(av, sv_scores(x, kvalid), kvalid, stage.info_weight)
            idx, slot, merged = tokencarve_select(fused, x, kvalid, stage.keep)
            block = [merged.astype(seq.h.dtype), slot, take(seq.raster, idx), take(seq.pos, idx)]
            cache = keep_in_caches(cache, 0, stage.boundary, seq, ~seq.vis | jnp.zeros_like(seq.vis).at[
                jnp.arange(B)[:, None], kslots].set(jd.kept_mask(idx, slot, seq.nv)))
        elif stage.policy == "illava":  # the r + 1 least attended merge into the (N - r)-th, N - r remain
            x = take(seq.h, jnp.broadcast_to(jnp.arange(seq.nv), kvalid.shape))  # layer k's input, image rows
            idx, merged = illava_llm_merge(x, debiased_scores(i, raw, seq_raster, kvalid), seq.nv - stage.keep,
                                           valid=kvalid)
            slot = jnp.take_along_axis(kvalid, idx, axis=1)
            block = [merged.astype(seq.h.dtype), slot, take(seq.raster, idx), take(seq.pos, idx)]
        else:
            idx, slot, _ = debias_and_select(i, raw, seq_raster, kvalid, stage.keep, limits[i, 0])
            block = [take(seq.h, idx), slot, take(seq.raster, idx), take(seq.pos, idx)]
        info["kept"].append((jnp.take_along_axis(seq_raster, idx, axis=1), slot, idx))
        if spec.mode == "mask":  # FastV's mask mode: the tokens stay; later layers (and decode) mask them
            kept_slots = jnp.zeros((B, seq.valid.shape[1]), bool).at[jnp.arange(B)[:, None], kslots].set(
                jd.kept_mask(idx, slot, seq.nv))
            key_keep = ~seq.vis | kept_slots
            if spec.reselect == "every_token":
                if views is not None:
                    raise ValueError("FastV's per-token re-selection (reselect='every_token') is not available on "
                                     "LLaVA-NeXT; use reselect='prefill' or mode='remove'.")
                online = isinstance(curve, str)
                info["reselect"] = MaskReselect(kslots, candidates(i, seq_raster, kvalid), limits[i, 0],
                                                None if online or not debias_on else curve,
                                                stage.boundary, stage.keep, online and debias_on,
                                                debias_on and content is not None)
            else:  # the prefill's selection serves every generated token: its caches drop the pruned keys (after
                fixed_keep = (stage.boundary, key_keep)  # the last segment has written its prompt flags)
            continue
        if stage.recycle:  # SparseVLM: the best pruned tokens by raw score, clustered, follow the kept ones
            pruned = kvalid & ~jd.kept_mask(idx, slot, seq.nv)
            ridx, rslot = jd.select_topk(raw, stage.recycle, valid=pruned)
            info["recycled"].append((ridx, rslot))
            merged, mvalid = dpc_knn_merge(take(seq.h, ridx), rslot, stage.clusters)
            last_pos = jnp.max(jnp.where(slot, block[3], 0), 1, keepdims=True)
            block = [jnp.concatenate([block[0], merged.astype(seq.h.dtype)], 1), jnp.concatenate([slot, mvalid], 1),
                     jnp.concatenate([block[2], jnp.full(mvalid.shape, -1)], 1),
                     jnp.concatenate([block[3], jnp.broadcast_to(last_pos, mvalid.shape)], 1)]
        seq = replace_visual(seq, *block, spec.positions)
    if fixed_keep is not None:
        cache = keep_in_caches(cache, fixed_keep[0], L, seq, fixed_keep[1])
    return lm.logits(layers.last_real(seq.h, seq.valid)), cache, info
