"""The pure parts of the pruning methods at their defaults against the released rules
(``shared/reference/methods.md``), each re-derived here in plain NumPy / Fraction / PIL from the text of the rule,
never by calling jaxdebias:

- SparseVLM v1.5 raters and DPC-kNN recycling (Gumpest/SparseVLMs@734d900:llava/model/language_model/
  modelling_sparse_llama.py L200-204, utils.py L247-310);
- TokenCarve's SV score, rank fusion, A/B split and merge (ShawnTan86/TokenCarve@a57bd59:TokenCarve/
  modeling_llama.py L1140-1256);
- the padding masks (intcomp/attention-bias@e75ebe7: patches/FastV.patch ``generate_pad_mask``; patches/
  SparseVLMs.patch ``expand2square`` + bilinear resize).

Inputs are tie-free except where a test says it checks the tie rule (lower index first, as ``lax.top_k``).
"""

from fractions import Fraction

import chex
import jax
import numpy as np
import pytest
from PIL import Image

import jaxdebias as jd
from jaxdebias.methods import sparsevlm, tokencarve
from jaxdebias.masks import pad_mask_resized

# ----------------------------------------------------------------------------------------------- SparseVLM raters


def ref_raters(v, t):
    """One sample: M = softmax over text of V T^T (raw), m_j = mean_i M_ij, raters = m_j > mean(m)."""
    logits = v.astype(np.float64) @ t.astype(np.float64).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    m = (p / p.sum(1, keepdims=True)).mean(0)
    return m > m.mean()


class RatersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_raw_logits_strict(self):
        rng = np.random.default_rng(10)
        hv = rng.normal(size=(3, 40, 24)).astype(np.float32) * 0.4
        ht = rng.normal(size=(3, 15, 24)).astype(np.float32) * 0.4
        valid = np.ones((3, 15), bool)
        valid[1, 11:] = False  # right padding of a shorter prompt
        got = np.asarray(self.variant(jd.text_raters)(hv, ht, valid))
        for b in range(3):
            ok = valid[b]
            np.testing.assert_array_equal(got[b][ok], ref_raters(hv[b], ht[b][ok]))
            assert not got[b][~ok].any()
        # the test tells the released rule from the 1/sqrt(D) variant on these inputs
        scaled = [ref_raters(hv[b] / np.sqrt(24), ht[b][valid[b]]) for b in range(3)]
        assert any((got[b][valid[b]] != scaled[b]).any() for b in range(3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_ties_at_the_mean_do_not_rate(self):
        hv = np.random.default_rng(11).normal(size=(1, 5, 8)).astype(np.float32)
        ht = np.ones((1, 4, 8), np.float32)  # identical text tokens: every m_j = 1/4 = mean exactly
        valid = np.ones((1, 4), bool)
        assert not np.asarray(self.variant(jd.text_raters)(hv, ht, valid)).any()
        assert np.asarray(self.variant(lambda a, b, c: jd.text_raters(a, b, c, strict=False))(hv, ht, valid)).all()


# ----------------------------------------------------------------------------------------------- SparseVLM DPC-kNN


def ref_cluster_and_merge(x, c, k=None):
    """methods.md SparseVLM recycling step 3, without the 1e-6 noise: k = c nearest (self included)."""
    x = x.astype(np.float64)
    n, d = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / np.sqrt(d)
    rho = np.exp(-(np.sort(dist, axis=1)[:, :c if k is None else k] ** 2).mean(1))
    delta = np.empty(n)
    for i in range(n):
        denser = rho > rho[i]
        delta[i] = dist[i, denser].min() if denser.any() else dist.max()
    centres = np.argsort(-(delta * rho), kind="stable")[:c]
    assign = dist[centres].argmin(0)
    assign[centres] = np.arange(c)
    return np.stack([x[assign == j].mean(0) for j in range(c)])


class DpcKnnTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_release_counts_with_a_shared_offset(self):
        # 192 budget, layer 2: 276 pruned -> m = 83 recycled -> c = 9 clusters; a large shared offset (as the
        # massive-activation dims of LLaMA hidden states) must not cost precision
        rng = np.random.default_rng(12)
        m, c, d = 83, 9, 48
        x = rng.normal(size=(2, m, d)).astype(np.float32)
        x[:, :20] += rng.normal(size=(1, 1, d)).astype(np.float32) * 2  # a few groups
        x[:, 20:35] += rng.normal(size=(1, 1, d)).astype(np.float32) * 2
        x[..., 3] += 300.0
        valid = np.ones((2, m), bool)
        merged, ok = self.variant(lambda a, v: sparsevlm.dpc_knn_merge(a, v, c))(x, valid)
        assert np.asarray(ok).all()
        for b in range(2):
            np.testing.assert_allclose(np.asarray(merged[b]), ref_cluster_and_merge(x[b], c), rtol=1e-5, atol=1e-4)
        # the test tells the release's k = c from the earlier k = 7 on these inputs
        assert any(not np.allclose(ref_cluster_and_merge(x[b], c), ref_cluster_and_merge(x[b], c, k=7), atol=1e-3)
                   for b in range(2))

    def test_padded_slots_are_left_out(self):
        rng = np.random.default_rng(14)
        x = rng.normal(size=(1, 30, 16)).astype(np.float32)
        valid = np.zeros((1, 30), bool)
        valid[0, 3:25] = True
        x[0, ~valid[0]] = 1e3  # garbage in the unused slots
        merged, ok = jax.jit(lambda a, v: sparsevlm.dpc_knn_merge(a, v, 3))(x, valid)
        assert np.asarray(ok).all()
        np.testing.assert_allclose(np.asarray(merged[0]), ref_cluster_and_merge(x[0, 3:25], 3), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- TokenCarve


def ref_sv(x):
    """SV_i = sum_j S_j |U_ij| from X = U S V^T (float64)."""
    u, s, _ = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    return np.abs(u) @ s


def ref_desc_ranks(s):
    """0-based descending ranks, ties: the lower index first."""
    order = np.argsort(-np.asarray(s, np.float64), kind="stable")
    ranks = np.empty(len(s), np.int64)
    ranks[order] = np.arange(len(s))
    return ranks


def ref_rank_fusion(av, sv, w=0.5):
    n = len(av)
    return w * (n - ref_desc_ranks(av)) + (1 - w) * (n - ref_desc_ranks(sv))


def ref_carve(score, x, n):
    """methods.md TokenCarve steps 4-5 on one sample. Returns (kept idx ascending, their features)."""
    R, M = int(1.5 * n), int(n / 2)
    top = np.argsort(-np.asarray(score, np.float64), kind="stable")[:R]
    half = int(R / 2)
    A, B = top[:half], top[half:]
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    cos = unit[B] @ unit[A].T
    mx, t = cos.max(1), cos.argmax(1)
    merged_b = np.argsort(-mx, kind="stable")[:min(len(A), M)]
    feats = {int(i): x[i].astype(np.float64) for i in top}
    new = {}
    for a_pos, a in enumerate(A):
        joined = [B[j] for j in merged_b if t[j] == a_pos]
        new[int(a)] = (x[a].astype(np.float64) + sum(x[b].astype(np.float64) for b in joined)) / (1 + len(joined))
    feats.update(new)  # all sources were read from x, before any write
    kept = np.sort(np.concatenate([A, np.delete(B, merged_b)]))
    return kept, np.stack([feats[int(i)] for i in kept])


class TokenCarveTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sv_scores_equal_an_svd(self):
        rng = np.random.default_rng(20)
        x = rng.normal(size=(2, 96, 160)).astype(np.float32) * rng.uniform(0.2, 3, (2, 96, 1)).astype(np.float32)
        x[..., 7] += 40.0  # a dominant shared direction, as hidden states have
        valid = np.ones((2, 96), bool)
        valid[1, 80:] = False
        got = np.asarray(self.variant(tokencarve.sv_scores)(x, valid))
        for b in range(2):
            ok = valid[b]
            ref = ref_sv(x[b][ok])
            np.testing.assert_allclose(got[b][ok], ref, rtol=2e-4)
            assert (got[b][~ok] == 0).all()
            k = 24  # the top of the ranking is what TokenCarve uses
            assert set(np.argsort(-got[b][ok])[:k]) == set(np.argsort(-ref)[:k])

    @chex.variants(with_jit=True, without_jit=True)
    def test_rank_fusion(self):
        rng = np.random.default_rng(21)
        av, sv = rng.random((2, 50)), rng.random((2, 50))
        av[0, 10:20] = 0.0  # ties (debiased padding scores): lower index first
        valid = np.ones((2, 50), bool)
        valid[1, 40:] = False
        got = np.asarray(self.variant(tokencarve.rank_fusion)(av, sv, valid))
        np.testing.assert_array_equal(got[0], ref_rank_fusion(av[0], sv[0]))
        np.testing.assert_array_equal(got[1][:40], ref_rank_fusion(av[1][:40], sv[1][:40]))
        assert (got[1][40:] == 0).all()
        only_av = np.asarray(self.variant(lambda a, s, v: tokencarve.rank_fusion(a, s, v, 1.0))(av, sv, valid))
        np.testing.assert_array_equal(only_av[0], 50 - ref_desc_ranks(av[0]))  # the release's mode 2

    @chex.variants(with_jit=True, without_jit=True)
    def test_select_and_merge(self):
        rng = np.random.default_rng(22)
        for N, n, D in [(20, 7, 8)]:  # odd n; n = 64 of 576: the pipeline test
            score = rng.permutation(N).astype(np.float32)[None]  # tie-free
            x = rng.normal(size=(1, N, D)).astype(np.float32)
            valid = np.ones((1, N), bool)
            idx, slot, feats = self.variant(lambda s, a, v, n=n: tokencarve.tokencarve_select(s, a, v, n))(score, x, valid)
            kept, ref_feats = ref_carve(score[0], x[0], n)
            assert idx.shape == (1, n) and feats.shape == (1, n, D) and len(kept) == n
            assert np.asarray(slot).all()
            np.testing.assert_array_equal(np.asarray(idx[0]), kept)
            np.testing.assert_allclose(np.asarray(feats[0]), ref_feats, rtol=1e-5, atol=1e-6)

    def test_release_pipeline_at_64(self):
        """AV (debiased: zeros on padding) + SV of X -> rank fusion -> top 96 -> 48/48 -> 32 merged: 64 kept."""
        rng = np.random.default_rng(23)
        N, D, n = 576, 64, 64
        av = rng.random((1, N)).astype(np.float32)
        av[0, :48] = 0.0  # two padded rows: their AV ties at 0, SV still ranks them
        x = rng.normal(size=(1, N, D)).astype(np.float32) * rng.uniform(0.5, 2, (1, N, 1)).astype(np.float32)
        valid = np.ones((1, N), bool)

        @jax.jit
        def run(av, x, valid):
            score = tokencarve.rank_fusion(av, tokencarve.sv_scores(x, valid), valid)
            return score, tokencarve.tokencarve_select(score, x, valid, n)

        score, (idx, slot, feats) = run(av, x, valid)
        ref_score = ref_rank_fusion(av[0], ref_sv(x[0]))
        np.testing.assert_array_equal(np.asarray(score[0]), ref_score)
        kept, ref_feats = ref_carve(ref_score, x[0], n)
        np.testing.assert_array_equal(np.asarray(idx[0]), kept)
        np.testing.assert_allclose(np.asarray(feats[0]), ref_feats, rtol=1e-5, atol=1e-6)
        assert np.asarray(slot).all()

    def test_fewer_valid_tokens_than_candidates(self):
        rng = np.random.default_rng(24)
        score = rng.permutation(30).astype(np.float32)[None]
        x = rng.normal(size=(1, 30, 8)).astype(np.float32)
        valid = np.zeros((1, 30), bool)
        valid[0, :10] = True  # 10 valid < R = 15 for n = 10
        idx, slot, _ = jax.jit(lambda s, a, v: tokencarve.tokencarve_select(s, a, v, 10))(score, x, valid)
        idx, slot = np.asarray(idx[0]), np.asarray(slot[0])
        # A = 7 best, B = the other 3 valid ones, all 3 merged (min(7, 5) limited by |B|): 7 kept
        assert slot.sum() == 7 and valid[0, idx[slot]].all() and (np.diff(idx[slot]) > 0).all()
        with pytest.raises(ValueError, match="only N=30 tokens"):
            tokencarve.tokencarve_select(score, x, valid, 21)


# ----------------------------------------------------------------------------------------------- padding masks


def ref_generate_pad_mask_1d(w, h, tau):
    """The released generate_pad_mask in exact rationals, along the short axis (the long one is all content):
    canvas 336, patch 14, content [pad, 336 - pad], pad = (S - s) / (2S) * 336; padding iff 1 - overlap/196 > tau
    (overlap = the intersection area with the patch, 14 x the short-axis overlap)."""
    S, s = max(w, h), min(w, h)
    pad = Fraction(S - s, 2 * S) * 336
    tau = Fraction(tau).limit_denominator(10_000)
    out = []
    for k in range(24):
        ov = max(Fraction(0), min(Fraction(14 * (k + 1)), 336 - pad) - max(Fraction(14 * k), pad))
        out.append(not (1 - ov * 14 / 196 > tau))
    return np.array(out)


def to_grid(w, h, line):
    rows = line if w >= h else np.ones(24, bool)
    cols = line if w < h else np.ones(24, bool)
    return (rows[:, None] & cols[None, :]).reshape(-1)


def release_float_pad_mask(ws, hs, tau):
    """The released generate_pad_mask transcribed in float64 (vectorised over sizes), full 2D. Returns
    (content bool[n, 576], tie bool[n, 576]: the exact padded fraction equals tau)."""
    ws, hs = np.asarray(ws, np.float64)[:, None], np.asarray(hs, np.float64)[:, None]
    S = np.maximum(ws, hs)
    pad = np.abs(hs - ws) / (2 * S) * 336
    left = np.where(ws < hs, pad, 0.0)
    top = np.where(hs < ws, pad, 0.0)
    j = np.arange(24)
    x0, x1 = np.tile(j, 24) * 14, (np.tile(j, 24) + 1) * 14
    y0, y1 = np.repeat(j, 24) * 14, (np.repeat(j, 24) + 1) * 14
    iw = np.maximum(0, np.minimum(x1, 336 - left) - np.maximum(x0, left))
    ih = np.maximum(0, np.minimum(y1, 336 - top) - np.maximum(y0, top))
    content = ~((1 - iw * ih / 196) > tau)
    # exact ties, in integers: units of 1/S px on the canvas
    wi, hi = np.asarray(ws, np.int64), np.asarray(hs, np.int64)
    Si = np.maximum(wi, hi)
    P = 168 * np.abs(hi - wi)
    li, ti = np.where(wi < hi, P, 0), np.where(hi < wi, P, 0)
    iwi = np.maximum(0, np.minimum(x1 * Si, 336 * Si - li) - np.maximum(x0 * Si, li))
    ihi = np.maximum(0, np.minimum(y1 * Si, 336 * Si - ti) - np.maximum(y0 * Si, ti))
    fr = Fraction(tau).limit_denominator(10_000)
    tie = (196 * Si * Si - iwi * ihi) * fr.denominator == fr.numerator * 196 * Si * Si
    return content, tie


SPECIAL = [(640, 427), (500, 375), (400, 333), (1200, 1199), (336, 336), (1, 1), (1, 977), (977, 1), (640, 480),
           (48, 46), (5, 3), (3, 7), (24, 10), (1024, 768), (333, 400)]


def random_sizes(n, seed, high=4000):
    rng = np.random.default_rng(seed)
    return SPECIAL + [tuple(int(v) for v in p) for p in rng.integers(1, high + 1, (n, 2))]


@pytest.mark.parametrize("tau", [0.5, 0.01])
def test_continuous_geometry_over_thousands_of_sizes(tau):
    sizes = random_sizes(2000, 30 if tau == 0.5 else 31)
    ws, hs = np.array([p[0] for p in sizes]), np.array([p[1] for p in sizes])
    got = np.asarray(jax.jit(lambda w, h: jd.pad_mask_expand2square(w, h, tau=tau))(ws, hs))
    for (w, h), g in zip(sizes, got):
        np.testing.assert_array_equal(g, to_grid(w, h, ref_generate_pad_mask_1d(w, h, tau)), err_msg=f"{w}x{h}")
    # the released float64 code agrees everywhere except at exact ties, which its rounding breaks either way
    rel, tie = release_float_pad_mask(ws, hs, tau)
    assert not ((rel != got) & ~tie).any()
    if tau == 0.01:
        assert tie[SPECIAL.index((400, 333))].any()  # e.g. 400 x 333: padded fraction exactly 1/100 -> content
    pil = np.asarray(jd.pad_mask_expand2square(ws, hs, tau=tau, geometry="pil"))
    assert (pil != got).any(axis=1).sum() > 0  # the floored-offset geometry is a different rule


def pil_sparsevlm_mask(w, h, grid=24):
    """The release's expand2square mask + Image.BILINEAR resize to grid x grid, >= 0.5, run by PIL itself."""
    if w == h:
        mask = Image.new("L", (w, h), 1)
    elif w > h:
        mask = Image.new("L", (w, w), 0)
        mask.paste(Image.new("L", (w, h), 1), (0, (w - h) // 2))
    else:
        mask = Image.new("L", (h, h), 0)
        mask.paste(Image.new("L", (w, h), 1), ((h - w) // 2, 0))
    return np.asarray(mask.resize((grid, grid), Image.Resampling.BILINEAR), np.float32).reshape(-1) >= 0.5


def pil_column_mask(S, s, grid=24):
    """The same resize on one S x 1 column (the mask is constant along the long axis; PIL skips the 1 -> 1 pass)."""
    col = np.zeros((S, 1), np.uint8)
    col[(S - s) // 2:(S - s) // 2 + s] = 1
    return np.asarray(Image.fromarray(col, "L").resize((1, grid), Image.Resampling.BILINEAR))[:, 0] >= 0.5


class ResizedMaskTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_pil_on_the_full_image(self):
        sizes = random_sizes(60, 32, high=1500)
        ws, hs = np.array([p[0] for p in sizes]), np.array([p[1] for p in sizes])
        got = np.asarray(self.variant(pad_mask_resized)(ws, hs))
        for (w, h), g in zip(sizes, got):
            np.testing.assert_array_equal(g, pil_sparsevlm_mask(w, h), err_msg=f"{w}x{h}")

    def test_equals_pil_over_thousands_of_sizes(self):
        small = [(S, s) for S in range(1, 41) for s in range(1, S + 1)]  # every size up to 40 px
        sizes = small + random_sizes(2000, 33)
        ws, hs = np.array([p[0] for p in sizes]), np.array([p[1] for p in sizes])
        got = np.asarray(jax.jit(lambda w, h: jd.pad_mask_expand2square(w, h, geometry="bilinear"))(ws, hs))
        got = got.reshape(-1, 24, 24)
        for (w, h), g in zip(sizes, got):
            line = g[:, 0] if w >= h else g[0, :]
            np.testing.assert_array_equal(line, pil_column_mask(max(w, h), min(w, h)), err_msg=f"{w}x{h}")
            assert (g == (line[:, None] if w >= h else line[None, :])).all()
        # it is a third rule: it differs from the continuous geometry at tau 0.5 on some sizes
        cont = np.asarray(jd.pad_mask_expand2square(ws, hs, tau=0.5)).reshape(-1, 24, 24)
        assert (cont != got).any(axis=(1, 2)).sum() > 0

    def test_too_large_for_int32(self):
        with pytest.raises(ValueError, match="at most 80000 px"):
            pad_mask_resized(100_000, 10)
