"""What a pruning method is made of: its stages, the ``Block`` every stage hands back, and the ``Method`` record
that the registry (``jaxdebias.methods``) holds, one per method module.

Axes: B batch, M tokens of the stage's visual span (the image, or what earlier stages left of it), K slots of the
block a stage hands back, N raster tokens of the image, D width.

A method is (1) a schedule of decoder stages - before decoder layer ``boundary`` only the stage's block remains
of the visual span - and optionally (2) an encoder stage that shortens the image before the decoder sees it.
Each stage scores nothing itself: the prefill gives it the span's attention scores (raw and after the debias
step), the hidden states and the candidates, and the stage returns a ``Block``. Everything here is pure JAX.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxdebias.names import QUERY_KINDS
from jaxdebias.prune import gather_tokens, select_topk


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
    """What a stage hands back in place of the visual span it was given.

    h: float[B, K, D] the block's features (kept tokens, then any new merged ones); valid: bool[B, K] slots that
    hold a token; span: int[B, K] each slot's index in the stage's input span (-1 for a new, merged token).
    cache_keep: optional bool[B, M]: the input tokens the KV caches of the layers *below* the stage keep (the
    release gathers those caches: TokenCarve); None leaves them whole.
    merged: optional (idx int[B, R], valid bool[B, R]): the input tokens merged into the new slots (SparseVLM's
    recycled tokens), for inspection."""

    h: Any
    valid: Any
    span: Any
    cache_keep: Any = None
    merged: Any = None


@dataclasses.dataclass
class StageInputs:
    """What the prefill gives a decoder stage (all over the stage's visual span of M slots).

    h: float[B, M, D] the span's hidden states (the stage layer's input; its output for source "self");
    raw: float32[B, M] the voting rows' attention (heads, then rows, averaged); scores: float32[B, M] ``raw``
    after the debias step (equal to ``raw`` when not debiasing); valid: bool[B, M] tokens that exist and may be
    kept; candidates: bool[B, M] the tokens a selection may keep (``valid`` minus padding where the method caps
    its budget at the content); limit: int32[] the run-time budget (<= the stage's static keep)."""

    h: Any
    raw: Any
    scores: Any
    valid: Any
    candidates: Any
    limit: Any


@dataclasses.dataclass
class EncoderInputs:
    """What the prefill gives an encoder stage (before the decoder).

    tower: the model's vision tower (``tower(pixels)`` -> float[B, N, Dv] features; ``with_cls_attention`` and
    ``with_merges`` as ``jaxdebias.models.clip.ClipVisionTower``); pixels: its input; n: N raster tokens;
    grid: the raster's side; debias: float[B, N] raster scores -> debiased float32[B, N] (the method's debias
    step, identity when off); candidates: bool[B, N] tokens a content-capped selection may keep; limit: int32[]
    the run-time budget; sample_key: uint32[B] a key per image from its pixels (seeded baselines)."""

    tower: Any
    pixels: Any
    n: int
    grid: int
    debias: Callable
    candidates: Any
    limit: Any
    sample_key: Any


def top_block(inp: StageInputs, keep: int) -> Block:
    """The ``keep`` best candidates by debiased score, ascending, the best ``inp.limit`` of them valid."""
    idx, slot = select_topk(inp.scores, keep, valid=inp.candidates, limit=inp.limit)
    return Block(gather_tokens(inp.h, idx), slot, idx)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A decoder stage that keeps the ``keep`` best-scored tokens (FastV, PyramidDrop, HiMAP); method modules
    subclass it for their own rule (``select``), extra slots (``extra``) and checks (``check``).

    layer: "tap"/"probe": the first decoder layer that sees only the block; "self": the layer whose own attention
      scores the tokens and whose *output* is pruned (``boundary`` is always the first layer after the stage).
    keep: the tokens this stage keeps, as the method's schedule counts them for a request; query: which rows
      vote (``names.QUERY_KINDS``); source: "tap" (the attention of layer ``layer - 1``), "probe" (the attention
      layer ``layer`` would compute on its input, recomputed for the voting rows) or "self" (layer ``layer``'s
      own attention).
    slots: the static size of the block of kept tokens, set by ``PruneSpec.plan`` (``keep`` rounded up to a
      bucket, the surplus masked by the run-time limit; ``keep`` itself for unbucketed stages) and None in a
      schedule. A planned bucketed stage has ``keep=None``: its count is the run-time limit, so budgets that
      share a bucket share a program. Selectors shape their outputs with ``slots``."""

    layer: int
    keep: int | None
    query: str = "last"
    source: str = "tap"
    slots: int | None = None

    bucketed = True  # the static keep rounds up to a bucket and a run-time limit masks the surplus slots
    maskable = True  # a selection that only masks keys (FastV's mask mode) can stand in for it

    @property
    def boundary(self) -> int:
        """The first decoder layer that runs on the pruned sequence."""
        return self.layer + (self.source == "self")

    @property
    def extra(self) -> int:
        """New slots after the kept ones (merged tokens)."""
        return 0

    def check(self, prev: int, method: str) -> None:
        """Raises a ValueError when this stage cannot run on ``prev`` remaining tokens."""

    def select(self, inp: StageInputs) -> Block:
        return top_block(inp, self.slots)

    def validate(self, prev_layer: int, prev: int, num_layers: int, method: str) -> None:
        """The checks every stage shares, then the subclass's ``check``."""
        if self.query not in QUERY_KINDS:
            raise ValueError(f"{method}: stage query must be one of {', '.join(QUERY_KINDS)}, got {self.query!r}.")
        if self.source not in ("tap", "probe", "self"):
            raise ValueError(f"{method}: stage source must be 'tap', 'probe' or 'self', got {self.source!r}.")
        if not prev_layer < self.boundary < num_layers or self.layer < 1:
            raise ValueError(f"{method}: stage layer {self.layer} must be in {prev_layer + 1}.."
                             f"{num_layers - 1 - (self.source == 'self')} (the model has {num_layers} decoder "
                             "layers).")
        if not 0 < self.keep <= prev:
            raise ValueError(f"{method}: stage at layer {self.layer} keeps {self.keep} tokens but only {prev} "
                             "remain; --keep must not exceed the visual tokens.")
        self.check(prev, method)


@dataclasses.dataclass(frozen=True)
class EncoderStage(abc.ABC):
    """A stage before the decoder: ``encode`` returns a block of ``size`` tower-space features (the prefill
    projects them) whose ``span`` indexes the N raster tokens (-1 for merged ones). ``budget`` is the run-time
    limit the prefill passes (``EncoderInputs.limit``); ``shaped`` the stage with its counts rounded up to
    buckets (one program per bucket)."""

    size: int

    @property
    def budget(self) -> int:
        return self.size

    def shaped(self, bucketed: Callable[[int, int], int]) -> EncoderStage:
        """This stage with its counts rounded by ``bucketed(count, most)``."""
        return self

    @abc.abstractmethod
    def encode(self, inp: EncoderInputs) -> Block:
        """The block the decoder receives in place of the image (each method's own rule)."""

    def check(self, n: int, method: str) -> None:
        """Raises a ValueError when the stage cannot run on an image of ``n`` tokens."""

    def view_tokens(self, p: int) -> int | None:
        """The tokens this stage leaves of each ``p``-token view when it runs on every view (or frame) of a
        multi-view input by itself (LLaVA-OneVision); None: it runs on one single-view image only."""
        return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method, as its module defines it (the registry's value).

    name / aliases: what users type; source: the release it follows (repo@commit:path).
    stages(keep, layer, n, num_layers, options) -> tuple[Stage, ...]: the released schedule for a budget.
    encoder(keep, n, options) -> EncoderStage | None: its encoder stage, if any.
    positions: "original" (kept tokens keep their position ids) or "reindex" (0..n-1 after each stage).
    pad_tau, pad_geometry: the released padding threshold and mask geometry ("continuous" letterbox overlap, or
      "bilinear": SparseVLM's resized 0/1 mask); pad_candidates: whether zero-scored padding stays a candidate
      (False: the budget is capped at the content tokens, as FastV's release does); before_geometry: the mask
      geometry of the debias code's "before" setting (padding only), None: ``pad_geometry``.
    decode: the release's decoding, (mode, reselect): ("remove", "prefill") the pruned KV caches at their
      positions; ("mask", "every_token") FastV's mask mode re-selecting for every new token; ("remove",
      "every_token") no cache, the whole pruned prefill rerun per token (HiMAP).
    debias: whether the debias step applies (False for baselines that score nothing); options: the method's
      own settings and their defaults (``PruneSpec(options=...)``); family_options: ((model family, options),
      ...) the defaults a release publishes for another model (``VisualModel.option_family``: e.g. iLLaVA's
      "llava_onevision"), over ``options``; budget: what ``keep`` means for it."""

    name: str
    source: str
    stages: Callable
    budget: str
    aliases: tuple = ()
    encoder: Callable | None = None
    positions: str = "original"
    pad_tau: float = 0.5
    pad_geometry: str = "continuous"
    pad_candidates: bool = True
    before_geometry: str | None = None
    decode: tuple = ("remove", "prefill")
    debias: bool = True
    options: tuple = ()
    family_options: tuple = ()

    def option_defaults(self, family: str | None = None) -> dict:
        """The option defaults for a model family (None: the base ones, LLaVA-1.5's)."""
        return {**dict(self.options), **dict(dict(self.family_options).get(family, ()))}


def no_stages(keep, layer, n, num_layers, options) -> tuple:
    """The schedule of an encoder-only method."""
    return ()

