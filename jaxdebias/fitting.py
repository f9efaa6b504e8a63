"""Fitting the positional trend: offline calibration over a data set, and online per sample.

Axes: N visual tokens in raster order, ``...`` leading batch axes, G grid side (N = G * G).

All fits take ``valid`` (bool[..., N]; False at positions to ignore: padding patches, slots past a sample's
token count) and run inside jit with static shapes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdebias import _checks
from jaxdebias.curves import Curve, ExpConstCurve, ExpCurve, PolyInverseCurve

FORMS = ("exp", "exp+c", "poly3_inverse")


def _prepare(scores, valid):
    _checks.check_rank("scores", scores, tuple(range(1, 8)), "float[..., N]")
    scores = jnp.asarray(scores, jnp.float32)
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    valid = jnp.asarray(valid, bool)
    if valid.shape != scores.shape:
        valid = jnp.broadcast_to(valid, scores.shape) if valid.ndim <= scores.ndim else valid
        if valid.shape != scores.shape:
            raise ValueError(f"valid {valid.shape} does not match scores {scores.shape}.")
    return scores, valid


def _weighted_line(x, y, w):
    """Slope and intercept of the weighted least-squares line y ~ a + b x over the last axis."""
    sw = jnp.sum(w, -1)
    safe = jnp.maximum(sw, 1e-30)
    mx = jnp.sum(w * x, -1) / safe
    my = jnp.sum(w * y, -1) / safe
    dx = x - mx[..., None]
    sxx = jnp.sum(w * dx * dx, -1)
    sxy = jnp.sum(w * dx * (y - my[..., None]), -1)
    slope = jnp.where(sxx > 0, sxy / jnp.where(sxx > 0, sxx, 1.0), 0.0)
    return slope, my - slope * mx


@jax.jit
def _fit_exp(scores, valid):
    w = (valid & (scores > 0)).astype(jnp.float32)
    y = jnp.log(jnp.where(w > 0, scores, 1.0))
    x = jnp.arange(scores.shape[-1], dtype=jnp.float32)
    return _weighted_line(x, y, w)


def fit_exp_curve(scores, valid=None) -> ExpCurve:
    """Closed-form weighted least squares of ``log s_i`` on ``i`` (valid, positive scores only).

    Args:
      scores: float[..., N] non-negative scores (one vector per leading index).
      valid: bool[..., N] positions that take part (default: all).

    Returns:
      ExpCurve with ``b``: float[...], the fitted log-slope (trend ``exp(b i)``, weights ``exp(-b i)``).
      A vector with fewer than two usable positions gets b = 0 (no correction).
    """
    scores, valid = _prepare(scores, valid)
    slope, _ = _fit_exp(scores, valid)
    return ExpCurve(slope)


def _poly_to_monomial(n: int) -> np.ndarray:
    """M with monomial coeffs = beta @ M, for the basis x = (i - c) / h, c = h = (n - 1) / 2."""
    c = (n - 1) / 2.0
    h = max(c, 1.0)
    m = np.zeros((4, 4))
    for k in range(4):
        for j in range(k + 1):
            m[k, j] = math.comb(k, j) * (-c) ** (k - j) / h**k
    return m


@jax.jit
def _fit_poly3(scores, valid):
    n = scores.shape[-1]
    c = (n - 1) / 2.0
    x = (jnp.arange(n, dtype=jnp.float32) - c) / max(c, 1.0)
    phi = jnp.stack([jnp.ones_like(x), x, x * x, x * x * x], -1)  # [N, 4]
    w = valid.astype(jnp.float32)
    gram = jnp.einsum("...n,ni,nj->...ij", w, phi, phi) + 1e-6 * jnp.eye(4)
    rhs = jnp.einsum("...n,...n,ni->...i", w, scores, phi)
    beta = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
    coeffs = beta @ jnp.asarray(_poly_to_monomial(n), jnp.float32)
    return coeffs / coeffs[..., :1]


def _profile(beta, x, target, w):
    """For a fixed decay beta, the best (a, c) of a e^{-beta x} + c in closed form, and the weighted loss."""
    phi = jnp.exp(-beta[..., None] * x)
    sw = jnp.maximum(jnp.sum(w, -1), 1.0)
    mp = jnp.sum(w * phi, -1) / sw
    mt = jnp.sum(w * target, -1) / sw
    dp = phi - mp[..., None]
    var = jnp.sum(w * dp * dp, -1)
    a = jnp.where(var > 1e-12, jnp.sum(w * dp * (target - mt[..., None]), -1) / jnp.maximum(var, 1e-12), 0.0)
    c = mt - a * mp
    resid = a[..., None] * phi + c[..., None] - target
    return a, c, jnp.sum(w * resid * resid, -1) / sw


@partial(jax.jit, static_argnames=("steps",))
def _fit_exp_const(scores, valid, steps):
    """Variable projection: (a, c) are linear given the decay, so only the decay is searched - first on a
    grid (which finds the right basin whatever the trend's sign and shape), then refined with Adam."""
    n = scores.shape[-1]
    span = float(max(n - 1, 1))
    x = jnp.arange(n, dtype=jnp.float32) / span
    w = valid.astype(jnp.float32)
    scale = jnp.sum(w * scores, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
    scale = jnp.where(scale > 0, scale, 1.0)
    target = scores / scale[..., None]
    betas = jnp.linspace(-12.0, 12.0, 97)  # decay over the whole index range, scaled units
    losses = jax.vmap(lambda bt: _profile(jnp.broadcast_to(bt, scale.shape), x, target, w)[2])(betas)
    beta0 = betas[jnp.argmin(losses, axis=0)]

    def loss(beta):
        return jnp.sum(_profile(beta, x, target, w)[2])

    opt = optax.adam(0.02)

    def step(carry, _):
        beta, state = carry
        upd, state = opt.update(jax.grad(loss)(beta), state, beta)
        return (optax.apply_updates(beta, upd), state), None

    (beta, _), _ = jax.lax.scan(step, (beta0, opt.init(beta0)), None, length=steps)
    a, c, _ = _profile(beta, x, target, w)
    return a * scale, beta / span, c * scale


def fit_curve(scores, valid=None, *, form: str = "exp", steps: int = 500) -> Curve:
    """Fits a positional trend of the given form to score vectors.

    Args:
      scores: float[..., N] non-negative scores.
      valid: bool[..., N] positions that take part (default: all).
      form: "exp" (closed form, log-linear), "exp+c" (``a e^{-b i} + c``: a and c in closed form for each
        decay b, b found on a grid then refined with optax Adam for ``steps`` steps, all inside jit) or "poly3_inverse" (weighted least squares of the cubic trend,
        normalised so ``w_0 = 1``).

    Returns:
      A curve whose parameters carry the leading axes ``...``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
    scores, valid = _prepare(scores, valid)
    if form == "exp":
        return fit_exp_curve(scores, valid)
    if form == "poly3_inverse":
        return PolyInverseCurve(_fit_poly3(scores, valid))
    steps = _checks.check_positive_int("steps", steps)
    return ExpConstCurve(*_fit_exp_const(scores, valid, steps))


def _grid_side(n: int, grid: int | None) -> int | None:
    if grid is not None:
        if grid * grid != n:
            raise ValueError(f"grid={grid} does not tile N={n} tokens (grid * grid must equal N).")
        return grid
    side = math.isqrt(n)
    return side if side * side == n else None


def fit_online(scores, valid=None, *, grid: int | None = None) -> ExpCurve:
    """Per-sample exponential trend fitted robustly on the grid's row medians.

    The recency trend runs along raster order; taking the median of each row of the ``G x G`` grid first removes
    the content (an object covers a minority of a row) and the few huge sink scores before the log-linear fit,
    which is then done on the row medians at each row's centre index. Rows with no valid position are ignored.

    Args:
      scores: float[..., N]; valid: bool[..., N] (e.g. content mask & slot mask).
      grid: side G with N = G * G (default: sqrt(N) when N is a square; otherwise every token is fitted).

    Returns:
      ExpCurve with ``b``: float[...] in token-index units.
    """
    scores, valid = _prepare(scores, valid)
    n = scores.shape[-1]
    side = _grid_side(n, grid)
    if side is None:
        return fit_exp_curve(scores, valid)
    return ExpCurve(_fit_rows(scores, valid, side))


@partial(jax.jit, static_argnames=("side",))
def _fit_rows(scores, valid, side):
    s = scores.reshape(*scores.shape[:-1], side, side)
    v = valid.reshape(s.shape)
    count = jnp.sum(v, -1)
    ordered = jnp.sort(jnp.where(v, s, jnp.inf), axis=-1)  # valid values first, ascending
    lo = jnp.take_along_axis(ordered, jnp.maximum((count - 1) // 2, 0)[..., None], -1)[..., 0]
    hi = jnp.take_along_axis(ordered, jnp.maximum(count // 2, 0)[..., None], -1)[..., 0]
    row_median = jnp.where(count > 0, 0.5 * (lo + hi), 0.0)
    centre = jnp.arange(side, dtype=jnp.float32) * side + (side - 1) / 2.0
    w = ((count > 0) & (row_median > 0)).astype(jnp.float32)
    slope, _ = _weighted_line(centre, jnp.log(jnp.where(w > 0, row_median, 1.0)), w)
    return slope


def bias_strength(scores, valid=None, content=None) -> dict[str, jax.Array]:
    """Numbers that show the bias (call it before and after debiasing).

    Args:
      scores: float[..., N]; valid: bool[..., N]; content: bool[..., N], True = content (as from
        ``pad_mask_expand2square``).

    Returns:
      dict of float[...] arrays:
        "slope": fitted log-slope b per token (0 = no positional trend),
        "trend_ratio": fitted trend at the last index over the first, exp(b (N - 1)),
        "pad_ratio": mean score on padding patches over mean score on content (NaN without a content or
          when a sample has no padding patch).
    """
    scores, valid = _prepare(scores, valid)
    fit = valid if content is None else valid & jnp.asarray(content, bool)
    slope = fit_exp_curve(scores, fit).b
    n = scores.shape[-1]
    out = {"slope": slope, "trend_ratio": jnp.exp(slope * (n - 1))}
    if content is None:
        out["pad_ratio"] = jnp.full(slope.shape, jnp.nan)
    else:
        pad = valid & ~jnp.asarray(content, bool)
        mean_pad = jnp.sum(scores * pad, -1) / jnp.sum(pad, -1)
        mean_content = jnp.sum(scores * fit, -1) / jnp.maximum(jnp.sum(fit, -1), 1)
        out["pad_ratio"] = jnp.where(jnp.any(pad, -1), mean_pad / mean_content, jnp.nan)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Calibration:
    """Streaming position-wise average of score vectors over a data set (a pytree; ``update`` is jit-able).

    Usage::

        cal = jd.Calibration.init(576)
        for batch in data:                       # thousands of samples, never held together
            cal = cal.update(scores_bn, valid_bn)
        curve = cal.fit("exp")

    Each sample is first divided by its own mean over valid positions (``normalize=True``) so that samples
    with more attention on the image do not dominate the shape; padding and invalid slots never count.

    Fields: total float[N], count float[N] (valid samples seen at each position), n_samples int32[].
    """

    total: Any
    count: Any
    n_samples: Any

    @classmethod
    def init(cls, n: int) -> Calibration:
        n = _checks.check_positive_int("n", n)
        return cls(jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, scores, valid=None, *, normalize: bool = True) -> Calibration:
        """Adds float[N] or float[B, N] scores (bool ``valid`` of the same shape)."""
        scores, valid = _prepare(scores, valid)
        n = self.total.shape[0]
        if scores.shape[-1] != n:
            raise ValueError(f"Calibration was initialised for N={n} tokens, got scores {scores.shape}.")
        scores, valid = scores.reshape(-1, n), valid.reshape(-1, n)
        _checks.check_no_nan("scores", scores, valid)
        v = valid.astype(jnp.float32)
        if normalize:
            mean = jnp.sum(scores * v, -1, keepdims=True) / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1.0)
            scores = scores / jnp.where(mean > 0, mean, 1.0)
        return Calibration(self.total + jnp.sum(scores * v, 0), self.count + jnp.sum(v, 0),
                           self.n_samples + scores.shape[0])

    def mean(self):
        """float[N] position-wise mean score; 0 where no sample was valid."""
        return self.total / jnp.maximum(self.count, 1.0)

    def fit(self, form: str = "exp", **kwargs) -> Curve:
        """Fits ``form`` (see ``fit_curve``) to the mean vector over the positions seen at least once."""
        return fit_curve(self.mean(), self.count > 0, form=form, **kwargs)
