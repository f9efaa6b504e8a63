import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxdebias as jd


def _attn(rng, B, H, Q, T):
    x = rng.normal(size=(B, H, Q, T))
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


class VisualScoresTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(head_reduce=["mean", "sum", "max"], query_reduce=["mean", "sum", "max"])
    def test_matches_numpy(self, head_reduce, query_reduce):
        rng = np.random.default_rng(0)
        B, H, Q, T, N = 2, 3, 5, 20, 6
        attn = _attn(rng, B, H, Q, T)
        starts = [4, 9]  # different image offsets per sample
        visual = np.zeros((B, T), bool)
        for b, s in enumerate(starts):
            visual[b, s:s + N] = True
        qmask = rng.random((B, Q)) > 0.4
        qmask[:, 0] = True
        fn = self.variant(lambda a, v, q: jd.visual_scores(a, v, q, n=N, head_reduce=head_reduce,
                                                           query_reduce=query_reduce))
        got = np.asarray(fn(attn, visual, qmask))
        red = {"mean": np.mean, "sum": np.sum, "max": np.max}
        for b, s in enumerate(starts):
            rows = attn[b][:, qmask[b]]  # [H, q, T]
            per_head = red[query_reduce](rows, axis=1)
            expect = red[head_reduce](per_head, axis=0)[s:s + N]
            np.testing.assert_allclose(got[b], expect, rtol=1e-5, atol=1e-7)

    def test_fewer_visual_tokens_give_zero_slots(self):
        attn = _attn(np.random.default_rng(1), 2, 1, 1, 10)
        visual = np.zeros((2, 10), bool)
        visual[0, 2:6] = True
        visual[1, 3:5] = True
        s = np.asarray(jd.visual_scores(attn, visual))
        assert s.shape == (2, 4)
        np.testing.assert_allclose(s[1, :2], attn[1, 0, 0, 3:5], rtol=1e-6)
        assert (s[1, 2:] == 0).all()

    def test_errors(self):
        attn = np.ones((1, 1, 2, 5)) / 5
        with pytest.raises(ValueError, match="rank 4"):
            jd.visual_scores(attn[0], np.ones((1, 5), bool))
        with pytest.raises(ValueError, match="visual_mask must be bool"):
            jd.visual_scores(attn, np.ones((1, 4), bool))
        with pytest.raises(ValueError, match="head_reduce"):
            jd.visual_scores(attn, np.ones((1, 5), bool), head_reduce="median")
        with pytest.raises(ValueError, match="query_mask"):
            jd.visual_scores(attn, np.ones((1, 5), bool), np.ones((1, 3), bool))
        with pytest.raises(ValueError, match="pass n="):
            jax.jit(lambda a, v: jd.visual_scores(a, v))(attn, np.ones((1, 5), bool))


def test_query_masks_left_and_right_padding():
    am = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    vis = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], bool)
    last = np.asarray(jd.query_mask("last", attention_mask=am))
    assert last[0].tolist() == [0, 0, 0, 1, 0, 0] and last[1].tolist() == [0, 0, 0, 0, 0, 1]
    after = np.asarray(jd.query_mask("after_image", attention_mask=am, visual_mask=vis))
    assert after[0].tolist() == [0, 0, 0, 1, 0, 0] and after[1].tolist() == [0, 0, 0, 0, 1, 1]
    pos = np.asarray(jd.query_mask("position", attention_mask=am, position=jnp.array([2, 4])))
    assert pos.sum(1).tolist() == [1, 1] and pos[0, 2] and pos[1, 4]
    assert (np.asarray(jd.query_mask("text", attention_mask=am, visual_mask=vis)) == after).all()  # one vocabulary
    image = np.asarray(jd.query_mask("image", attention_mask=am, visual_mask=vis))
    assert (image == (vis & (am == 1))).all()
    raters = np.asarray(jd.query_mask("raters", attention_mask=am, visual_mask=vis, raters=np.eye(6, dtype=bool)[[3, 5]]))
    assert raters[0].tolist() == [0, 0, 0, 1, 0, 0] and raters[1].tolist() == [0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="Unknown query kind 'first'"):
        jd.query_mask("first", attention_mask=am)
