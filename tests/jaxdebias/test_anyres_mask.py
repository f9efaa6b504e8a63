"""``jd.pad_mask_anyres`` against a NumPy re-derivation of transformers' LLaVA-NeXT geometry, written from
transformers 5's code: ``select_best_resolution`` (image_processing_utils), the processor's
``get_patch_output_size`` + ``_get_padding_size`` (resize into the best resolution, centre with divmod padding),
``get_anyres_image_grid_shape`` and ``unpad_image`` (modeling_llava_next), and ``pack_image_features`` (one newline
after each row of the unpadded grid). Exact integers throughout; the threshold as the fraction tau."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdebias as jd

HUB = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 (height, width)
TINY = [[42, 84], [84, 42], [84, 84], [126, 42]]


def best_resolution(h, w, pinpoints):
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def resized(h, w, th, tw):
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def unpad_slices(h, w, rows, cols):
    """unpad_image on a [rows, cols] feature grid: the kept row and column ranges."""
    if w / h > cols / rows:
        new = int(round(h * (cols / w), 7))
        cut = (rows - new) // 2
        return slice(cut, rows - cut), slice(0, cols)
    new = int(round(w * (rows / h), 7))
    cut = (cols - new) // 2
    return slice(0, rows), slice(cut, cols - cut)


def reference(w, h, pinpoints, tile, grid, tau):
    """(content bool[L], newline bool[L], (rows, cols), (th, tw)) with L = G^2 + rows * (cols + 1)."""
    th, tw = best_resolution(h, w, pinpoints)
    nh, nw = resized(h, w, th, tw)
    py, px = divmod(th - nh, 2)[0], divmod(tw - nw, 2)[0]
    patch = tile // grid
    R, C = th // tile * grid, tw // tile * grid

    def overlap(n, lo, size):
        k = np.arange(n)
        return np.clip(np.minimum((k + 1) * patch, lo + size) - np.maximum(k * patch, lo), 0, None)

    covered = np.outer(overlap(R, py, nh), overlap(C, px, nw))  # content pixels of each feature patch
    t = Fraction(tau).limit_denominator(10_000)
    content = (patch * patch - covered) * t.denominator <= t.numerator * patch * patch
    rs, cs = unpad_slices(h, w, R, C)
    content = content[rs, cs]
    rows, cols = content.shape
    body = np.concatenate([content, np.ones((rows, 1), bool)], 1).reshape(-1)
    nl = np.concatenate([np.zeros((rows, cols), bool), np.ones((rows, 1), bool)], 1).reshape(-1)
    base = np.ones(grid * grid, bool)
    return np.concatenate([base, body]), np.concatenate([~base, nl]), (rows, cols), (th, tw)


def check(w, h, pinpoints, tile, grid, tau):
    want, nl, shape, res = reference(w, h, pinpoints, tile, grid, tau)
    got = jd.pad_mask_anyres(w, h, grid_pinpoints=pinpoints, tile=tile, grid=grid, tau=tau)
    assert got.best_resolution == res and got.grid_shape == shape, (w, h)
    np.testing.assert_array_equal(got.newline, nl)
    np.testing.assert_array_equal(got.content, want, err_msg=f"{w}x{h} tau={tau}")


@pytest.mark.parametrize("tau", [0.5, 0.01, 0.25, 0.75, 0.99, 0.0, 1.0])
def test_many_sizes_hub_tiles(tau):
    sizes = [(w, h) for w in range(40, 2200, 97) for h in range(40, 2200, 89)]
    sizes += [(640, 480), (480, 640), (1280, 720), (336, 336), (672, 336), (1008, 336), (4000, 50), (50, 4000)]
    for w, h in sizes:
        check(w, h, HUB, 336, 24, tau)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([0.5, 0.01, 0.3]))
def test_random_sizes(w, h, tau):
    check(w, h, HUB, 336, 24, tau)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400))
def test_tiny_tiles(w, h):
    check(w, h, TINY, 42, 3, 0.5)


def test_token_count_is_transformers_model_count():
    torch = pytest.importorskip("torch")
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    for w, h in [(640, 480), (481, 1000), (2000, 333), (90, 40), (1, 1), (336, 1009)]:
        th, tw = best_resolution(h, w, HUB)
        assert get_anyres_image_grid_shape((h, w), HUB, 336) == (th // 336, tw // 336)
        feats = torch.zeros(1, th // 14, tw // 14)
        rows, cols = unpad_image(feats, (h, w)).shape[1:]
        got = jd.pad_mask_anyres(w, h, grid_pinpoints=HUB)
        assert got.content.shape == (576 + rows * (cols + 1),) and got.grid_shape == (rows, cols)
