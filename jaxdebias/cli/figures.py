"""Figures a notebook or the commands draw: which visual tokens were kept, and scores by position.

Axes: B samples, N visual tokens in raster order on a square patch grid of side sqrt(N) (24 for LLaVA-1.5).
Both take the grid from the arrays they are given, and write PNGs atomically (``jaxdebias.eval.files``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from jaxdebias.eval.files import atomic_open


def grid_side(n: int) -> int:
    """The side of the square patch grid of ``n`` visual tokens; ValueError when ``n`` is not a square."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} visual tokens do not form a square grid.")
    return side


def _save(fig: Figure, path: str):
    """A figure made without pyplot (no global backend or figure state is touched) written as a PNG."""
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")


def figure_kept(letterboxed, kept_by_name: dict, path: str, content=None) -> str:
    """The letterboxed image with the kept patches clear and the rest shaded, one panel per entry of
    ``kept_by_name`` (name -> bool[N]); with ``content`` (bool[N], True = content) kept padding patches are
    outlined in red. Returns ``path``."""
    fig = Figure(figsize=(4.2 * len(kept_by_name), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(kept_by_name)))
    side_px = letterboxed.size[0]
    for ax, (name, kept) in zip(axes, kept_by_name.items()):
        kept = np.asarray(kept, bool).reshape(-1)
        grid = grid_side(kept.size)
        cell = side_px / grid
        ax.imshow(letterboxed)
        shade = np.ones((grid, grid, 4)) * np.array([0, 0, 0, 0.6])
        shade[kept.reshape(grid, grid)] = (0, 0, 0, 0)
        ax.imshow(shade, extent=(0, side_px, side_px, 0), interpolation="nearest")
        if content is not None:
            padding_kept = kept.reshape(grid, grid) & ~np.asarray(content, bool).reshape(grid, grid)
            for row, col in zip(*np.nonzero(padding_kept)):
                ax.add_patch(Rectangle((col * cell, row * cell), cell, cell, fill=False, ec="red", lw=1))
        ax.set_title(f"{name}: {int(kept.sum())} kept", fontsize=10)
        ax.axis("off")
    _save(fig, path)
    return path


def figure_profile(lines: dict, path: str, title: str, xlabel: str, ylabel: str = "mean score / overall mean",
                   marker: bool = True) -> str:
    """One line per entry of ``lines`` (name -> float[L], NaN left out), each divided by its own mean, on a log
    scale: the shape of a score profile, whatever its level. Returns ``path``."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, values in lines.items():
        values = np.asarray(values, np.float64)
        ax.plot(np.arange(values.size), values / max(np.nanmean(values), 1e-12), label=name,
                **({"marker": "o", "ms": 3} if marker else {"lw": 1}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def figure_curve(series: dict, path: str, title: str) -> str:
    """Mean score per grid row (raster order, top to bottom) over samples, one line per entry of ``series``
    (name -> float[N] or float[B, N]; NaN marks excluded tokens, e.g. padding), normalised by its overall mean,
    log scale. Returns ``path``."""
    rows = {}
    for name, scores in series.items():
        scores = np.asarray(scores, np.float64)
        grid = grid_side(scores.shape[-1])
        with warnings.catch_warnings():  # an all-padding grid row has no mean: NaN, left out of the line
            warnings.simplefilter("ignore", RuntimeWarning)
            rows[name] = np.nanmean(scores.reshape(-1, grid, grid), axis=(0, 2))
    return figure_profile(rows, path, title, "grid row (later in the sequence ->)")
