"""Static-shape top-k selection of visual tokens, and the debias step in front of it.

Axes: B batch, N visual tokens (raster order), K kept slots (a static bucket size), M a subset of the N tokens,
``...`` trailing feature axes.

Shapes that depend on how many tokens are kept are static; ``bucket`` rounds a requested keep count up to one of
a few sizes so that any request compiles into one of a few programs. When a sample has fewer valid tokens than
the bucket, the extra slots are reported in ``slot_mask`` (False) and must be masked downstream: they are never
filled with padding tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from jaxdebias import _checks
from jaxdebias.curves import Curve
from jaxdebias.fitting import fit_exp_curve, fit_online

DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 576)


def bucket(k: int, buckets: Sequence[int] = DEFAULT_BUCKETS, *, then_every: int | None = None) -> int:
    """The one rounding rule for static sizes (keep counts, prompt lengths, cache sizes): the smallest bucket
    >= k. Past the largest bucket: the next multiple of ``then_every`` if given, else an error.

    Raises:
      ValueError: k <= 0, or k larger than the largest bucket without ``then_every`` (add a bucket or lower k).
    """
    k = _checks.check_positive_int("k", k)
    fitting = [b for b in sorted(buckets) if b >= k]
    if fitting:
        return fitting[0]
    if then_every:
        return -(-k // then_every) * then_every
    raise ValueError(f"k={k} is larger than the largest bucket {max(buckets)}; add a bucket >= {k} "
                     f"to buckets={tuple(buckets)} or keep fewer tokens.")


@partial(jax.jit, static_argnames=("k",))
def _select_topk(scores, valid, k, limit=None):
    n = scores.shape[-1]
    key = jnp.where(valid, scores, -jnp.inf)
    _, idx = jax.lax.top_k(key, k)  # ties: lower index first
    slot = jnp.take_along_axis(valid, idx, axis=-1)
    if limit is not None:  # keep only the best `limit` of the k slots (a traced budget inside a static bucket)
        slot = slot & (jnp.arange(k) < jnp.asarray(limit).reshape(-1, 1))
    # Kept slots in ascending original order; empty slots after them.
    order = jnp.sort(jnp.where(slot, idx, n + idx), axis=-1)
    slot_sorted = order < n
    return jnp.where(slot_sorted, order, order - n).astype(jnp.int32), slot_sorted


def select_topk(scores, k: int, *, valid=None, limit=None):
    """The ``k`` highest-scoring valid tokens of each row, in ascending original order.

    Args:
      scores: float[B, N] (or float[N]); must not contain NaN at valid positions (an error says so, eagerly,
        or under ``jax.experimental.checkify`` when traced).
      k: static number of slots K, 1 <= K <= N.
      valid: bool[B, N] tokens that may be kept (e.g. content & real-slot mask); default all.
      limit: optional int or int[B] (may be traced) <= K: keep only the best ``limit`` tokens, the other slots
        masked. A budget that varies per request then shares the program of its bucket K.

    Returns:
      (idx int32[B, K], slot_mask bool[B, K]). Kept tokens come first, ascending; when a row has fewer than K
      valid tokens the remaining slots have slot_mask False (their idx points at an unselected token and must
      be masked). Ties go to the lower index.
    """
    _checks.check_rank("scores", scores, (1, 2), "float[B, N]")
    scores = jnp.asarray(scores)
    k = _checks.check_positive_int("k", k)
    n = scores.shape[-1]
    if k > n:
        raise ValueError(f"k={k} exceeds the number of tokens N={n}; keep at most N tokens.")
    valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
    _checks.check_same_shape("scores", scores, "valid", valid)
    _checks.check_no_nan("scores", scores, valid)
    return _select_topk(scores.astype(jnp.float32), valid, k, limit)


def kept_mask(idx, slot_mask, n: int):
    """The kept set of ``select_topk`` as a mask: bool[B, n], True at idx[b, k] where slot_mask[b, k].

    Args:
      idx: int[B, K]; slot_mask: bool[B, K]; n: static number of tokens N.
    """
    _checks.check_rank("idx", idx, 2, "int[B, K]")
    B = idx.shape[0]
    at = jnp.where(slot_mask, idx, n)  # masked slots point out of range and are dropped
    return jnp.zeros((B, n), bool).at[jnp.arange(B)[:, None], at].set(True, mode="drop")


def gather_tokens(x, idx):
    """x[b, idx[b, k], ...] for every b, k.

    Args:
      x: [B, N, ...] token features (any trailing axes); idx: int[B, K].

    Returns:
      [B, K, ...].
    """
    _checks.check_rank("idx", idx, 2, "int[B, K]")
    if jnp.ndim(x) < 2 or jnp.shape(x)[0] != jnp.shape(idx)[0]:
        raise ValueError(f"x must be [B, N, ...] with B = {jnp.shape(idx)[0]} (from idx), got {jnp.shape(x)}.")
    expand = idx.reshape(idx.shape + (1,) * (jnp.ndim(x) - 2))
    return jnp.take_along_axis(x, expand, axis=1)


def debias(scores, *, curve: Curve | str | None = None, content=None, valid=None, grid: int | None = None):
    """``s * w * m``: positional weights and padding suppression, multiplicative as published.

    Args:
      scores: float[..., N] token scores (raster order).
      curve: None (no positional correction), a curve (``ExpCurve``, ``PolyInverseCurve``, ``ExpConstCurve``,
        e.g. ``released_curve(...)`` or a ``Calibration`` fit) or "online" (fit this sample's trend on the
        grid's row means, see ``fit_online``, and divide it out).
      content: bool[..., N], True = content (``pad_mask_expand2square``); padding scores become 0.
      valid: bool[..., N] positions the online fit may use (default all); padding is excluded automatically.
      grid: grid side for the online fit (default sqrt(N)).

    Returns:
      float32[..., N].
    """
    _checks.check_rank("scores", scores, tuple(range(1, 8)), "float[..., N]")
    s = jnp.asarray(scores, jnp.float32)
    n = s.shape[-1]
    if content is not None:
        content = jnp.asarray(content, bool)
        if content.shape[-1] != n:
            raise ValueError(f"content has {content.shape[-1]} positions but scores have N={n}.")
    if isinstance(curve, str):
        if curve != "online":
            raise ValueError(f"curve must be None, a curve object or 'online', got {curve!r}. For a published "
                             "curve use jaxdebias.released_curve(method, task).")
        fit_valid = jnp.ones(s.shape, bool) if valid is None else jnp.asarray(valid, bool)
        if content is not None:
            fit_valid = fit_valid & content
        curve = fit_online(s, fit_valid, grid=grid)
    if curve is not None:
        if not hasattr(curve, "weights"):
            raise TypeError(f"curve must have .weights(n), got {type(curve).__name__}.")
        s = s * curve.weights(n)
    if content is not None:
        s = jnp.where(content, s, 0.0)
    return s


def debias_and_select(scores, k: int, *, curve=None, content=None, valid=None, grid: int | None = None,
                      raster=None, limit=None, pad_candidates: bool = False, views=None, view_sizes=()):
    """The whole per-stage step, jitted once per (k, shapes): ``select_topk(debias(scores, ...), k)``. The
    decoder's pruning stages call exactly this, so a selection made here on tapped attention is the model's.

    Args:
      scores: float[B, M] scores of M tokens: the N-token grid itself, or (with ``raster``) any subset of it.
      k: static slot count (from ``bucket``); limit: optional run-time budget <= k (int or int[B]).
      curve: None, a curve pytree or "online"; content: bool[B, N] over the grid, True = content; valid:
        bool[B, M] tokens that exist (default all); grid: grid side for the online fit (default sqrt(N)).
      raster: int[B, M] grid index of each scored token, -1 for a merged token (never padding; its score passes
        unchanged). Default: the scores are the grid (M = N).
      pad_candidates: False - padding is excluded from the candidates (FastV's release caps the budget at the
        content tokens: a slot content cannot fill is masked); True - padding is only zeroed and stays a
        candidate, filling the top-k when content runs out (the other releases).

    Returns:
      (idx int32[B, K] ascending, slot_mask bool[B, K], debiased scores float32[B, M]).
    """
    _checks.check_rank("scores", scores, 2, "float[B, M]")
    k = _checks.check_positive_int("k", k)
    if k > jnp.shape(scores)[-1]:
        raise ValueError(f"k={k} exceeds the number of tokens N={jnp.shape(scores)[-1]}; keep at most N tokens.")
    online = isinstance(curve, str) and curve == "online"
    if isinstance(curve, str) and not online:
        raise ValueError(f"curve must be None, a curve object or 'online', got {curve!r}.")
    if raster is not None and content is None and grid is None and views is None and (curve is not None):
        raise ValueError("With raster indices, give content (bool[B, N]) or grid so the grid size N is known.")
    _checks.check_no_nan("scores", scores)
    if views is not None and raster is None:
        raster = jnp.broadcast_to(jnp.arange(jnp.shape(scores)[1]), jnp.shape(scores))
    return _debias_and_select(scores, None if online else curve, content, valid, raster, limit, views, k=k,
                              grid=grid, online=online, pad_candidates=pad_candidates, view_sizes=tuple(view_sizes))


@partial(jax.jit, static_argnames=("k", "grid", "online", "pad_candidates", "view_sizes"))
def _debias_and_select(scores, curve, content, valid, raster, limit, views, *, k, grid, online, pad_candidates,
                       view_sizes):
    curve = "online" if online else curve
    valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if raster is None:
        here = content
        d = debias(scores, curve=curve, content=content, valid=valid, grid=grid)
    else:
        n = content.shape[-1] if content is not None else views[0].shape[-1] if views is not None else grid * grid
        here = None if content is None else (
            jnp.take_along_axis(jnp.asarray(content, bool), jnp.clip(raster, 0), axis=1) | (raster < 0))
        d = debias_scores(scores, raster, valid, here, curve, n, views, view_sizes)
    idx, slot = _select_topk(d, candidates(valid, here, pad_candidates), k, limit)
    return idx, slot, d


def candidates(valid, content, pad_candidates: bool):
    """The tokens a selection may keep: bool[B, M] ``valid``, minus padding (``content`` False) unless
    ``pad_candidates`` (only FastV's release caps its budget at the content; elsewhere zeroed padding can still
    fill the top-k). content: bool[B, M] or None (no padding suppression)."""
    return valid if content is None or pad_candidates else valid & content


def debias_scores(scores, raster_idx, valid, content, curve, n_raster: int, views=None, view_sizes=()):
    """``jaxdebias.debias`` for tokens identified by their raster index (they may already be a pruned subset):
    the valid tokens are placed at their raster positions, debiased there (the online fit sees only them, and
    only content), and read back.

    scores: float[B, M]; raster_idx: int[B, M] index of each token in the N-token image, -1 for a merged token
    (its score is returned as it is); valid: bool[B, M] (invalid tokens get 0); content: bool[B, M] or None
    (padding suppression); curve: None, "online" or a curve; views, view_sizes: as ``debias_views`` (over the
    N-token image), or None. Returns float32[B, M].
    """
    B = scores.shape[0]
    s = jnp.asarray(scores, jnp.float32)
    own = raster_idx >= 0
    at = jnp.where(valid & own, raster_idx, n_raster)  # the others go to a spare column, dropped

    def on_grid(x, fill):
        return jnp.full((B, n_raster + 1), fill, x.dtype).at[jnp.arange(B)[:, None], at].set(x)[:, :n_raster]

    pad = None if content is None else on_grid(jnp.asarray(content, bool), True)
    ok = on_grid(jnp.ones(s.shape, bool), False)
    if views is None:
        d = debias(on_grid(s, 0.0), curve=curve, content=pad, valid=ok)
    else:
        d = debias_views(on_grid(s, 0.0), *views, view_sizes, curve=curve, content=pad, valid=ok)
    mine = jnp.take_along_axis(d, jnp.clip(raster_idx, 0), axis=1)
    return jnp.where(own, jnp.where(valid, mine, 0.0), s)


def debias_views(scores, view, local, view_sizes, *, curve=None, content=None, valid=None):
    """``debias`` on each view of an anyres image separately (LLaVA-NeXT: the base view, then the tile grid).

    Each view's tokens are laid out on their own raster (``local``) and debiased there: the curve's index restarts
    at 0 in every view, and ``curve="online"`` fits each view of each sample on its own - the first view (the
    G x G base view) on its row medians as ``fit_online`` does for LLaVA-1.5's grid, later views (the tile grid,
    whose row length depends on the image) with the log-linear fit over their tokens (``fit_exp_curve``).

    Args:
      scores: float[B, N] over the image's token span; view: int[B, N] view of each token (0 .. len(view_sizes)
        - 1; -1 for tokens of no view, e.g. newlines and empty slots, which score 0); local: int[B, N] index in
        its view's raster; view_sizes: static raster length of each view.
      curve: as ``debias``, or a tuple of curves, one per view (e.g. each fitted by a ``Calibration`` fed by
        ``view_rasters``); content (bool[B, N], True = content), valid (bool[B, N]): as ``debias``.

    Returns:
      float32[B, N].
    """
    _checks.check_rank("scores", scores, 2, "float[B, N]")
    s = jnp.asarray(scores, jnp.float32)
    valid = jnp.ones(s.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if isinstance(curve, (tuple, list)) and len(curve) != len(view_sizes):
        raise ValueError(f"{len(curve)} curves for {len(view_sizes)} views: give one curve, or one per view.")
    pads = (None,) * len(view_sizes) if content is None else view_rasters(
        jnp.asarray(content, bool), view, local, view_sizes, fill=True)
    out = jnp.zeros_like(s)
    for v, (size, (here, ok), pad) in enumerate(zip(view_sizes, view_rasters(s, view, local, view_sizes, valid),
                                                   pads)):
        mine = view == v
        pad = None if pad is None else pad[0]
        c = curve[v] if isinstance(curve, (tuple, list)) else curve
        if isinstance(curve, str) and curve == "online":
            fit_ok = ok if pad is None else ok & pad
            c = fit_online(here, fit_ok) if v == 0 else fit_exp_curve(here, fit_ok)
        d = debias(here, curve=c, content=pad)
        out = jnp.where(mine, jnp.take_along_axis(d, jnp.clip(local, 0, size - 1), axis=1), out)
    return out


def view_rasters(x, view, local, view_sizes, valid=None, *, fill=0):
    """Each view's tokens on its own raster: a tuple with, per view v, (x_v [B, view_sizes[v]], valid_v
    bool[B, view_sizes[v]]), positions the view does not fill holding ``fill`` (and False). What a ``Calibration``
    per view takes (``jd.Calibration.init(view_sizes[v]).update(*view_rasters(...)[v])``).

    x: [B, N]; view, local: int[B, N] as ``debias_views``; valid: bool[B, N] (default all)."""
    x = jnp.asarray(x)
    B = x.shape[0]
    valid = jnp.ones(x.shape, bool) if valid is None else jnp.asarray(valid, bool)
    out = []
    for v, size in enumerate(view_sizes):
        mine = view == v
        at = jnp.where(mine, local, size)  # other tokens go to a spare column, dropped
        rows = jnp.arange(B)[:, None]
        out.append((jnp.full((B, size + 1), fill, x.dtype).at[rows, at].set(x)[:, :size],
                    jnp.zeros((B, size + 1), bool).at[rows, at].set(valid & mine)[:, :size]))
    return tuple(out)
