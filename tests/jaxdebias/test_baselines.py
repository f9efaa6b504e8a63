"""The two baselines, random and pool: their rules against NumPy / torch re-derivations, and their contracts (a
seeded per-sample draw; no debiasing)."""

import numpy as np
import pytest

import jaxdebias as jd
from jaxdebias.methods import EncoderInputs
from jaxdebias.methods.pool import pool_matrix, pooled_grid
from jaxdebias.methods.random import Draw, uniform


def test_pooled_grid_is_the_largest_near_square_within_keep():
    assert [pooled_grid(k) for k in (64, 128, 144, 192, 576, 1, 2, 7)] == [
        (8, 8), (11, 11), (12, 12), (13, 14), (24, 24), (1, 1), (1, 2), (2, 3)]
    for keep in range(1, 600):
        r, c = pooled_grid(keep)
        assert r * c <= keep < (r + 1) * (r + 1) and c in (r, r + 1)
        assert not (c == r and r * (r + 1) <= keep)


@pytest.mark.parametrize("grid, rows, cols", [(24, 8, 8), (24, 11, 11), (24, 13, 14), (3, 2, 2), (5, 2, 3)])
def test_pool_matrix_is_adaptive_average_pooling(grid, rows, cols):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(grid, grid, 4)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x).permute(2, 0, 1)[None], (rows, cols))
    want = want[0].permute(1, 2, 0).reshape(rows * cols, 4).numpy()
    got = pool_matrix(grid, rows, cols) @ x.reshape(grid * grid, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def draw(keys, keep=5, seed=0, n=24):
    stage = Draw(keep, seed, keep)
    feats = np.arange(n, dtype=np.float32)[None, :, None].repeat(len(keys), 0)
    inputs = EncoderInputs(lambda px: feats, None, n, 0, None, np.ones((len(keys), n), bool), keep,
                           np.asarray(keys, np.uint32))
    block = stage.encode(inputs)
    return np.asarray(block.span), np.asarray(block.valid)


def test_random_draw_is_seeded_per_sample_and_uniform():
    span, valid = draw([7, 8, 7])
    assert valid.all() and (np.diff(span, axis=1) > 0).all()  # distinct, ascending
    np.testing.assert_array_equal(span[0], span[2])  # the same sample key: the same set, wherever it sits
    assert not np.array_equal(span[0], span[1])
    assert not np.array_equal(draw([7], seed=1)[0], span[:1])  # the seed option changes the draw
    counts = np.bincount(draw(np.arange(2000), keep=6, n=12)[0].ravel(), minlength=12)
    expected = 2000 * 6 / 12
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40, counts  # 11 degrees of freedom: p ~ 1e-5 at 40
    u = np.asarray(uniform(np.asarray([1, 2], np.uint32), 0, 10))
    assert u.shape == (2, 10) and ((0 <= u) & (u < 1)).all()


def test_baselines_refuse_debiasing_and_oversized_budgets():
    for method in ("random", "pool"):
        with pytest.raises(ValueError, match="debiasing does not apply"):
            jd.PruneSpec(method, keep=64, debias=jd.Debias(pad_tau=0.5))
        with pytest.raises(ValueError, match="exceeds|Keep at most"):
            jd.PruneSpec(method, keep=700).plan(576, 32)
    plan, limits = jd.PruneSpec("random", keep=100).plan(576, 32)
    assert plan.encoder.size == 128 and limits == (100,) and plan.positions == "reindex"  # bucketed, budget 100
    plan, limits = jd.PruneSpec("pool", keep=128).plan(576, 32)
    assert (plan.encoder.rows, plan.encoder.cols, plan.encoder.size) == (11, 11, 121) and not plan.stages
    with pytest.raises(ValueError, match="no option 'contextual'"):
        jd.PruneSpec("random", options={"contextual": 3})
