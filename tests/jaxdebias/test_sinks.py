import chex
import numpy as np
import pytest

import jaxdebias as jd


def np_sink_value(x, dims):
    x = x.astype(np.float64)
    return np.abs(x[..., dims]).max(-1) / np.sqrt((x**2).mean(-1) + 1e-6)


def planted_hidden(rng, B=2, T=30, D=1024, dims=(5, 41), sinks=((0, 3, 12), (0, 20))):
    h = rng.normal(size=(B, T, D)).astype(np.float32)
    for b, toks in enumerate(sinks):
        for t in toks:
            h[b, t, dims[0]] = 300.0
            h[b, t, dims[1]] = -180.0
    return h


def test_sink_value_and_tokens():
    rng = np.random.default_rng(0)
    h = planted_hidden(rng)
    np.testing.assert_allclose(jd.sink_dim_value(h, [5, 41]), np_sink_value(h, [5, 41]), rtol=1e-5)
    got = np.asarray(jd.sink_tokens(h, [5, 41]))
    assert np.nonzero(got[0])[0].tolist() == [0, 3, 12] and np.nonzero(got[1])[0].tolist() == [0, 20]
    # strictly greater than tau
    x = np.zeros((1, 4), np.float32)
    x[0, 0] = 2.0
    v = float(jd.sink_dim_value(x, [0])[0])
    assert not bool(jd.sink_tokens(x, [0], tau=v)[0]) and bool(jd.sink_tokens(x, [0], tau=v - 1e-3)[0])


def test_discover_sink_dims():
    rng = np.random.default_rng(1)
    h = planted_hidden(rng, dims=(77, 9))
    dims, strength = jd.discover_sink_dims(h, top=2)
    assert sorted(np.asarray(dims).tolist()) == [9, 77]
    assert float(strength.min()) > 15  # massive: ordinary dims stay near 4
    valid = np.ones(h.shape[:2], bool)
    valid[:, [0, 3, 12, 20]] = False  # with the sinks masked there is nothing massive left
    _, strength = jd.discover_sink_dims(h, top=2, valid=valid)
    assert float(strength.max()) < 10


def test_known_dims_table_and_errors():
    assert jd.known_sink_dims("LLaVA-1.5-7B") == (1415, 2533)
    assert jd.known_sink_dims("vicuna-13b") == (2100, 4743)
    assert jd.known_sink_dims("llava-1.5-13b", as_released=True) == (1415, 2533)  # what the VAR release runs
    with pytest.raises(KeyError, match="discover_sink_dims"):
        jd.known_sink_dims("qwen2-7b")
    with pytest.raises(ValueError, match="out of range for hidden size 64"):
        jd.sink_dim_value(np.ones((2, 64)), [70])


def np_var(attn, visual, sink, p=0.6, min_visual=0.2, rho=0.5):
    """Straight re-derivation of the released VAR rule, row by row."""
    out = attn.astype(np.float64).copy()
    B, H, Q, T = attn.shape
    selected = np.zeros((B, H, Q), bool)
    for b in range(B):
        V, S = visual[b], sink[b]
        Sv = V & S
        if not Sv.any():
            continue
        for h in range(H):
            for q in range(Q):
                a = attn[b, h, q].astype(np.float64)
                if a[V].sum() >= min_visual and a[Sv].sum() / (a[V] + 1e-6).sum() <= rho:
                    selected[b, h, q] = True
                    recv = V & ~S
                    if a[recv].sum() == 0:
                        continue
                    freed = (1 - p) * a[S].sum()
                    new = a.copy()
                    new[S] = p * a[S]
                    new[recv] = a[recv] + freed * a[recv] / a[recv].sum()
                    out[b, h, q] = new
    return selected, out


def planted_attention(rng):
    B, H, Q, T = 3, 4, 5, 40
    logits = rng.normal(size=(B, H, Q, T)) * 1.5
    visual = np.zeros((B, T), bool)
    visual[0, 5:25] = True
    visual[1, 8:36] = True
    visual[2, 2:12] = True
    sink = np.zeros((B, T), bool)
    sink[:, 0] = True  # BOS: a text sink
    sink[0, [7, 19]] = True
    sink[1, 30] = True  # sample 2 has no visual sink: untouched
    logits = logits + 2.5 * sink[:, None, None, :]
    logits[:, :2] += 3.0 * visual[:, None, None, :]  # heads 0-1 look at the image
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return attn.astype(np.float32), visual, sink


class VarTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_rule(self):
        attn, visual, sink = planted_attention(np.random.default_rng(2))

        def fn(a, v, s):
            rows = jd.image_centric_heads(a, v, s)
            return rows, jd.var_redistribute(a, v, s, rows, p=0.6)

        rows, out = self.variant(fn)(attn, visual, sink)
        sel, expect = np_var(attn, visual, sink)
        np.testing.assert_array_equal(rows, sel)
        assert sel[0].any() and sel[1].any() and not sel[2].any() and not sel.all()
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(out).sum(-1), attn.sum(-1), atol=1e-6)
        out = np.asarray(out)
        np.testing.assert_array_equal(out[~sel], attn[~sel])  # bit-identical where not selected
        for b in range(2):
            s = sink[b]
            np.testing.assert_allclose(out[b][sel[b]][:, s], 0.6 * attn[b][sel[b]][:, s], rtol=1e-6)

    def test_p_one_is_identity_and_zero_receivers_are_guarded(self):
        attn, visual, sink = planted_attention(np.random.default_rng(3))
        rows = jd.image_centric_heads(attn, visual, sink)
        np.testing.assert_array_equal(jd.var_redistribute(attn, visual, sink, rows, p=1.0), attn)
        all_sink = visual.copy()  # every image token a sink: nothing can receive
        out = np.asarray(jd.var_redistribute(attn, visual, all_sink, np.ones(attn.shape[:3], bool)))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out, attn)

    def test_errors(self):
        attn, visual, sink = planted_attention(np.random.default_rng(4))
        with pytest.raises(ValueError, match="sink_mask must be bool"):
            jd.image_centric_heads(attn, visual, sink[:, :5])
        with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
            jd.var_redistribute(attn, visual, sink, np.ones(attn.shape[:3], bool), p=1.2)
        with pytest.raises(ValueError, match="rank 4"):
            jd.image_centric_heads(attn[0], visual, sink)
