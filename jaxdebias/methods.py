"""Pruning methods as data: each method's schedule of stages, and the one-line spec a user writes.

    spec = jd.PruneSpec("fastv", keep=128, debias=jd.Debias(curve="released", pad_tau=0.5))

The array side (scoring, rating, fusing, merging) is ``jaxdebias.policies``; the names and aliases of the methods
are ``jaxdebias.names``. Axes: N visual tokens of an image (576 for LLaVA-1.5), K kept slots.

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
from jaxdebias.names import METHODS, canonical_method
from jaxdebias.prune import DEFAULT_BUCKETS, bucket


@dataclasses.dataclass(frozen=True)
class Debias:
    """How a method's first-stage scores are corrected (hashable, so it can be a static jit argument).

    curve: None / "off" (no positional weights), "released" (the published curve of the method and ``task``),
      "online" (per-sample fit), or a curve object / ``curve_to_dict`` dict (e.g. from ``Calibration.fit``).
    pad_tau: letterbox-padding threshold (a patch is padding when more than ``pad_tau`` of it is padding), or
      None for no padding suppression. Published: 0.5 (PyramidDrop's debiased variant: 0.01).
    task: benchmark whose released curve is used with curve="released".
    every_stage: also debias later stages (published: first stage only).
    """

    curve: Any = None
    pad_tau: float | None = None
    task: str = "gqa"
    every_stage: bool = False

    def __post_init__(self):
        c = self.curve
        if c == "off":
            c = None
        elif isinstance(c, dict):
            c = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in c.items()))
        elif c is not None and not isinstance(c, (str, tuple)):
            c = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in curve_to_dict(c).items()))
        if isinstance(c, str) and c not in ("released", "online"):
            raise ValueError(f"Debias curve must be None, 'off', 'released', 'online' or a curve, got {c!r}.")
        if self.pad_tau is not None:
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

    def curve_for(self, method: str) -> Curve | str | None:
        if self.curve is None or self.curve == "online":
            return self.curve
        if self.curve == "released":
            return released_curve(method, self.task)
        return curve_from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in self.curve})


@dataclasses.dataclass(frozen=True)
class Stage:
    layer: int  # the first decoder layer that sees only the kept tokens
    keep: int  # visual tokens kept (before bucketing)
    query: str  # "last" | "instruction" | "text" | "image" | "raters"
    source: str  # "tap" | "probe"
    recycle: int = 0  # pruned tokens recycled (the best-scored), merged into ``clusters`` tokens (SparseVLM)
    clusters: int = 0
    merge: int = 0  # the next-best ``merge`` tokens are merged into the kept ones by similarity (TokenCarve)
    info_weight: float = 0.0  # weight of the SVD information score fused with the attention score (TokenCarve)


def _pdrop_ratio(budget: int, n: int = 576, layers=(2, 10, 20), total=32) -> float:
    """PyramidDrop's first-stage ratio r (then r/2, r/4) whose layer-average token count equals ``budget``."""
    spans = [layers[1] - layers[0], layers[2] - layers[1], total - layers[2]]
    return (total * budget - layers[0] * n) / (n * (spans[0] + spans[1] / 2 + spans[2] / 4))


def fastv_stages(keep: int, layer: int = 2) -> tuple[Stage, ...]:
    """FastV (Chen et al., ECCV 2024): at layer K = 2, keep the ``keep`` image tokens the last token attended to
    most in layer K - 1 (heads averaged); original positions kept."""
    return (Stage(layer, keep, "last", "tap"),)


def pdrop_stages(keep: int, layers=(2, 10, 20), n: int = 576, num_layers: int = 32) -> tuple[Stage, ...]:
    """PyramidDrop (Xing et al., CVPR 2025), as run in the debiasing paper's LLaVA-1.5 setting: stages at
    layers [2, 10, 20] keeping r, r/2, r/4 of the 576 tokens, with r = 0.32 for the 128-token average budget
    (r derived the same way for other budgets). Scores: the last instruction token's attention in the stage
    layer itself, recomputed at every stage."""
    r = 0.32 if keep == 128 and tuple(layers) == (2, 10, 20) else _pdrop_ratio(keep, n, layers, num_layers)
    if not 0 < r <= 1:
        raise ValueError(f"No PyramidDrop schedule at layers {layers} averages {keep} tokens (ratio {r:.3f}).")
    return tuple(Stage(layer, max(1, round(n * r / 2**i)), "instruction", "probe") for i, layer in enumerate(layers))


def himap_stages(keep: int, layers=(2, 8), second_ratio: float = 0.5) -> tuple[Stage, ...]:
    """HiMAP-style two stages: text-to-image attention (all text after the image) before ``layers[0]``, then
    image-to-image attention before ``layers[1]`` keeping ``second_ratio`` of the survivors. The layer and ratio
    defaults here are ours, not taken from the HiMAP release; set them to the paper's for a faithful run."""
    return (Stage(layers[0], keep, "text", "tap"),
            Stage(layers[1], max(1, round(keep * second_ratio)), "image", "tap"))


def tokencarve_stages(keep: int, layer: int = 2, merge: int | None = None, info_weight: float = 0.5,
                      n: int = 576) -> tuple[Stage, ...]:
    """TokenCarve (Tan et al., 2025, arXiv 2503.10501), reconstructed from our recollection of the paper's method
    (neither the paper nor its release could be fetched where this was written; the layer, the score fusion and
    the merge count below are ours, not checked against either).
    The paper ties accuracy loss to the information lost from the attention output matrix; here, one stage before
    decoder layer ``layer`` (2, as FastV): each visual token gets an attention score (the last token's attention
    in layer ``layer - 1``, heads averaged - the signal the debiasing plugs into) and an information score (its
    row's contribution to the singular values of layer ``layer - 1``'s attention output over the visual rows,
    ``information_scores``); both are min-max normalised and fused with weight ``info_weight`` on the information
    score (``carve_scores``).
    The ``keep`` best-fused tokens stay; the next ``merge`` best (default ``keep``, at most what remains) are
    merged into the kept token they are most similar to (cosine of hidden states, ``merge_into``): information
    from pruned-but-useful tokens is folded into the survivors instead of dropped. Positions are re-indexed."""
    merge = min(keep, max(n - keep, 0)) if merge is None else merge
    return (Stage(layer, keep, "last", "tap", merge=merge, info_weight=info_weight),)


SPARSEVLM_KEEPS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


def sparsevlm_stages(keep: int, layers=(2, 6, 15), n: int = 576, recycle: float = 0.3,
                     per_cluster: int = 10) -> tuple[Stage, ...]:
    """SparseVLM (Zhang et al., ICML 2025) on LLaVA-1.5, as we read its v1 release: text raters (the text tokens
    after the image whose mean relevance to the visual tokens is at least the average, see ``text_raters``) vote
    with the attention of decoder layers 2, 6 and 15 (heads and raters averaged), and from those layers on only
    300/200/110 (budget 192), 303/110/36 (128) or 66/30/17 (64) visual tokens remain: the lists' averages over
    the 32 layers (2 x 576 + 4 x l1 + 9 x l2 + 17 x l3) / 32 = 188, 124 and 62 match the budgets only when the
    sparsification layer itself already runs on the kept tokens, so the scores are that layer's attention
    computed for the rater rows before it runs ("probe"). Of the tokens pruned at a stage, the
    int(0.3 * pruned) + 1 best-scored are recycled: grouped into int(recycled / 10) + 1 clusters (DPC-KNN,
    ``dpc_knn_merge``) whose means follow the kept tokens. Positions are re-indexed. Other budgets scale the 128
    list (ours). The lists and the 0.3 / 10 constants are from our reading of the release, not checked against
    its code in this repository's sessions; the paper's rank-adaptive deletion count is replaced by the fixed
    lists (as in the released LLaVA scripts), which also keeps shapes static."""
    ks = SPARSEVLM_KEEPS.get(keep) or tuple(max(1, round(k * keep / 128)) for k in SPARSEVLM_KEEPS[128])
    stages, prev = [], n
    for layer, k in zip(layers, ks):
        k = min(k, prev)
        pruned = prev - k
        r = int(pruned * recycle) + 1 if pruned > 0 else 0
        c = int(r / per_cluster) + 1 if r else 0
        stages.append(Stage(layer, k, "raters", "probe", recycle=r, clusters=c))
        prev = k + c
    return tuple(stages)


METHOD_DEFAULTS = {
    "fastv": dict(positions="keep"),
    "pdrop": dict(positions="keep"),
    "himap": dict(positions="keep"),
    "visionzip": dict(positions="reindex"),
    "sparsevlm": dict(positions="reindex"),
    "tokencarve": dict(positions="reindex"),
}


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """One line that says how to prune.

    method: "fastv", "pdrop" (alias "pyramiddrop"), "himap", "sparsevlm", "tokencarve" or "visionzip".
    keep: visual tokens kept (FastV, HiMAP first stage, TokenCarve, VisionZip) or the layer-average budget
      (PyramidDrop, SparseVLM).
    layer: pruning layer for FastV and TokenCarve (default 2).
    stages: explicit ``Stage`` tuple, overriding the method's schedule.
    debias: a ``Debias``; positions: "keep" / "reindex" (default: the method's).
    buckets: keep counts are rounded up to these (static shapes).
    visionzip_contextual: contextual (merged) tokens for VisionZip (published: 10 / 20 / 30 for 64 / 128 / 192).
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

    def __post_init__(self):
        m = canonical_method(self.method)
        object.__setattr__(self, "method", m)
        _checks.check_positive_int("keep", self.keep)
        pos = self.positions or METHOD_DEFAULTS[m]["positions"]
        if pos not in ("keep", "reindex"):
            raise ValueError(f"positions must be 'keep' or 'reindex', got {pos!r}.")
        object.__setattr__(self, "positions", pos)

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
            stages = tokencarve_stages(self.keep, 2 if self.layer is None else self.layer, n=n_visual)
        else:
            stages = ()
        prev_layer, prev_keep = 0, n_visual
        for s in stages:
            if not prev_layer < s.layer < num_layers:
                raise ValueError(f"{self.method}: stage layer {s.layer} must be in {prev_layer + 1}..{num_layers - 1} "
                                 f"(the model has {num_layers} decoder layers).")
            if not 0 < s.keep <= prev_keep:
                raise ValueError(f"{self.method}: stage at layer {s.layer} keeps {s.keep} tokens but only {prev_keep} "
                                 "remain; --keep must not exceed the visual tokens.")
            if s.merge < 0 or s.keep + s.merge > prev_keep:
                raise ValueError(f"{self.method}: stage at layer {s.layer} keeps {s.keep} and merges {s.merge} more "
                                 f"tokens but only {prev_keep} remain; lower keep or merge.")
            if not 0 <= s.info_weight <= 1:
                raise ValueError(f"{self.method}: info_weight must be in [0, 1], got {s.info_weight}.")
            if s.info_weight and s.source != "tap":
                raise ValueError(f"{self.method}: info_weight needs source 'tap' (the information score is computed "
                                 f"on layer {s.layer - 1}'s attention output), got {s.source!r}.")
            if s.recycle < s.clusters or (s.recycle and s.keep + s.recycle > prev_keep):
                raise ValueError(f"{self.method}: stage at layer {s.layer} recycles {s.recycle} of the "
                                 f"{prev_keep - s.keep} pruned tokens into {s.clusters} clusters; need clusters <= "
                                 "recycled <= pruned.")
            prev_layer, prev_keep = s.layer, s.keep + s.clusters
        if self.method == "visionzip" and self.keep > n_visual:
            raise ValueError(f"visionzip: keep={self.keep} exceeds the {n_visual} visual tokens.")
        return stages

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
        shaped, prev = [], n_visual
        for s in stages:
            # recycling stages keep exact counts (their cluster counts follow from them): one program per budget
            keep = s.keep if s.recycle else self.bucketed(s.keep, prev)
            merge = self.bucketed(s.merge, prev) if s.merge else 0
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


__all__ = ["Debias", "PruneSpec", "Stage", "contextual_split", "fastv_stages", "himap_stages", "pdrop_stages",
           "sparsevlm_stages", "tokencarve_stages", "METHODS"]
