from fractions import Fraction

import chex
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdebias as jd


def reference_expand2square(w, h, grid=24, tau=0.5, geometry="continuous"):
    """Exact rational re-derivation of LLaVA's expand2square letterbox, patch by patch: the content starts at
    (S - s) / 2 (the released generate_pad_mask) or at PIL's floored offset (S - s) // 2 (geometry "pil")."""
    side, short = max(w, h), min(w, h)
    off = Fraction(side - short, 2) if geometry == "continuous" else Fraction((side - short) // 2)
    tau = Fraction(tau).limit_denominator(10_000)
    keep = []
    for k in range(grid):
        lo, hi = Fraction(k * side, grid), Fraction((k + 1) * side, grid)
        overlap = max(Fraction(0), min(hi, Fraction(off + short)) - max(lo, Fraction(off)))
        keep.append(1 - overlap / (hi - lo) <= tau)
    keep = np.array(keep)
    rows = keep if w >= h else np.ones(grid, bool)
    cols = keep if w < h else np.ones(grid, bool)
    return (rows[:, None] & cols[None, :]).reshape(-1)


def test_worked_by_hand():
    m = np.asarray(jd.pad_mask_expand2square(640, 480)).reshape(24, 24)
    # S = 640, content rows [80, 560): patches of 26.67 px -> rows 0-2 and 21-23 are pure padding
    assert m.all(1).tolist() == [False] * 3 + [True] * 18 + [False] * 3
    m = np.asarray(jd.pad_mask_expand2square(500, 300)).reshape(24, 24)
    # S = 500, content [100, 400), patch 20.83 px: row 4 is 80% padding, rows 5..18 are content
    assert np.nonzero(m.all(1))[0].tolist() == list(range(5, 19))
    m9 = np.asarray(jd.pad_mask_expand2square(500, 300, tau=0.9)).reshape(24, 24)
    assert np.nonzero(m9.all(1))[0].tolist() == list(range(4, 20))  # 80% padding is tolerated at tau 0.9
    tall = np.asarray(jd.pad_mask_expand2square(300, 500)).reshape(24, 24)
    np.testing.assert_array_equal(tall, m.T)
    assert np.asarray(jd.pad_mask_expand2square(336, 336)).all()


@given(w=st.integers(1, 3000), h=st.integers(1, 3000), tau=st.sampled_from([0.0, 0.01, 0.25, 0.3, 0.5, 0.99, 1.0]),
       geometry=st.sampled_from(["continuous", "pil"]))
@settings(max_examples=150, deadline=None)
def test_matches_exact_reference(w, h, tau, geometry):
    np.testing.assert_array_equal(np.asarray(jd.pad_mask_expand2square(w, h, tau=tau, geometry=geometry)),
                                  reference_expand2square(w, h, tau=tau, geometry=geometry))


def test_pil_and_continuous_geometry_differ_where_the_issue_says():
    # S - s odd: the paste offset is floored by half a pixel; at tau 0.01 a whole line of 24 tokens flips
    for w, h in [(640, 427), (500, 375)]:
        cont = np.asarray(jd.pad_mask_expand2square(w, h, tau=0.01))
        pil = np.asarray(jd.pad_mask_expand2square(w, h, tau=0.01, geometry="pil"))
        assert (cont & ~pil).sum() == 24 and not (pil & ~cont).any()


@given(w=st.integers(1, 2000), h=st.integers(1, 2000))
@settings(max_examples=60, deadline=None)
def test_properties(w, h):
    lo, mid, hi = (np.asarray(jd.pad_mask_expand2square(w, h, tau=t)) for t in (0.01, 0.5, 1.0))
    assert hi.all()
    assert (lo <= mid).all()  # raising tau only turns padding into content
    np.testing.assert_array_equal(mid.reshape(24, 24).T, np.asarray(jd.pad_mask_expand2square(h, w)).reshape(24, 24))
    # about G * short / side rows (or columns) hold content: at most one lost at each edge
    lines = mid.reshape(24, 24).all(1 if w >= h else 0).sum()
    assert 24 * min(w, h) / max(w, h) - 2 <= lines <= 24 * min(w, h) / max(w, h) + 1


class BatchedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_traced_batch_of_sizes(self):
        ws, hs = np.array([640, 300, 1000, 50]), np.array([480, 500, 1000, 900])
        got = self.variant(lambda w, h: jd.pad_mask_expand2square(w, h, tau=0.01))(ws, hs)
        assert got.shape == (4, 576)
        for b in range(4):
            np.testing.assert_array_equal(got[b], reference_expand2square(ws[b], hs[b], tau=0.01))


def test_errors():
    with pytest.raises(ValueError, match="width must be positive"):
        jd.pad_mask_expand2square(0, 10)
    with pytest.raises(ValueError, match="height must be positive"):
        jd.pad_mask_expand2square(np.array([10, 10]), np.array([5, -1]))
    with pytest.raises(ValueError, match=r"tau must lie in \[0, 1\]"):
        jd.pad_mask_expand2square(10, 10, tau=1.5)
    with pytest.raises(ValueError, match="multiple of grid"):
        jd.pad_mask_expand2square(10, 10, canvas=100)
    with pytest.raises(ValueError, match="geometry must be one of"):
        jd.pad_mask_expand2square(10, 10, geometry="floor")
    with pytest.raises(ValueError, match="thresholds the resized mask at 0.5"):
        jd.pad_mask_expand2square(10, 10, tau=0.01, geometry="bilinear")


PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (1000, 300), (300, 1000), (336, 336), (800, 799),
                                 (1280, 720)])
@pytest.mark.parametrize("tau", [0.5, 0.01])
def test_anyres_against_transformers_geometry(w, h, tau):
    torch = pytest.importorskip("torch")
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    th, tw = select_best_resolution((h, w), PINPOINTS)
    new_h, new_w = get_patch_output_size(np.zeros((3, h, w)), (th, tw), ChannelDimension.FIRST)
    canvas = np.zeros((th, tw))
    py, px = (th - new_h) // 2, (tw - new_w) // 2
    canvas[py:py + new_h, px:px + new_w] = 1.0
    frac = canvas.reshape(th // 14, 14, tw // 14, 14).mean((1, 3))  # content fraction of each feature patch
    unpadded = unpad_image(torch.tensor(frac)[None], (h, w))[0].numpy()
    got = jd.pad_mask_anyres(w, h, grid_pinpoints=PINPOINTS, tau=tau)
    assert got.best_resolution == (th, tw)
    assert got.grid_shape == unpadded.shape
    rows, cols = unpadded.shape
    assert got.content.shape == (576 + rows * (cols + 1),)
    grid_part = got.content[576:].reshape(rows, cols + 1)
    np.testing.assert_array_equal(grid_part[:, :cols], 1.0 - unpadded <= tau + 1e-9)
    assert grid_part[:, cols].all() and got.newline[576:].reshape(rows, cols + 1)[:, cols].all()
    assert got.content[:576].all() and got.newline.sum() == rows
