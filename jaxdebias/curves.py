"""Positional-debiasing curves: a weight per visual-token index that divides out the recency trend.

Axes: N visual tokens (raster order), ``...`` any leading batch axes of the curve parameters.

A curve describes a trend ``t_i`` of attention against token index ``i``; its weights are ``w_i = t_0 / t_i``
(so ``w_0 = 1``), applied multiplicatively as published: ``s~_i = s_i * w_i``.

  ExpCurve(b)              t_i = exp(b i)                    w_i = exp(-b i)
  PolyInverseCurve(c)      t_i = c0 + c1 i + c2 i^2 + c3 i^3  w_i = 1 / t_i   (c0 = 1 in the released curve)
  ExpConstCurve(a, b, c)   t_i = a exp(-b i) + c              w_i = t_0 / t_i

The released curves (arXiv 2508.17807, LLaVA-1.5-7B, 576 tokens) are in ``RELEASED`` and
``published_curve(method, task)`` (``jd.released_curve`` with aliases).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxdebias import _checks


def _index(n: int):
    return jnp.arange(_checks.check_positive_int("n", n), dtype=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpCurve:
    """``w_i = exp(-b * i)``. ``b``: float[...] (a scalar for one curve, [B] for per-sample fits)."""

    b: Any

    def weights(self, n: int):
        """float[..., N] weights for the first ``n`` indices."""
        return jnp.exp(-jnp.asarray(self.b, jnp.float32)[..., None] * _index(n))

    def trend(self, n: int):
        return 1.0 / self.weights(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolyInverseCurve:
    """``w_i = 1 / (c0 + c1 i + c2 i^2 + c3 i^3)``. ``coeffs``: float[..., 4], lowest order first."""

    coeffs: Any

    def trend(self, n: int):
        c = jnp.asarray(self.coeffs, jnp.float32)
        if c.shape[-1:] != (4,):
            raise ValueError(f"PolyInverseCurve needs 4 coefficients (c0..c3) on the last axis, got {c.shape}.")
        i = _index(n)
        return c[..., 0:1] + i * (c[..., 1:2] + i * (c[..., 2:3] + i * c[..., 3:4]))

    def weights(self, n: int):
        """float[..., N] weights for the first ``n`` indices."""
        return 1.0 / self.trend(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpConstCurve:
    """Trend ``a * exp(-b i) + c``; weights ``t_0 / t_i``. ``a, b, c``: float[...]."""

    a: Any
    b: Any
    c: Any

    def trend(self, n: int):
        a, b, c = (jnp.asarray(v, jnp.float32)[..., None] for v in (self.a, self.b, self.c))
        return a * jnp.exp(-b * _index(n)) + c

    def weights(self, n: int):
        """float[..., N] weights for the first ``n`` indices."""
        t = self.trend(n)
        return t[..., :1] / t


Curve = ExpCurve | PolyInverseCurve | ExpConstCurve

# Fitted parameters of the released weight vectors (LLaVA-1.5-7B, 576 raster-order tokens).
RELEASED_EXP_B: dict[str, dict[str, float]] = {
    "himap": {"mme": 0.0020413506, "gqa": 0.0021722568, "mmvet": 0.001702755, "mmbench": 0.0016093597,
              "mmbench_cn": 0.0014799307, "pope": 0.0022530801, "scienceqa": 0.0017070979,
              "textvqa": 0.001478925, "vizwiz": 0.0019711961, "vqav2": 0.0022143097},
    "pdrop": {"mme": 0.0032655618, "gqa": 0.00398927, "mmvet": 0.004133642, "mmbench": 0.0026518678,
              "mmbench_cn": 0.002596662, "pope": 0.004050629, "scienceqa": 0.0026984936,
              "textvqa": 0.0031467345, "vizwiz": 0.0025189131, "vqav2": 0.0037560006},
    "sparsevlm": {"gqa": 0.0023013043, "mmbench": 0.0031956871, "mmbench_cn": 0.0025989376,
                  "mme": 0.0038027609, "mmvet": 0.0042248207, "pope": 0.0046370373,
                  "scienceqa": 0.0029924109, "textvqa": 0.0031476141, "vizwiz": 0.0027420354,
                  "vqav2": 0.0041211015},
    "tokencarve": {"mme": 0.00146952, "gqa": 0.0016684029, "mmbench": 0.0012950863,
                   "mmbench_cn": 0.001112505, "mmvet": 0.0016965959, "pope": 0.0017148365,
                   "scienceqa": 0.0011797076, "textvqa": 0.0011802722, "vizwiz": 0.0014307176,
                   "vqav2": 0.0016965959},
}
# FastV's released curve is one polynomial for every task.
RELEASED_POLY3_INVERSE: dict[str, tuple[float, float, float, float]] = {
    "fastv": (0.9999999999999999, 0.00301519760334635, -1.4597908344382146e-05, 2.5691135190170128e-08),
}
def published_curve(method: str, task: str = "default") -> Curve:
    """The published positional-debiasing curve for a pruning method (its canonical name; ``jd.released_curve``
    also takes aliases) and benchmark.

    Args:
      method: "fastv", "himap", "pdrop", "sparsevlm" or "tokencarve".
      task: benchmark name (e.g. "gqa", "pope", "textvqa"); FastV has one curve for all tasks.

    Raises:
      KeyError: unknown method or task; the message lists the known ones.
    """
    key = method.lower()
    if key in RELEASED_POLY3_INVERSE:
        return PolyInverseCurve(jnp.asarray(RELEASED_POLY3_INVERSE[key], jnp.float32))
    if key not in RELEASED_EXP_B:
        known = sorted([*RELEASED_EXP_B, *RELEASED_POLY3_INVERSE])
        raise KeyError(f"No released curve for method {method!r}. Known methods: {', '.join(known)}.")
    tasks = RELEASED_EXP_B[key]
    if task.lower() not in tasks:
        raise KeyError(f"No released {key} curve for task {task!r}. Known tasks for {key}: "
                       f"{', '.join(sorted(tasks))}.")
    return ExpCurve(jnp.float32(tasks[task.lower()]))


def curve_to_dict(curve: Curve) -> dict:
    """A JSON-ready description of a (single, unbatched) curve; inverse of ``curve_from_dict``."""
    if isinstance(curve, ExpCurve):
        return {"form": "exp", "b": float(curve.b)}
    if isinstance(curve, PolyInverseCurve):
        return {"form": "poly3_inverse", "coeffs": [float(c) for c in jnp.asarray(curve.coeffs)]}
    if isinstance(curve, ExpConstCurve):
        return {"form": "exp+c", "a": float(curve.a), "b": float(curve.b), "c": float(curve.c)}
    if isinstance(curve, (tuple, list)):  # one curve per view of a multi-view image (LLaVA-NeXT)
        return {"form": "views", "views": [curve_to_dict(c) for c in curve]}
    raise TypeError(f"Not a curve: {type(curve).__name__}.")


def _finite(v) -> bool:
    """A JSON number that is finite as a float32 (``1e39`` and a 400-digit integer are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= 3.4e38
    except OverflowError:
        return False


def curve_from_dict(d: dict) -> Curve:
    """Builds a curve from ``curve_to_dict`` output (e.g. a calibrated ``curve.json``). Raises ValueError for an
    unknown form, a missing field, or a parameter that is not a finite number (a NaN curve would zero every
    score and keep nothing)."""
    if not isinstance(d, dict):
        raise ValueError(f"A curve is a JSON object with a 'form' field, got {type(d).__name__}.")
    form = d.get("form")
    for name, value in d.items():
        if name in ("form", "views"):
            continue
        listed = name == "coeffs"  # poly3_inverse's coefficients; every other parameter is one number
        values = value if listed and isinstance(value, (list, tuple)) else [value]
        if not values or not all(_finite(v) for v in values):
            kind = "a list of finite numbers" if listed else "a finite number"
            raise ValueError(f"Curve parameter {name!r} must be {kind}, got {value!r}.")
    try:
        if form == "exp":
            return ExpCurve(jnp.float32(d["b"]))
        if form == "poly3_inverse":
            if not isinstance(d["coeffs"], (list, tuple)) or len(d["coeffs"]) != 4:
                raise ValueError(f"A poly3_inverse curve has 4 coefficients (c0 + c1 i + c2 i^2 + c3 i^3), got "
                                 f"{d['coeffs']!r}.")
            return PolyInverseCurve(jnp.asarray(d["coeffs"], jnp.float32))
        if form == "exp+c":
            return ExpConstCurve(jnp.float32(d["a"]), jnp.float32(d["b"]), jnp.float32(d["c"]))
        if form == "views":  # a tuple of curves, one per view (``jaxdebias.debias_views``)
            return tuple(curve_from_dict(c) for c in d["views"])
    except KeyError as e:
        raise ValueError(f"Curve of form {form!r} is missing field {e.args[0]!r}: {d}") from None
    raise ValueError(f"Unknown curve form {form!r}; expected 'exp', 'exp+c', 'poly3_inverse' or 'views'.")
