import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jaxdebias as jd
from jaxdebias import prune


def np_topk(scores, valid, k):
    """Reference: stable order by (-score, index) over valid tokens, kept indices ascending."""
    out_idx, out_slot = [], []
    for s, v in zip(scores, valid):
        cand = [i for i in np.lexsort((np.arange(len(s)), -s)) if v[i]][:k]
        out_idx.append(sorted(cand))
        out_slot.append(len(cand))
    return out_idx, out_slot


def test_bucket():
    assert jd.bucket(1) == 16 and jd.bucket(64) == 64 and jd.bucket(65) == 96 and jd.bucket(576) == 576
    assert jd.bucket(7, (8, 4, 16)) == 8
    assert jd.bucket(4097, (64, 4096), then_every=1024) == 5120 and jd.bucket(40, (), then_every=64) == 64
    with pytest.raises(ValueError, match="larger than the largest bucket 576"):
        jd.bucket(577)
    with pytest.raises(ValueError, match="k must be > 0"):
        jd.bucket(0)
    with pytest.raises(TypeError, match="Python int"):
        jd.bucket(3.0)


@given(data=st.data(), n=st.integers(1, 40), b=st.integers(1, 3))
@settings(max_examples=120, deadline=None)
def test_select_topk_properties(data, n, b):
    k = data.draw(st.integers(1, n))
    # few distinct values, so ties are common
    scores = np.array(data.draw(st.lists(st.integers(0, 6), min_size=b * n, max_size=b * n)), np.float32)
    scores = scores.reshape(b, n)
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=b * n, max_size=b * n))).reshape(b, n)
    idx, slot = (np.asarray(x) for x in jd.select_topk(scores, k, valid=valid))
    ref_idx, ref_count = np_topk(scores, valid, k)
    for r in range(b):
        count = ref_count[r]
        assert slot[r].tolist() == [True] * count + [False] * (k - count)  # masks consistent, kept first
        assert idx[r, :count].tolist() == ref_idx[r]  # exactly the top-k valid, ascending, ties to lower index
        assert valid[r, idx[r, :count]].all()  # padding never selected
        assert len(set(idx[r].tolist())) == k  # empty slots point at distinct unselected tokens


class SelectTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_never_kept_while_content_remains(self):
        rng = np.random.default_rng(0)
        scores = rng.random((2, 576)).astype(np.float32)
        pad = np.asarray(jd.pad_mask_expand2square(np.array([640, 1000]), np.array([480, 300])))
        scores[~pad] += 10.0  # the padding sink
        fn = self.variant(lambda s, p: jd.debias_and_select(s, 128, content=p), )
        idx, slot, deb = fn(scores, pad)
        assert np.asarray(slot).all()
        assert pad[0, np.asarray(idx[0])].all() and pad[1, np.asarray(idx[1])].all()
        # 1000x300: only ~7 content rows (168 tokens) -> ask for more than exist: empty slots, not padding
        idx, slot, _ = jd.debias_and_select(scores, 192, content=pad)
        n_content = pad.sum(1)
        assert np.asarray(slot).sum(1).tolist() == np.minimum(n_content, 192).tolist()
        kept = np.asarray(idx)[np.asarray(slot)]
        assert np.concatenate([pad[0, np.asarray(idx[0])[np.asarray(slot[0])]],
                               pad[1, np.asarray(idx[1])[np.asarray(slot[1])]]]).all() and kept.size

    @chex.variants(with_jit=True, without_jit=True)
    def test_gather_tokens(self):
        x = np.random.default_rng(1).normal(size=(2, 10, 3, 4)).astype(np.float32)
        idx = np.array([[0, 4, 9], [2, 3, 5]])
        got = self.variant(jd.gather_tokens)(x, idx)
        np.testing.assert_array_equal(got, np.stack([x[0, idx[0]], x[1, idx[1]]]))

    def test_debias_changes_the_kept_set_as_the_formula_says(self):
        i = np.arange(576)
        scores = (np.exp(0.004 * i) * (1 + 0.01 * np.cos(i))).astype(np.float32)[None]
        curve = jd.ExpCurve(jnp.float32(0.004))
        plain, _, _ = jd.debias_and_select(scores, 64)
        deb, _, d = jd.debias_and_select(scores, 64, curve=curve)
        assert np.asarray(plain)[0].min() >= 576 - 80  # recency wins without debias
        np.testing.assert_array_equal(np.asarray(plain)[0], np.sort(np.argsort(-scores[0], kind="stable")[:64]))
        expect = np.sort(np.argsort(-(scores[0] * np.exp(-0.004 * i)), kind="stable")[:64])
        np.testing.assert_array_equal(np.asarray(deb)[0], expect)


def test_nan_scores_are_reported():
    s = np.ones((1, 8), np.float32)
    s[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN cannot be ranked"):
        jd.select_topk(s, 2)
    with pytest.raises(ValueError, match="NaN cannot be ranked"):
        jd.debias_and_select(s, 2)
    # a NaN at an invalid position is fine
    valid = np.ones((1, 8), bool)
    valid[0, 3] = False
    idx, slot = jd.select_topk(s, 2, valid=valid)
    assert 3 not in np.asarray(idx)[0].tolist()
    # under jit the same check is available through checkify
    err, _ = checkify.checkify(jax.jit(lambda s: jd.select_topk(s, 2)))(s)
    with pytest.raises(Exception, match="NaN cannot be ranked"):
        err.throw()


def test_select_errors():
    s = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="k=9 exceeds the number of tokens N=8"):
        jd.select_topk(s, 9)
    with pytest.raises(ValueError, match="k must be > 0"):
        jd.select_topk(s, 0)
    with pytest.raises(ValueError, match="must agree in shape"):
        jd.select_topk(s, 2, valid=np.ones((2, 7), bool))
    with pytest.raises(ValueError, match="rank 1 or 2"):
        jd.select_topk(np.ones((2, 2, 8)), 2)


def test_one_compile_per_bucket():
    prune._debias_and_select.clear_cache()  # other tests in this process may have compiled the same shapes
    before = prune._debias_and_select._cache_size()
    rng = np.random.default_rng(2)
    pad = np.asarray(jd.pad_mask_expand2square(np.array([640, 480, 500, 999]), np.array([480, 640, 500, 100])))
    curve = jd.released_curve("pdrop", "gqa")
    requested = [50, 52, 64, 70, 90, 96, 49, 61]  # -> buckets 64 and 96
    for trial, k in enumerate(requested * 3):
        scores = rng.random((4, 576)).astype(np.float32) * (trial + 1)
        jd.debias_and_select(scores, jd.bucket(k), curve=curve, content=pad)
    assert prune._debias_and_select._cache_size() - before == len({jd.bucket(k) for k in requested}) == 2
    for trial in range(5):  # the online fit is its own program, again once per bucket
        jd.debias_and_select(rng.random((4, 576)).astype(np.float32), jd.bucket(50), curve="online", content=pad)
    assert prune._debias_and_select._cache_size() - before == 3


def test_kept_mask_marks_exactly_the_kept_slots():
    scores = jnp.asarray(np.random.default_rng(3).random((3, 12)), jnp.float32)
    valid = jnp.asarray(np.arange(12)[None] < np.array([[12], [5], [2]]))
    idx, slot = jd.select_topk(scores, 4, valid=valid)  # rows 2: fewer valid tokens than slots
    m = np.asarray(jd.kept_mask(idx, slot, 12))
    ref, _ = np_topk(np.asarray(scores), np.asarray(valid), 4)
    assert [sorted(np.nonzero(r)[0].tolist()) for r in m] == ref
