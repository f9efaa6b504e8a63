"""The methods' pure parts against NumPy re-derivations: SparseVLM's text raters and DPC-KNN clustering +
merging (named options), TokenCarve's information scores (an SVD) and the project's earlier fusion and merging
(legacy names). The released rules at their defaults: test_released_rules.py."""

import chex
import jax
import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods.sparsevlm import RecycleStage, dpc_knn_merge
from jaxdebias.methods.tokencarve import CarveStage


def np_raters(hv, ht, valid, scaled=False, strict=True):
    """Released rule: softmax over text of raw dot products, mean over visual rows, strictly above the mean.
    ``scaled``/``strict=False``: the project's earlier 1/sqrt(D) and >= variant."""
    out = []
    for v, t, ok in zip(hv, ht, valid):
        idx = np.nonzero(ok)[0]
        logits = v @ t[idx].T / (np.sqrt(v.shape[-1]) if scaled else 1.0)
        p = np.exp(logits - logits.max(1, keepdims=True))
        r = (p / p.sum(1, keepdims=True)).mean(0)
        row = np.zeros(len(t), bool)
        row[idx] = (r > r.mean()) if strict else (r >= r.mean())
        out.append(row)
    return np.stack(out)


def np_dpc_knn(x, k, clusters):
    """TCFormer-style DPC-KNN on the valid tokens of one sample, then the mean of each cluster."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(x.shape[-1])
    kk = min(k, len(x))
    density = np.exp(-(np.sort(d, 1)[:, :kk] ** 2).mean(1))
    parent = np.array([d[i][density > density[i]].min() if (density > density[i]).any() else d.max()
                       for i in range(len(x))])
    centres = np.argsort(-(parent * density), kind="stable")[:clusters]
    assign = d[centres].argmin(0)
    assign[centres] = np.arange(len(centres))
    return np.stack([x[assign == c].mean(0) for c in range(len(centres))])


class RatersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equal_numpy(self):
        rng = np.random.default_rng(0)
        hv, ht = rng.normal(size=(3, 9, 16)), rng.normal(size=(3, 12, 16))
        valid = rng.random((3, 12)) < 0.7
        got = self.variant(jd.text_raters)(hv, ht, valid)
        np.testing.assert_array_equal(np.asarray(got), np_raters(hv, ht, valid))
        assert not np.asarray(got)[~valid].any()
        old = self.variant(lambda a, b, c: jd.text_raters(a, b, c, scaled=True, strict=False))(hv, ht, valid)
        np.testing.assert_array_equal(np.asarray(old), np_raters(hv, ht, valid, scaled=True, strict=False))


class DpcKnnTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equal_numpy_with_invalid_slots(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(4, 20, 8)).astype(np.float32)
        x[:, :6] += 3.0  # a dense group
        valid = np.ones((4, 20), bool)
        valid[1, 15:] = False
        valid[2, ::3] = False
        fn = self.variant(lambda a, v: dpc_knn_merge(a, v, 3, k=5))
        merged, ok = fn(x, valid)
        for b in range(4):
            ref = np_dpc_knn(x[b][valid[b]], 5, 3)
            np.testing.assert_allclose(np.asarray(merged[b]), ref, atol=1e-5)
            assert np.asarray(ok[b]).all()

    def test_fewer_valid_tokens_than_clusters(self):
        x = np.random.default_rng(2).normal(size=(1, 6, 4)).astype(np.float32)
        valid = np.array([[True, False, True, False, False, False]])
        merged, ok = dpc_knn_merge(x, valid, 4)
        assert np.asarray(ok).tolist() == [[True, True, False, False]]
        np.testing.assert_allclose(np.sort(np.asarray(merged)[0, :2], 0), np.sort(x[0, [0, 2]], 0), atol=1e-6)


def test_sparsevlm_schedule_matches_the_published_lists():
    for keep, lists in {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}.items():
        stages = jd.PruneSpec("sparsevlm", keep=keep).schedule(576, 32)
        assert [s.layer for s in stages] == [2, 6, 15] and tuple(s.keep for s in stages) == lists
        prev = 576
        for s in stages:  # int(0.3 * pruned) + 1 recycled into int(recycled / 10) + 1 clusters
            assert s.recycle == int((prev - s.keep) * 0.3) + 1 and s.clusters == int(s.recycle / 10) + 1
            prev = s.keep + s.clusters
        layer_avg = (2 * 576 + 4 * lists[0] + 9 * lists[1] + 17 * lists[2]) / 32
        assert abs(layer_avg - keep) / keep < 0.07
    shape, limits = jd.PruneSpec("sparsevlm", keep=128).plan(576, 32)
    assert limits == (303, 110, 36) and [s.slots for s in shape.stages] == [303, 110, 36]  # exact, not bucketed
    with pytest.raises(ValueError, match="need clusters <= recycled <= pruned"):
        jd.PruneSpec("sparsevlm", stages=(RecycleStage(2, 5, "raters", "tap", recycle=6, clusters=1),)).schedule(9, 4)


def test_merged_tokens_pass_debiasing_unchanged():
    s = jax.numpy.ones((1, 4))
    raster = jax.numpy.array([[0, 5, -1, 8]])
    out = jd.debias_scores(s, raster, jax.numpy.ones((1, 4), bool), jax.numpy.array([[False, True, False, True]]),
                                jd.ExpCurve(0.1), 9)
    np.testing.assert_allclose(np.asarray(out), [[0.0, np.exp(-0.5), 1.0, np.exp(-0.8)]], rtol=1e-6)


def test_tokencarve_schedule_and_checks():
    (s,) = jd.PruneSpec("tokencarve", keep=128).schedule(576, 32)
    # the release: R = int(1.5 n) candidates, int(n / 2) merged, original positions
    assert (s.layer, s.keep, s.merge, s.query, s.source, s.info_weight) == (2, 128, 64, "last", "tap", 0.5)
    assert jd.PruneSpec("tokencarve").positions == "original"
    with pytest.raises(ValueError, match=r"keeps n=400 of int\(1.5 n\)=600 candidates, but there are only 576"):
        jd.PruneSpec("tokencarve", keep=400).schedule(576, 32)  # int(1.5 * 400) > 576 candidates
    with pytest.raises(ValueError, match="keep at most 6"):
        jd.PruneSpec("tokencarve", stages=(CarveStage(2, 7),)).schedule(9, 4)
    with pytest.raises(ValueError, match="info_weight must be in"):
        jd.PruneSpec("tokencarve", stages=(CarveStage(2, 5, "last", "tap", info_weight=1.5),)).schedule(9, 4)
    with pytest.raises(ValueError, match="TokenCarve needs source 'tap'"):
        jd.PruneSpec("tokencarve", stages=(CarveStage(2, 5, "last", "probe", info_weight=0.5),)).schedule(9, 4)
