import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdebias as jd

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "reference" / "released_curves.json"
I = np.arange(576, dtype=np.float64)


def _synthetic(rng, b, shape, noise=0.3):
    content = np.exp(rng.normal(0, noise, shape + (576,)))
    return content * np.exp(b[..., None] * I)


def test_released_curves_match_published_parameters():
    ref = json.loads(SHARED.read_text()) if SHARED.exists() else None
    if ref is None:  # the numbers copied into the package are still checked against the formula below
        ref = {"exp": jd.RELEASED_EXP_B, "poly3_inverse": {"fastv": jd.RELEASED_POLY3_INVERSE["fastv"]}}
    for method, tasks in ref["exp"].items():
        assert set(tasks) == set(jd.RELEASED_EXP_B[method])
        for task, b in tasks.items():
            np.testing.assert_allclose(jd.released_curve(method, task).weights(576), np.exp(-b * I), rtol=2e-6)
    c = np.asarray(ref["poly3_inverse"]["fastv"])
    expect = 1.0 / (c[0] + c[1] * I + c[2] * I**2 + c[3] * I**3)
    np.testing.assert_allclose(jd.released_curve("fastv").weights(576), expect, rtol=2e-6)
    assert jd.released_curve("fastv", "gqa").weights(576)[0] == pytest.approx(1.0)
    np.testing.assert_allclose(jd.released_curve("PyramidDrop", "GQA").b, jd.RELEASED_EXP_B["pdrop"]["gqa"])


def test_released_curve_errors_list_known_names():
    with pytest.raises(KeyError, match="Known methods: fastv, himap, pdrop, sparsevlm, tokencarve"):
        jd.released_curve("visionzip", "gqa")
    with pytest.raises(KeyError, match="Known tasks for himap: gqa, mmbench"):
        jd.released_curve("himap", "coco")


class FitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fit_exp_recovers_b_and_equals_numpy_wls(self):
        rng = np.random.default_rng(0)
        b = np.array([[0.001, 0.003], [0.005, -0.002]])
        s = _synthetic(rng, b, (2, 2))
        valid = rng.random(s.shape) > 0.2
        got = np.asarray(self.variant(lambda s, v: jd.fit_exp_curve(s, v).b)(s, valid))
        for idx in np.ndindex(2, 2):
            v = valid[idx]
            slope = np.polyfit(I[v], np.log(s[idx][v]), 1)[0]
            np.testing.assert_allclose(got[idx], slope, rtol=1e-3, atol=2e-7)
        np.testing.assert_allclose(got, b, atol=2e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_online_fit_recovers_b_despite_object_and_sinks(self):
        rng = np.random.default_rng(1)
        b = np.array([0.002, 0.004, 0.0])
        s = _synthetic(rng, b, (3,))
        s[:, 100:110] *= 5.0  # an object
        s[:, [7, 300]] *= 80.0  # a couple of sinks
        got = np.asarray(self.variant(lambda s: jd.fit_online(s).b)(s))
        np.testing.assert_allclose(got, b, atol=2.5e-4)
        # the debiased scores have no trend left
        flat = jd.bias_strength(jd.debias(s, curve="online"))["slope"]
        assert np.all(np.abs(np.asarray(flat)) < 2.5e-4)

    def test_fit_poly3_inverse_recovers_fastv_curve(self):
        c = np.asarray(jd.RELEASED_POLY3_INVERSE["fastv"])
        trend = c[0] + c[1] * I + c[2] * I**2 + c[3] * I**3
        s = 0.01 * trend
        got = jd.fit_curve(s, form="poly3_inverse")
        np.testing.assert_allclose(got.weights(576), 1.0 / trend, rtol=2e-3)
        # against numpy's polyfit of the same data (normalised to c0 = 1)
        ref = np.polyfit(I, s, 3)[::-1]
        np.testing.assert_allclose(got.weights(576), ref[0] / np.polyval(ref[::-1], I), rtol=2e-3)

    def test_fit_exp_plus_c_recovers_trend(self):
        a, b, c = -0.5, 0.006, 1.2  # a saturating increase, c - 0.5 e^{-b i}
        trend = a * np.exp(-b * I) + c
        rng = np.random.default_rng(2)
        s = trend * np.exp(rng.normal(0, 0.05, 576))
        got = jd.fit_curve(s, form="exp+c")
        np.testing.assert_allclose(got.weights(576), trend[0] / trend, rtol=0.05)
        with pytest.raises(ValueError, match="form must be one of"):
            jd.fit_curve(s, form="linear")


def test_calibration_streams_like_the_full_mean():
    rng = np.random.default_rng(3)
    s = _synthetic(rng, np.full((40,), 0.003), (40,))
    valid = np.ones_like(s, bool)
    valid[:20, :48] = False  # letterbox padding in half the samples
    valid[5, 500:] = False
    cal = jd.Calibration.init(576)
    update = jax.jit(lambda c, s, v: c.update(s, v))
    for lo in range(0, 40, 8):
        cal = update(cal, s[lo:lo + 8], valid[lo:lo + 8])
    norm = s / (np.where(valid, s, 0).sum(1, keepdims=True) / valid.sum(1, keepdims=True))
    expect = np.where(valid, norm, 0).sum(0) / valid.sum(0)
    np.testing.assert_allclose(cal.mean(), expect, rtol=1e-4)
    assert int(cal.n_samples) == 40
    np.testing.assert_allclose(cal.fit("exp").b, 0.003, atol=1e-4)
    with pytest.raises(ValueError, match="initialised for N=576"):
        cal.update(s[:, :100])
    bad = s[:1].copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cal.update(bad)


def test_bias_strength_numbers():
    s = np.ones((2, 16))
    s[0] *= np.exp(0.1 * np.arange(16))
    pad = np.ones((2, 16), bool)
    pad[:, :4] = False
    s[1, :4] = 3.0
    out = jd.bias_strength(s, content=pad)
    np.testing.assert_allclose(out["slope"], [0.1, 0.0], atol=1e-5)
    np.testing.assert_allclose(out["trend_ratio"], [np.exp(1.5), 1.0], rtol=1e-4)
    expect0 = s[0, :4].mean() / s[0, 4:].mean()
    np.testing.assert_allclose(out["pad_ratio"], [expect0, 3.0], rtol=1e-5)
    assert np.isnan(np.asarray(jd.bias_strength(s)["pad_ratio"])).all()


def test_curve_dict_round_trip():
    for curve in (jd.ExpCurve(jnp.float32(0.002)), jd.released_curve("fastv"),
                  jd.ExpConstCurve(jnp.float32(-1.0), jnp.float32(0.01), jnp.float32(2.0))):
        back = jd.curve_from_dict(json.loads(json.dumps(jd.curve_to_dict(curve))))
        np.testing.assert_allclose(back.weights(50), curve.weights(50), rtol=1e-6)
    with pytest.raises(ValueError, match="missing field 'b'"):
        jd.curve_from_dict({"form": "exp"})


def test_debias_is_multiplicative_and_checks_inputs():
    rng = np.random.default_rng(4)
    s = rng.random((2, 576))
    pad = rng.random((2, 576)) > 0.3
    curve = jd.released_curve("himap", "gqa")
    np.testing.assert_allclose(jd.debias(s, curve=curve, content=pad),
                               s * np.exp(-jd.RELEASED_EXP_B["himap"]["gqa"] * I) * pad, rtol=1e-5)
    np.testing.assert_allclose(jd.debias(s), s, rtol=1e-7)
    with pytest.raises(ValueError, match="content has 575"):
        jd.debias(s, content=pad[:, :575])
    with pytest.raises(ValueError, match="released_curve"):
        jd.debias(s, curve="released")
    with pytest.raises(ValueError, match="grid=20 does not tile"):
        jd.debias(s, curve="online", grid=20)
