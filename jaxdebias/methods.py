"""Pruning methods as data: each method's schedule of stages, and the one-line spec a user writes.

    spec = jd.PruneSpec("fastv", keep=128, debias=jd.Debias(curve="released", pad_tau=0.5))

Each method's released schedule is ``jaxdebias.stages``; the array side (scoring, rating, fusing, merging) is
``jaxdebias.policies``; the names and aliases of the methods are ``jaxdebias.names``. Axes: N visual tokens of an image (576 for LLaVA-1.5), K kept slots.

A method is a schedule of stages ``(layer, keep)`` - before decoder layer ``layer`` only ``keep`` visual tokens
remain - plus how each stage scores the visual tokens:

  query    which rows vote: "last" (last prompt token), "instruction" (last instruction token, given per sample
           or the last token), "text" (every text token after the image), "image" (the image tokens themselves)
  source   "tap": the attention of layer ``layer - 1`` (FastV); "probe": the attention layer ``layer`` would
           compute on its input, computed exactly for the voting rows before the layer runs (PyramidDrop)
  positions  "keep" the original position ids of the kept tokens, or "reindex" them 0..n-1

and what happens to (some of) the pruned tokens: recycled into merged tokens after the kept ones (SparseVLM,
``recycle`` / ``clusters``), or merged into the kept tokens they resemble most (TokenCarve, ``merge``, whose
scores also fuse an SVD information score of the tapped layer's attention output, ``info_weight``).

Debiasing (``Debias``) multiplies the scores of the first stage (or of every stage) by the positional weights
of each token's raster index and zeroes letterbox-padding patches, which are also excluded from selection.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdebias import _checks
from jaxdebias.curves import Curve, curve_from_dict, curve_to_dict, released_curve
from jaxdebias.names import QUERY_KINDS, canonical_method
from jaxdebias.prune import DEFAULT_BUCKETS, bucket
from jaxdebias.policies import ILLAVA_LLAVA15_VIT_LAYERS, ILLAVA_LLAVA15_VIT_R
from jaxdebias.stages import (METHOD_DEFAULTS, Stage, fastv_stages, himap_stages, illava_stages, pdrop_stages,
                              sparsevlm_stages, tokencarve_stages)


@dataclasses.dataclass(frozen=True)
class Debias:
    """How a method's first-stage scores are corrected (hashable, so it can be a static jit argument).

    curve: None / "off" (no positional weights), "released" (the published curve of the method and ``task``),
      "online" (per-sample fit), or a curve object / ``curve_to_dict`` dict (e.g. from ``Calibration.fit``), or a
      list of those, one per view of a multi-view image (LLaVA-NeXT: base view, tile grid; ``jd.debias_views``).
    pad_tau: letterbox-padding threshold (a patch is padding when more than ``pad_tau`` of it is padding),
      "released" (each method's released threshold: 0.5; PyramidDrop 0.01), or None for no padding suppression.
    task: benchmark whose released curve is used with curve="released".
    every_stage: also debias later stages (published: first stage only).
    """

    curve: Any = None
    pad_tau: float | str | None = None
    task: str = "gqa"
    every_stage: bool = False

    def __post_init__(self):
        c = self.curve
        if isinstance(c, list) or (isinstance(c, tuple) and c and c[0] != "views" and not isinstance(c[0], tuple)):
            c = ("views", tuple(Debias(curve=v).curve for v in c))  # one curve per view (LLaVA-NeXT)
        if c == "off":
            c = None
        elif isinstance(c, dict):
            c = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in c.items()))
        elif c is not None and not isinstance(c, (str, tuple)):
            c = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in curve_to_dict(c).items()))
        if isinstance(c, str) and c not in ("released", "online"):
            raise ValueError(f"Debias curve must be None, 'off', 'released', 'online' or a curve, got {c!r}.")
        if isinstance(self.pad_tau, str):
            if self.pad_tau != "released":
                raise ValueError(f"Debias pad_tau must be a fraction, 'released' or None, got {self.pad_tau!r}.")
        elif self.pad_tau is not None:
            _checks.check_fraction("pad_tau", self.pad_tau)
        object.__setattr__(self, "curve", c)

    @classmethod
    def off(cls) -> Debias:
        return cls()

    @classmethod
    def padding(cls, tau: float = 0.5) -> Debias:
        return cls(pad_tau=tau)

    @classmethod
    def full(cls, curve="released", tau: float = 0.5, task: str = "gqa") -> Debias:
        return cls(curve=curve, pad_tau=tau, task=task)

    @property
    def enabled(self) -> bool:
        return self.curve is not None or self.pad_tau is not None

    def tau_for(self, method: str) -> float | None:
        """The padding threshold this method runs with (``pad_tau="released"``: the method's released one)."""
        return METHOD_DEFAULTS[method]["pad_tau"] if self.pad_tau == "released" else self.pad_tau

    def geometry_for(self, method: str) -> str:
        """The padding-mask geometry: the method's released one with ``pad_tau="released"`` (SparseVLM: a
        bilinearly resized mask), else the released letterbox geometry ("continuous")."""
        return METHOD_DEFAULTS[method]["pad_geometry"] if self.pad_tau == "released" else "continuous"

    def curve_for(self, method: str) -> Curve | str | None:
        if self.curve is None or self.curve == "online":
            return self.curve
        if self.curve == "released":
            return released_curve(method, self.task)
        if self.curve[0] == "views":
            return tuple(Debias(curve=dict(v)).curve_for(method) for v in self.curve[1])
        return curve_from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in self.curve})


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """One line that says how to prune.

    method: "fastv", "pdrop" (alias "pyramiddrop"), "himap", "sparsevlm", "tokencarve", "visionzip" or "illava".
    keep: visual tokens kept (FastV, HiMAP first stage, TokenCarve, VisionZip) or the layer-average budget
      (PyramidDrop, SparseVLM).
    layer: pruning layer for FastV and TokenCarve (default 2).
    stages: explicit ``Stage`` tuple, overriding the method's schedule.
    debias: a ``Debias``; positions: "keep" / "reindex" (default: the method's).
    buckets: keep counts are rounded up to these (static shapes).
    visionzip_contextual: contextual (merged) tokens for VisionZip (published: 10 / 20 / 30 for 64 / 128 / 192).
    mode: "remove" (tokens leave the sequence and the caches: the fast default) or "mask" (FastV's released mask
      mode: nothing is removed and layers >= K mask the pruned image keys; one tap stage only).
    reselect: "prefill" (the selection made at prefill serves every generated token: the fast default) or
      "every_token" (as the releases decode: with mode="mask" each new token re-selects from its own layer-(K-1)
      row over the cache (FastV); with mode="remove" the whole pruned prefill is recomputed for every token, the
      generated tokens joining the text rows, without a KV cache (HiMAP)).
    visionzip_cls: the tower's CLS feature is the first dominant token (as in the released code, where
      ``keep = 64`` is CLS + 53 patches + 10 contextual); False keeps ``keep - contextual`` patches instead.
    """

    method: str = "fastv"
    keep: int = 128
    layer: int | None = None
    stages: tuple | None = None
    debias: Debias = Debias()
    positions: str | None = None
    buckets: tuple = DEFAULT_BUCKETS
    visionzip_contextual: int | None = None
    visionzip_cls: bool = True
    illava_vit_layers: tuple = ILLAVA_LLAVA15_VIT_LAYERS
    illava_vit_r: int = ILLAVA_LLAVA15_VIT_R
    mode: str = "remove"
    reselect: str = "prefill"

    def __post_init__(self):
        m = canonical_method(self.method)
        object.__setattr__(self, "method", m)
        _checks.check_positive_int("keep", self.keep)
        pos = self.positions or METHOD_DEFAULTS[m]["positions"]
        if pos not in ("keep", "reindex"):
            raise ValueError(f"positions must be 'keep' or 'reindex', got {pos!r}.")
        object.__setattr__(self, "positions", pos)
        if self.mode not in ("remove", "mask"):
            raise ValueError(f"mode must be 'remove' or 'mask', got {self.mode!r}.")
        if self.reselect not in ("prefill", "every_token"):
            raise ValueError(f"reselect must be 'prefill' or 'every_token', got {self.reselect!r}.")

    def schedule(self, n_visual: int, num_layers: int) -> tuple[Stage, ...]:
        """The stages, checked against the model: layers in 1..L-1 increasing, keeps decreasing and <= N."""
        if self.stages is not None:
            stages = tuple(self.stages)
        elif self.method == "fastv":
            stages = fastv_stages(self.keep, 2 if self.layer is None else self.layer)
        elif self.method == "pdrop":
            stages = pdrop_stages(self.keep, n=n_visual, num_layers=num_layers)
        elif self.method == "himap":
            stages = himap_stages(self.keep)
        elif self.method == "sparsevlm":
            stages = sparsevlm_stages(self.keep, n=n_visual)
        elif self.method == "tokencarve":
            stages = tokencarve_stages(self.keep, 2 if self.layer is None else self.layer)
        elif self.method == "illava":
            stages = illava_stages(self.keep) if self.layer is None else illava_stages(self.keep, self.layer)
        else:
            stages = ()
        prev_layer, prev_keep = 0, self.encoder_tokens(n_visual)
        if prev_keep < 1:
            raise ValueError(f"{self.method}: the encoder stage merges {n_visual - prev_keep} of {n_visual} tokens; "
                             "lower illava_vit_r.")
        for s in stages:
            if s.query not in QUERY_KINDS:
                raise ValueError(f"{self.method}: stage query must be one of {', '.join(QUERY_KINDS)}, got "
                                 f"{s.query!r}.")
            if s.source not in ("tap", "probe", "self"):
                raise ValueError(f"{self.method}: stage source must be 'tap', 'probe' or 'self', got {s.source!r}.")
            if not prev_layer < s.boundary < num_layers or s.layer < 1:
                raise ValueError(f"{self.method}: stage layer {s.layer} must be in {prev_layer + 1}.."
                                 f"{num_layers - 1 - (s.source == 'self')} (the model has {num_layers} decoder "
                                 "layers).")
            if not 0 < s.keep <= prev_keep:
                raise ValueError(f"{self.method}: stage at layer {s.layer} keeps {s.keep} tokens but only {prev_keep} "
                                 "remain; --keep must not exceed the visual tokens.")
            if s.merge < 0 or s.keep + s.merge > prev_keep:
                raise ValueError(f"{self.method}: stage at layer {s.layer} keeps {s.keep} and merges {s.merge} more "
                                 f"tokens but only {prev_keep} remain; lower keep or merge.")
            if not 0 <= s.info_weight <= 1:
                raise ValueError(f"{self.method}: info_weight must be in [0, 1], got {s.info_weight}.")
            if s.info_weight and s.source != "tap":
                raise ValueError(f"{self.method}: info_weight (TokenCarve) needs source 'tap' (the last token's "
                                 f"attention in layer {s.layer - 1}), got {s.source!r}.")
            if s.recycle < s.clusters or (s.recycle and s.keep + s.recycle > prev_keep):
                raise ValueError(f"{self.method}: stage at layer {s.layer} recycles {s.recycle} of the "
                                 f"{prev_keep - s.keep} pruned tokens into {s.clusters} clusters; need clusters <= "
                                 "recycled <= pruned.")
            prev_layer, prev_keep = s.boundary, s.keep + s.clusters
        if self.mode == "mask" and (len(stages) != 1 or stages[0].source != "tap" or stages[0].recycle
                                    or stages[0].info_weight):
            raise ValueError(f"{self.method}: mode='mask' (FastV's mask mode) needs one plain 'tap' stage; use "
                             "method 'fastv' or mode='remove'.")
        if self.method == "visionzip" and self.keep > n_visual:
            raise ValueError(f"visionzip: keep={self.keep} exceeds the {n_visual} visual tokens.")
        return stages

    def encoder_tokens(self, n_visual: int) -> int:
        """Visual tokens the decoder receives: iLLaVA's encoder stage merges ``illava_vit_r`` tokens in each of
        ``illava_vit_layers`` (CLIP layers 5-8 and 72 each for LLaVA-1.5: ours, scaled from OneVision's 92 of 729);
        VisionZip's block has ``keep`` tokens; the other methods get all N."""
        if self.method == "illava":
            return n_visual - len(self.illava_vit_layers) * self.illava_vit_r
        return self.keep if self.method == "visionzip" else n_visual

    @property
    def pad_candidates(self) -> bool:
        """Whether zero-scored padding stays a top-k candidate (the releases except FastV's)."""
        return METHOD_DEFAULTS[self.method]["pad_candidates"]

    def bucketed(self, keep: int, n_visual: int) -> int:
        return min(bucket(keep, self.buckets + (n_visual,)), n_visual)

    def split(self, n_visual: int, num_layers: int) -> tuple[PruneSpec, tuple[tuple[int, int], ...]]:
        """(the static shape of this spec, the real (keep, merge) of each stage). The shape has every keep and
        merge count rounded up to its bucket, so requests whose budgets share buckets share one compiled
        program; the real counts are passed at run time and mask the surplus slots."""
        stages = self.schedule(n_visual, num_layers)
        if self.method == "visionzip":
            dom, ctx = contextual_split(self.keep, self.visionzip_contextual)
            patches = dom - self.visionzip_cls
            if patches < 1:
                raise ValueError(f"visionzip: keep={self.keep} leaves no dominant patch beside the CLS token and "
                                 f"{ctx} contextual tokens; raise keep.")
            shape = dataclasses.replace(self, keep=self.visionzip_cls + self.bucketed(patches, n_visual) + ctx,
                                        visionzip_contextual=ctx, stages=())
            return shape, ((patches, 0),)
        shaped, prev = [], self.encoder_tokens(n_visual)
        for s in stages:
            # recycling stages keep exact counts (their cluster counts follow from them): one program per budget
            # recycling and TokenCarve stages keep exact counts (clusters and halves follow from them): one
            # program per budget
            exact = s.recycle or s.info_weight or s.policy != "topk"
            keep = s.keep if exact else self.bucketed(s.keep, prev)
            merge = s.merge if exact else (self.bucketed(s.merge, prev) if s.merge else 0)
            shaped.append(dataclasses.replace(s, keep=keep, merge=merge))
            prev = keep + s.clusters
        return (dataclasses.replace(self, keep=n_visual, stages=tuple(shaped)),
                tuple((s.keep, s.merge) for s in stages))


def contextual_split(keep: int, contextual: int | None) -> tuple[int, int]:
    """VisionZip's dominant / contextual split: published 54+10, 108+20, 162+30 for 64 / 128 / 192 tokens."""
    ctx = contextual if contextual is not None else max(1, round(keep * 10 / 64)) if keep >= 8 else 0
    if not 0 <= ctx < keep:
        raise ValueError(f"visionzip: contextual tokens ({ctx}) must be fewer than keep ({keep}).")
    return keep - ctx, ctx


__all__ = ["Debias", "PruneSpec", "Stage", "contextual_split"]
