"""A pruning request and its plan.

    spec = jd.PruneSpec("fastv", keep=128, debias=jd.Debias(curve="released", pad_tau=0.5))
    plan, limits = spec.plan(n_visual=576, num_layers=32)

``PruneSpec`` is what the user asks for: a method (``jaxdebias.methods``), a budget ``keep`` (what it counts is the
method's: ``jd.methods.get(name).budget``), the debias step, how to decode. ``plan`` turns it into the static
``Plan`` a prefill compiles - the method's stages with every count rounded up to a bucket - and the run-time
``limits`` (the real counts, which mask the surplus slots), so requests whose budgets share buckets share one
program. No plan means the dense prefill.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdebias import _checks, methods
from jaxdebias.curves import Curve, curve_from_dict, curve_to_dict, published_curve
from jaxdebias.masks import GEOMETRIES
from jaxdebias.methods import EncoderStage, Stage
from jaxdebias.prune import DEFAULT_BUCKETS, bucket

BEYOND_BUCKETS = 64  # past the largest bucket, keep counts round up to multiples of this

POSITIONS = ("original", "reindex")
DECODES = ("fast", "released")
PRESETS = ("paper", "before", "after")


def released_curve(method: str, task: str = "default") -> Curve:
    """The published positional-debiasing curve for a pruning method (name or alias) and benchmark.

    Args:
      method: "fastv", "himap", "pdrop" (alias "pyramiddrop"), "sparsevlm" or "tokencarve".
      task: benchmark name (e.g. "gqa", "pope", "textvqa"); FastV has one curve for all tasks.

    Raises:
      KeyError: unknown method or task; the message lists the known ones.
    """
    key = methods.METHOD_ALIASES.get(str(method).lower(), str(method).lower())
    return published_curve(key, task)


@dataclasses.dataclass(frozen=True)
class Debias:
    """How a method's first-stage scores are corrected (hashable, so it can be a static jit argument).

    curve: None / "off" (no positional weights), "released" (the published curve of the method and ``task``),
      "online" (per-sample fit), or a curve object / ``curve_to_dict`` dict (e.g. from ``Calibration.fit``), or a
      list of those, one per view of a multi-view image (LLaVA-NeXT: base view, tile grid; ``jd.debias_views``).
    pad_tau: letterbox-padding threshold (a patch is padding when more than ``pad_tau`` of it is padding),
      "released" (each method's released threshold and mask geometry), or None for no padding suppression.
    task: benchmark whose released curve is used with curve="released".
    every_stage: also debias later stages (published: first stage only).
    pad_geometry: the padding-mask geometry (``jd.pad_mask_expand2square``), None: the method's released one with
      ``pad_tau="released"``, else "continuous".

    ``Debias.preset(name, method)`` gives the debias code's three settings by name (``PRESETS``).
    """

    curve: Any = None
    pad_tau: float | str | None = None
    task: str = "gqa"
    every_stage: bool = False
    pad_geometry: str | None = None

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
        if self.pad_geometry is not None and self.pad_geometry not in GEOMETRIES:
            raise ValueError(f"Debias pad_geometry must be one of {', '.join(GEOMETRIES)} or None, got "
                             f"{self.pad_geometry!r}.")
        object.__setattr__(self, "curve", c)

    @classmethod
    def preset(cls, name: str, method: str, task: str = "gqa") -> Debias:
        """The debias code's three settings for ``method`` (intcomp/attention-bias@e75ebe7, the eval scripts'
        ``--tag``): "paper" - nothing, the method as its authors released it; "before" - padding suppressed as the
        method's patch does it (FastV: the ``unpad_mask`` geometry, its budget capped at the content; the others:
        their released threshold and geometry), no curve; "after" - padding as released and the method's released
        curve for ``task`` (the padding alone where no curve was published: VisionZip, iLLaVA). A baseline that
        scores nothing (random, pool) gets "paper" whatever the name."""
        if name not in PRESETS:
            raise ValueError(f"Debias preset must be one of {', '.join(PRESETS)}, got {name!r}.")
        m = methods.get(method)
        if name == "paper" or not m.debias:
            return cls()
        if name == "before":
            return cls(pad_tau="released", task=task, pad_geometry=m.before_geometry)
        after = cls(curve="released", pad_tau="released", task=task)
        try:
            after.curve_for(m.name)
        except KeyError:  # no published curve for this method and task
            return cls(pad_tau="released", task=task)
        return after

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
        return methods.get(method).pad_tau if self.pad_tau == "released" else self.pad_tau

    def geometry_for(self, method: str) -> str:
        """The padding-mask geometry: ``pad_geometry`` if set, else the method's released one with
        ``pad_tau="released"`` (SparseVLM: a bilinearly resized mask), else the letterbox overlap ("continuous")."""
        if self.pad_geometry is not None:
            return self.pad_geometry
        return methods.get(method).pad_geometry if self.pad_tau == "released" else "continuous"

    def curve_for(self, method: str) -> Curve | str | None:
        if self.curve is None or self.curve == "online":
            return self.curve
        if self.curve == "released":
            return released_curve(method, self.task)
        if self.curve[0] == "views":
            return tuple(Debias(curve=dict(v)).curve_for(method) for v in self.curve[1])
        return curve_from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in self.curve})


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static side of a request: what a prefill compiles (hashable; a jit static argument).

    method: the canonical name (for messages and records); encoder: the encoder stage with its bucketed counts,
    or None; stages: the decoder stages with their bucketed counts; positions: "original" | "reindex";
    mode: "remove" (pruned tokens leave the sequence and the caches) | "mask" (they stay, later layers mask their
    keys); reselect: "prefill" | "every_token" (see ``PruneSpec``); debias, pad_tau, pad_geometry: the debias
    step and the padding threshold and geometry it runs with; pad_candidates: whether zeroed padding stays a
    candidate."""

    method: str
    encoder: EncoderStage | None
    stages: tuple
    positions: str
    mode: str
    reselect: str
    debias: Debias
    pad_tau: float | None
    pad_geometry: str
    pad_candidates: bool

    def decoder_visual(self, n: int) -> int:
        """Visual tokens the decoder receives for an image of ``n``."""
        return n if self.encoder is None else self.encoder.size


