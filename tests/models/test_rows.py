"""The row-blocked prompt attention against a NumPy softmax attention and against one full-width call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdebias.models.rows import causal_attention, slot_mask


def numpy_attention(q, k, v, mask):
    """q [B, T, H, E], k/v [B, S, G, E], mask bool[B, T, S] -> [B, T, H, E] (float64 softmax attention)."""
    B, T, H, E = q.shape
    R = H // k.shape[2]
    k, v = np.repeat(k, R, axis=2).astype(np.float64), np.repeat(v, R, axis=2).astype(np.float64)
    logits = np.einsum("bthe,bshe->bhts", q.astype(np.float64), k) / np.sqrt(E)
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshe->bthe", p, v)


@pytest.mark.parametrize("T,S,blocks,min_block", [(5, 9, 4, 128), (200, 200, 4, 16), (130, 150, 3, 40),
                                                  (97, 120, 4, 1)])
def test_causal_attention_equals_full(T, S, blocks, min_block):
    rng = np.random.default_rng(T)
    B, H, G, E = 2, 4, 2, 8
    q = rng.normal(size=(B, T, H, E)).astype(np.float32) * 2
    k, v = (rng.normal(size=(B, S, G, E)).astype(np.float32) for _ in range(2))
    valid = np.ones((B, S), bool)
    valid[1, :7] = False  # left padding in the second sample
    valid[0, T:] = False  # empty cache slots after the prompt
    mask = np.asarray(slot_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.asarray(valid)))
    ours = jax.jit(causal_attention, static_argnums=(4, 5))(q, k, v, mask, blocks, min_block)
    np.testing.assert_allclose(ours, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    full = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(ours, full, rtol=1e-6, atol=1e-6)


def test_causal_attention_skips_the_upper_keys():
    """XLA's FLOP count: 4 row blocks over 640 prompt slots of a 704-slot cache compute 400/704 of the key columns."""
    B, T, S, H, E = 1, 640, 704, 4, 16
    q = jnp.zeros((B, T, H, E))
    k = v = jnp.zeros((B, S, H, E))
    mask = jnp.ones((B, T, S), bool)

    def flops(fn):
        return jax.jit(fn).lower(q, k, v, mask).compile().cost_analysis()["flops"]

    full = flops(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m[:, None]))
    blocked = flops(causal_attention)
    assert 0.5 < blocked / full < 400 / 704 + 0.02, (blocked, full)
