"""Debiasing per view of an anyres image (LLaVA-NeXT): ``jd.debias_views`` and ``jd.view_rasters`` against NumPy,
one curve per view, and a per-view calibration that recovers each view's own trend."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdebias as jd

SIZES = (9, 12)  # a 3 x 3 base view, a 12-token tile grid (e.g. 3 rows of 4)


def layout(rng):
    """One sample: base view 0..8, then 3 rows of 4 tile tokens each followed by a newline, then 2 empty slots."""
    view = np.array([0] * 9 + ([1] * 4 + [-1]) * 3 + [-1, -1])
    local = np.zeros(len(view), int)
    local[:9] = np.arange(9)
    local[view == 1] = np.arange(12)
    return view, local


def np_views(s, view, local, weights):
    out = np.zeros_like(s)
    for v, w in enumerate(weights):
        out[view == v] = s[view == v] * w[local[view == v]]
    return out


class DebiasViewsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_curves_restart_in_each_view(self):
        rng = np.random.default_rng(0)
        view, local = layout(rng)
        s = rng.random((2, len(view))).astype(np.float32)
        pad = rng.random((2, len(view))) > 0.2
        one = jd.ExpCurve(0.2)
        two = (jd.ExpCurve(0.3), jd.PolyInverseCurve(jnp.array([1.0, 0.1, 0.0, 0.0])))
        V, Lc = np.broadcast_to(view, s.shape), np.broadcast_to(local, s.shape)
        got1 = self.variant(lambda s, p: jd.debias_views(s, V, Lc, SIZES, curve=one, content=p))(s, pad)
        got2 = self.variant(lambda s, p: jd.debias_views(s, V, Lc, SIZES, curve=two, content=p))(s, pad)
        w1 = [np.exp(-0.2 * np.arange(n)) for n in SIZES]
        w2 = [np.exp(-0.3 * np.arange(9)), 1 / (1 + 0.1 * np.arange(12))]
        for b in range(2):
            np.testing.assert_allclose(got1[b], np.where(pad[b], np_views(s[b], view, local, w1), 0), rtol=1e-6)
            np.testing.assert_allclose(got2[b], np.where(pad[b], np_views(s[b], view, local, w2), 0), rtol=1e-6)
        assert not np.asarray(got1)[:, view < 0].any()  # newlines and empty slots score 0

    def test_online_fits_each_view_on_its_own(self):
        rng = np.random.default_rng(1)
        view, local = layout(rng)
        s = np.zeros(len(view), np.float32)
        s[view == 0] = np.exp(0.2 * np.arange(9)) * (1 + 0.01 * rng.random(9))
        s[view == 1] = np.exp(-0.1 * np.arange(12)) * (1 + 0.01 * rng.random(12))
        got = np.asarray(jd.debias_views(s[None], view[None], local[None], SIZES, curve="online"))[0]
        medians = [np.median(s[:9][r * 3:r * 3 + 3]) for r in range(3)]
        b0 = np.polyfit([1.0, 4.0, 7.0], np.log(medians), 1)[0]  # the base view's row medians at row centres
        b1 = np.polyfit(np.arange(12.0), np.log(s[view == 1]), 1)[0]  # the tile grid: every token
        want = np_views(s, view, local, [np.exp(-b0 * np.arange(9)), np.exp(-b1 * np.arange(12))])
        np.testing.assert_allclose(got, want, rtol=1e-4)
        assert abs(b0 - 0.2) < 0.01 and abs(b1 + 0.1) < 0.01  # opposite trends, each recovered


def test_calibration_per_view_recovers_each_trend():
    rng = np.random.default_rng(2)
    view, local = layout(rng)
    cals = [jd.Calibration.init(n) for n in SIZES]
    for _ in range(5):
        s = np.zeros((4, len(view)), np.float32)
        s[:, view == 0] = np.exp(0.05 * np.arange(9)) * rng.uniform(0.5, 2, (4, 1))
        s[:, view == 1] = np.exp(0.02 * np.arange(12)) * rng.uniform(0.5, 2, (4, 1))
        V, Lc = np.broadcast_to(view, s.shape), np.broadcast_to(local, s.shape)
        parts = jd.view_rasters(s, V, Lc, SIZES)
        cals = [c.update(x, ok) for c, (x, ok) in zip(cals, parts)]
    curves = [c.fit("exp") for c in cals]
    np.testing.assert_allclose([float(c.b) for c in curves], [0.05, 0.02], rtol=1e-4)
    spec = jd.Debias(curve=curves)  # one curve per view, hashable as a static argument
    assert hash(spec) == hash(jd.Debias(curve=list(curves)))
    assert jd.curve_from_dict(jd.curve_to_dict(tuple(curves)))[1].b == pytest.approx(0.02, rel=1e-4)
    back = spec.curve_for("fastv")
    assert isinstance(back, tuple) and [float(c.b) for c in back] == pytest.approx([0.05, 0.02], rel=1e-4)
    with pytest.raises(ValueError, match="one curve, or one per view"):
        jd.debias_views(np.ones((1, len(view))), view[None], local[None], SIZES, curve=(curves[0],))
