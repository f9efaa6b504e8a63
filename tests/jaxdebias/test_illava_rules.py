"""iLLaVA's two merge rules (hulianyuyy/iLLaVA@4068149, ``shared/reference/methods.md`` section "iLLaVA") against
NumPy re-derivations written from the text of the rule, never by calling jaxdebias:

- encoder stage (siglip_encoder.py L390-420): a = mean over query rows of mean_h attn; the r + 1 least-attended
  tokens ascending; the last of them <- weighted mean with w = (r + 1, ..., 1); the other r dropped;
- LLM stage (modeling_qwen2.py ``forward_illava`` L1019-1062): all N by descending score; idx[N-r-1:] merged with
  weights (1, ..., r + 1) into idx[N-r-1]; sort(idx[:N-r]) kept.

Inputs are tie-free except where a test checks the tie rule (ours: lower index first, as ``lax.top_k``).
"""

import chex
import jax
import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import illava


def ref_encoder_merge(x, attn, r, protected=0):
    """One sample. x [P, D], attn [H, P, P] -> (x' [P - r, D] float64, kept [P - r])."""
    a = attn.astype(np.float64).mean(0).mean(0)  # mean over heads, then over query rows
    cand = sorted(range(protected, len(a)), key=lambda p: (a[p], p))  # ascending; ties: lower index first
    idx = cand[:r + 1]
    w = np.arange(r + 1, 0, -1, dtype=np.float64)  # the least attended (idx[0]) weighs r + 1
    x = x.astype(np.float64).copy()
    x[idx[-1]] = w @ x[idx] / w.sum()
    kept = sorted(set(range(len(a))) - set(idx[:-1]))
    return x[kept], np.array(kept)


def ref_llm_merge(x, s, r, valid=None):
    """One sample. x [N, D], s [N] -> (kept [N - r], features [N - r, D] float64). ``valid`` (ours): invalid
    tokens order after the valid ones and weigh 0."""
    N = len(s)
    valid = np.ones(N, bool) if valid is None else valid
    idx = sorted(range(N), key=lambda i: (not valid[i], -s[i], i))  # descending; ties: lower index first
    group = idx[N - r - 1:]
    w = np.arange(1, r + 2, dtype=np.float64) * valid[group]  # target idx[N-r-1] weighs 1, the last r + 1
    x = x.astype(np.float64).copy()
    if w.sum() > 0:
        x[group[0]] = w @ x[group] / w.sum()
    kept = np.array(sorted(idx[:N - r]))
    return kept, x[kept]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def encoder_inputs(B=2, H=3, P=17, D=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, P, D)).astype(np.float32),
            softmax(rng.normal(size=(B, H, P, P)) * 2).astype(np.float32))


class EncoderMergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_numpy(self):
        x, attn = encoder_inputs()
        for r, protected in ((4, 0), (0, 1), (15, 1)):
            f = self.variant(lambda x, a: illava.illava_encoder_merge(x, a, r, protected))
            got_x, got_kept = f(x, attn)
            chex.assert_shape(got_x, (2, 17 - r, 8))
            for b in range(2):
                want_x, want_kept = ref_encoder_merge(x[b], attn[b], r, protected)
                np.testing.assert_array_equal(np.asarray(got_kept[b]), want_kept)
                np.testing.assert_allclose(np.asarray(got_x[b]), want_x, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_example_and_protected_cls(self):
        x = np.arange(5 * 2, dtype=np.float32).reshape(1, 5, 2)
        received = np.array([0.05, 0.4, 0.1, 0.25, 0.2], np.float32)  # CLS (0) is the least attended
        attn = np.broadcast_to(received, (1, 2, 5, 5)).copy()
        # no CLS: r = 2 -> ascending [0, 2, 4]; x4 <- (3 x0 + 2 x2 + 1 x4) / 6; drop 0 and 2
        got_x, kept = self.variant(lambda x, a: illava.illava_encoder_merge(x, a, 2))(x, attn)
        np.testing.assert_array_equal(kept[0], [1, 3, 4])
        np.testing.assert_allclose(got_x[0, 2], (3 * x[0, 0] + 2 * x[0, 2] + x[0, 4]) / 6, rtol=1e-6)
        np.testing.assert_array_equal(got_x[0, :2], x[0, [1, 3]])
        # CLS protected: ascending among 1..4 = [2, 4, 3]; x3 <- (3 x2 + 2 x4 + x3) / 6
        got_x, kept = self.variant(lambda x, a: illava.illava_encoder_merge(x, a, 2, 1))(x, attn)
        np.testing.assert_array_equal(kept[0], [0, 1, 3])
        np.testing.assert_allclose(got_x[0, 2], (3 * x[0, 2] + 2 * x[0, 4] + x[0, 3]) / 6, rtol=1e-6)

    def test_tie_rule_lower_index_first(self):
        x = np.eye(4, dtype=np.float32)[None]
        attn = np.full((1, 1, 4, 4), 0.25, np.float32)  # every token receives the same attention
        got_x, kept = illava.illava_encoder_merge(x, attn, 1)  # idx = [0, 1]: x1 <- (2 x0 + x1) / 3
        np.testing.assert_array_equal(kept[0], [1, 2, 3])
        np.testing.assert_allclose(got_x[0, 0], [2 / 3, 1 / 3, 0, 0], rtol=1e-6)

    def test_checks(self):
        x, attn = encoder_inputs(P=5)
        with pytest.raises(ValueError, match="r="):
            illava.illava_encoder_merge(x, attn, 4, protected=1)
        with pytest.raises(ValueError, match="attn"):
            illava.illava_encoder_merge(x, attn[:, :, :4], 1)


class LlmMergeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_numpy(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(2, 20, 6)).astype(np.float32)
        s = rng.random((2, 20)).astype(np.float32)
        valid = np.ones((2, 20), bool)
        valid[1, [0, 3, 7, 8]] = False
        for r in (0, 6, 19):
            for v in (None, valid):
                kept, feats = self.variant(lambda x, s, v: illava.illava_llm_merge(x, s, r, v))(x, s, v)
                chex.assert_shape(feats, (2, 20 - r, 6))
                for b in range(2):
                    want_k, want_f = ref_llm_merge(x[b], s[b], r, None if v is None else v[b])
                    np.testing.assert_array_equal(np.asarray(kept[b]), want_k)
                    np.testing.assert_allclose(np.asarray(feats[b]), want_f, rtol=1e-6, atol=1e-6)

    def test_weight_order(self):
        x = np.arange(5 * 2, dtype=np.float32).reshape(1, 5, 2)
        s = np.array([[0.1, 0.5, 0.3, 0.05, 0.2]], np.float32)  # descending: [1, 2, 4, 0, 3]
        kept, feats = jax.jit(illava.illava_llm_merge, static_argnums=2)(x, s, 2)
        # group idx[2:] = [4, 0, 3] with weights (1, 2, 3): x4 <- (x4 + 2 x0 + 3 x3) / 6; keep sort([1, 2, 4])
        np.testing.assert_array_equal(kept[0], [1, 2, 4])
        np.testing.assert_allclose(feats[0, 2], (x[0, 4] + 2 * x[0, 0] + 3 * x[0, 3]) / 6, rtol=1e-6)
        np.testing.assert_array_equal(feats[0, :2], x[0, [1, 2]])

    def test_tie_rule_lower_index_first(self):
        x = np.eye(3, dtype=np.float32)[None]
        kept, feats = illava.illava_llm_merge(x, np.zeros((1, 3), np.float32), 1)  # order [0, 1, 2]
        np.testing.assert_array_equal(kept[0], [0, 1])
        np.testing.assert_allclose(feats[0, 1], [0, 1 / 3, 2 / 3], rtol=1e-6)


def test_llm_count_and_constants():
    assert illava.illava_llm_count(576, 0.70) == 173  # round(172.8)
    assert illava.illava_llm_count(288, 0.70) == 86  # round(86.4) merged away: the release's 0.70 keeps 202 of 288
    spec = jd.PruneSpec("illava", keep=128, options={"llm_r": 0.70})  # the release's fraction instead of --keep
    assert [s.keep for s in spec.schedule(576, 32)] == [202]
    assert [s.keep for s in jd.PruneSpec("illava", keep=128).schedule(576, 32)] == [128]
    assert illava.illava_llm_count(361, 0.70) == round(361 * (1 - 0.70))
    assert illava.illava_llm_count(10, 0.75) == 2  # round(2.5) = 2: Python's halves-to-even, as released
    assert illava.illava_llm_count(100, 5.0) == 5 and illava.illava_llm_count(100, 1) == 1
    for bad in (0, -0.5, 100.0):
        with pytest.raises(ValueError):
            illava.illava_llm_count(100, bad)
    # published OneVision: SigLIP 729 -> 361; ours on CLIP-L/336: 576 patches -> 288 (CLS kept apart)
    assert 729 - len(illava.ONEVISION_VIT_LAYERS) * illava.ONEVISION_VIT_R == 361
    assert 576 - len(illava.LLAVA15_VIT_LAYERS) * illava.LLAVA15_VIT_R == 288
    assert max(illava.LLAVA15_VIT_LAYERS) < 23  # LLaVA-1.5 runs 23 CLIP layers (feature layer -2)
    assert (illava.ONEVISION_LLM_LAYER, illava.ONEVISION_LLM_R) == (8, 0.70)