@dataclasses.dataclass(frozen=True)
class PruneSpec:
    """One line that says how to prune.

    method: a name or alias of ``jaxdebias.methods`` (fastv, pdrop, sparsevlm, himap, tokencarve, visionzip,
      illava, random, pool).
    keep: the budget, as the papers' ``--keep``; what it counts is the method's (``methods.get(m).budget``):
      tokens kept after the stage (FastV, TokenCarve, iLLaVA's LLM stage), a layer-average budget (PyramidDrop,
      HiMAP), the key of a released list (SparseVLM), or the tokens the decoder receives (VisionZip, random, pool).
    layer: the stage layer for the single-stage methods (FastV, TokenCarve: 2; iLLaVA: 8).
    stages: an explicit ``Stage`` tuple, overriding the method's schedule.
    debias: a ``Debias``; positions: "original" / "reindex" (default: the method's).
    buckets: keep counts are rounded up to these (static shapes); past the largest, to multiples of 64.
    options: the method's own settings (``methods.get(m).options``), a dict, e.g. VisionZip's
      ``{"contextual": 10}``, iLLaVA's ``{"vit_layers": (5, 6, 7, 8), "vit_r": 72}``, random's ``{"seed": 0}``.
    decode: "fast" (the selection made at prefill serves every generated token, from the pruned caches) or
      "released" (as the method's release decodes: FastV re-selects in mask mode at every token, HiMAP reruns
      the pruned prefill per token without a cache; the others as "fast").
    mode, reselect: override what ``decode`` picks. mode "remove" | "mask" (FastV's mask mode: nothing is
      removed, layers >= K mask the pruned image keys; one tap stage only); reselect "prefill" | "every_token"
      (with mode "mask" each new token re-selects from its own layer-(K-1) row; with mode "remove" the pruned
      prefill is recomputed for every token, the generated tokens joining the text rows, without a KV cache).
    """

    method: str = "fastv"
    keep: int = 128
    layer: int | None = None
    stages: tuple | None = None
    debias: Debias = Debias()
    positions: str | None = None
    buckets: tuple = DEFAULT_BUCKETS
    options: Any = ()
    decode: str = "fast"
    mode: str | None = None
    reselect: str | None = None

    def __post_init__(self):
        m = methods.get(self.method)
        object.__setattr__(self, "method", m.name)
        _checks.check_positive_int("keep", self.keep)
        pos = {"keep": "original"}.get(self.positions, self.positions) or m.positions
        if pos not in POSITIONS:
            raise ValueError(f"positions must be 'original' or 'reindex', got {self.positions!r}.")
        object.__setattr__(self, "positions", pos)
        opts = dict(self.options)
        unknown = sorted(set(opts) - set(m.option_defaults()))
        if unknown:
            raise ValueError(f"{m.name} has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(m.option_defaults()) or 'none'}.")
        object.__setattr__(self, "options", tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                         for k, v in opts.items())))  # the ones given
        if self.decode not in DECODES:
            raise ValueError(f"decode must be 'fast' or 'released', got {self.decode!r}.")
        mode, reselect = m.decode if self.decode == "released" else ("remove", "prefill")
        object.__setattr__(self, "mode", self.mode or mode)
        object.__setattr__(self, "reselect", self.reselect or reselect)
        if self.mode not in ("remove", "mask"):
            raise ValueError(f"mode must be 'remove' or 'mask', got {self.mode!r}.")
        if self.reselect not in ("prefill", "every_token"):
            raise ValueError(f"reselect must be 'prefill' or 'every_token', got {self.reselect!r}.")
        if self.debias.enabled and not m.debias:
            raise ValueError(f"{m.name} scores no token, so debiasing does not apply to it; pass "
                             "debias=jd.Debias() (--debias off).")

    def resolved_options(self, family: str | None = None) -> dict:
        """Every option: the ones given, over the method's defaults for the model family (``option_family``)."""
        return {**methods.get(self.method).option_defaults(family), **dict(self.options)}

    def option(self, name: str, family: str | None = None):
        return self.resolved_options(family)[name]

    @property
    def pad_candidates(self) -> bool:
        """Whether zero-scored padding stays a top-k candidate (the releases except FastV's)."""
        return methods.get(self.method).pad_candidates

    def encoder(self, n_visual: int, family: str | None = None) -> EncoderStage | None:
        """The method's encoder stage for an image of ``n_visual`` tokens (None: the decoder sees all N)."""
        m = methods.get(self.method)
        return None if m.encoder is None else m.encoder(self.keep, n_visual, self.resolved_options(family))

    def schedule(self, n_visual: int, num_layers: int, family: str | None = None) -> tuple[Stage, ...]:
        """The decoder stages, checked against the model: layers in 1..L-1 increasing, keeps decreasing and
        within what remains."""
        return self._checked(n_visual, num_layers, family)[1]

    def _checked(self, n_visual: int, num_layers: int, family: str | None = None
                 ) -> tuple[EncoderStage | None, tuple[Stage, ...]]:
        """(the encoder stage or None, the decoder stages), both checked against the model."""
        m = methods.get(self.method)
        stages = tuple(self.stages) if self.stages is not None else m.stages(
            self.keep, self.layer, n_visual, num_layers, self.resolved_options(family))
        enc = self.encoder(n_visual, family)
        if enc is not None:
            enc.check(n_visual, self.method)
        prev_layer, prev = 0, n_visual if enc is None else enc.size
        for s in stages:
            s.validate(prev_layer, prev, num_layers, self.method)
            prev_layer, prev = s.boundary, s.keep + s.extra
        if self.mode == "mask" and (len(stages) != 1 or stages[0].source != "tap" or not stages[0].maskable
                                    or enc is not None):
            raise ValueError(f"{self.method}: mode='mask' (FastV's mask mode) needs one plain 'tap' stage; use "
                             "method 'fastv' or mode='remove'.")
        return enc, stages

    def bucketed(self, keep: int, most: int) -> int:
        """``keep`` rounded up to a bucket, past the largest one to a multiple of ``BEYOND_BUCKETS`` (LLaVA-NeXT and
        OneVision spans run to thousands of tokens: rounding a budget of 729 up to the whole span would save
        nothing), never past ``most``."""
        return min(bucket(keep, self.buckets, then_every=BEYOND_BUCKETS), most)

    def plan(self, n_visual: int, num_layers: int, family: str | None = None) -> tuple[Plan, tuple[int, ...]]:
        """(the static ``Plan``, the real budget of each stage: the encoder stage's first if any). The plan has
        every bucketed count rounded up, so requests whose budgets share buckets share one compiled program; the
        real counts are passed at run time and mask the surplus slots. ``family``: the model's option family
        (``VisualModel.option_family``: the defaults a release publishes for that model; None: the base ones)."""
        enc, stages = self._checked(n_visual, num_layers, family)
        limits = () if enc is None else (enc.budget,)
        if enc is not None:
            enc = enc.shaped(lambda k, most: self.bucketed(k, most or n_visual))
        shaped, prev = [], n_visual if enc is None else enc.size
        for s in stages:
            shaped.append(dataclasses.replace(s, keep=None, slots=self.bucketed(s.keep, prev)) if s.bucketed
                          else dataclasses.replace(s, slots=s.keep))
            limits += (s.keep,)
            prev = shaped[-1].slots + s.extra
        m = methods.get(self.method)
        tau = self.debias.tau_for(self.method)
        plan = Plan(self.method, enc, tuple(shaped), self.positions, self.mode, self.reselect, self.debias, tau,
                    self.debias.geometry_for(self.method), m.pad_candidates)
        return plan, limits


__all__ = ["DECODES", "Debias", "POSITIONS", "PRESETS", "Plan", "PruneSpec", "released_curve"]
