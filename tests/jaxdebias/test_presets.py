"""The debias code's three settings (intcomp/attention-bias@e75ebe7, the eval scripts' ``--tag``) as
``jd.Debias.preset``: "paper" (nothing), "before" (padding only, each patch's own mask) and "after" (padding and
the released curve), checked against NumPy transcriptions of the patches' code."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdebias as jd

from .test_released_rules import random_sizes


def ref_unpad_mask(w, h, grid=24):
    """patches/FastV.patch ``unpad_mask`` on a grid x grid tensor of ones, as written there (floats, then int)."""
    mask = np.ones((grid, grid), bool)
    if w / h > grid / grid:
        new = int(h * (grid / w))
        pad = (grid - new) // 2
        mask[:pad, :] = False
        mask[grid - pad:, :] = False
    else:
        new = int(w * (grid / h))
        pad = (grid - new) // 2
        mask[:, :pad] = False
        mask[:, grid - pad:] = False
    return mask.reshape(-1)


def ref_fastv_before(scores, w, h, keep):
    """FastV's "before": scores x unpad_mask, the budget capped at the mask's ones, top-k (ascending indices)."""
    mask = ref_unpad_mask(w, h)
    k = min(keep, int(mask.sum()))
    order = np.argsort(-(scores * mask), kind="stable")[:k]
    return np.sort(order)


def test_unpad_geometry_over_thousands_of_sizes():
    sizes = random_sizes(2000, 40)
    ws, hs = np.array([p[0] for p in sizes]), np.array([p[1] for p in sizes])
    got = np.asarray(jax.jit(lambda w, h: jd.pad_mask_expand2square(w, h, geometry="unpad"))(ws, hs))
    for (w, h), g in zip(sizes, got):
        np.testing.assert_array_equal(g, ref_unpad_mask(w, h), err_msg=f"{w}x{h}")


@given(w=st.integers(1, 100_000), h=st.integers(1, 100_000), grid=st.sampled_from([2, 3, 24, 27]))
@settings(max_examples=200, deadline=None)
def test_unpad_geometry_properties(w, h, grid):
    got = np.asarray(jd.pad_mask_expand2square(w, h, grid=grid, canvas=grid * 14, geometry="unpad"))
    np.testing.assert_array_equal(got, ref_unpad_mask(w, h, grid))
    lines = got.reshape(grid, grid).all(1 if w >= h else 0)
    new = grid * min(w, h) // max(w, h)
    assert new <= lines.sum() <= new + 1  # G - 2 pad with pad = (G - new) // 2 (an extreme shape keeps nothing)
    assert (lines == lines[::-1]).all()  # symmetric: pad on both sides


@pytest.mark.parametrize("keep", [64, 300, 576])
def test_fastv_before_selects_as_the_patch(keep):
    rng = np.random.default_rng(keep)
    for w, h in [(618, 348), (348, 618), (640, 427), (500, 500), (1200, 300)]:
        scores = rng.random(576).astype(np.float32) + 0.01
        spec = jd.PruneSpec("fastv", keep=keep, debias=jd.Debias.preset("before", "fastv"))
        plan, limits = spec.plan(576, 32)
        assert (plan.pad_geometry, plan.pad_candidates, plan.debias.curve) == ("unpad", False, None)
        content = jd.pad_mask_expand2square(w, h, tau=plan.pad_tau, geometry=plan.pad_geometry)[None]
        idx, slot, _ = jd.debias_and_select(scores[None], plan.stages[0].slots, content=content,
                                            pad_candidates=plan.pad_candidates, limit=limits[0])
        got = np.asarray(idx[0])[np.asarray(slot[0])]
        np.testing.assert_array_equal(got, ref_fastv_before(scores, w, h, keep), err_msg=f"{w}x{h} keep {keep}")


def test_presets_per_method():
    off = jd.Debias()
    for method in ("fastv", "pdrop", "himap", "tokencarve", "sparsevlm"):
        assert jd.Debias.preset("paper", method) == off
        before = jd.Debias.preset("before", method)
        after = jd.Debias.preset("after", method, task="textvqa")
        assert before.curve is None and before.pad_tau == "released"
        assert after.curve == "released" and after.pad_tau == "released" and after.task == "textvqa"
        # the threshold each patch passes to generate_pad_mask (PyramidDrop 0.01, the others 0.5)
        assert before.tau_for(method) == after.tau_for(method) == {"pdrop": 0.01}.get(method, 0.5)
    assert jd.Debias.preset("before", "fastv").geometry_for("fastv") == "unpad"
    assert jd.Debias.preset("after", "fastv").geometry_for("fastv") == "continuous"
    assert jd.Debias.preset("before", "sparsevlm").geometry_for("sparsevlm") == "bilinear"
    assert jd.Debias.preset("before", "himap").geometry_for("himap") == "continuous"
    # no published curve: "after" is the padding alone; a baseline that scores nothing: always plain
    assert jd.Debias.preset("after", "visionzip") == jd.Debias(pad_tau="released")
    assert jd.Debias.preset("after", "random") == off
    with pytest.raises(ValueError, match="paper, before, after"):
        jd.Debias.preset("original", "fastv")
    with pytest.raises(ValueError, match="pad_geometry"):
        jd.Debias(pad_tau=0.5, pad_geometry="square")
