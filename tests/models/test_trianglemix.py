"""TriangleMix: the mask against NumPy, both attention paths against the masked reference, exactness when the
pattern covers everything; text-only Llama / Qwen2 parity with transformers through the converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdebias.models import interventions
from jaxdebias.models.llama import LlamaForCausalLM
from jaxdebias.models.rows import slot_mask

torch = pytest.importorskip("torch")


def np_allowed(N, T, n_init, n_local, n_last):
    last = min(n_last, N - 1)
    m = np.zeros((T, T), bool)
    for i in range(N):
        for j in range(i + 1):
            m[i, j] = i >= N - last or j < n_init or i - j < n_local
    return m


@pytest.mark.parametrize("N,n_init,n_local,n_last", [(40, 4, 8, 6), (40, 0, 1, 0), (12, 4, 32, 5), (1, 8, 4, 4),
                                                      (33, 8, 5, 100)])
def test_mask_equals_numpy(N, n_init, n_local, n_last):
    T = 40
    spec = interventions.TriangleMix(n_init=n_init, n_local=n_local, n_last=n_last, starting_layer=0)
    pos = jnp.arange(T)[None]
    got = np.asarray(interventions.triangle_allowed(pos, pos, jnp.array([N]), spec))[0]
    np.testing.assert_array_equal(got[:N, :N], np_allowed(N, T, n_init, n_local, n_last)[:N, :N])


def _qkv(B, T, N, K, Hd, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.normal(size=(B, T, h, Hd)), jnp.float32) for h in (N, K, K)]


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("n_init,n_local,n_last,block", [(4, 8, 6, 8), (0, 5, 0, 16), (8, 64, 10, 16), (3, 1, 2, 7)])
def test_split_path_equals_masked(padding, n_init, n_local, n_last, block):
    B, T, N, K, Hd = 2, 45, 4, 2, 8
    q, k, v = _qkv(B, T, N, K, Hd)
    lengths = np.array([45, 30])
    real = np.zeros((B, T), bool)
    for b, n in enumerate(lengths):
        real[b, :n] = True if padding == "right" else False
        if padding == "left":
            real[b, T - n:] = True
    real = jnp.asarray(real)
    pos = jnp.where(real, jnp.cumsum(real, 1) - 1, 0)
    mask = slot_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), real)
    spec = interventions.TriangleMix(n_init=n_init, n_local=n_local, n_last=n_last, starting_layer=0, block=block)
    n_real = jnp.sum(real, 1)
    ref = interventions.attend_masked(q, k, v, mask, pos, pos, real, n_real, spec)
    got = jax.jit(lambda q, k, v: interventions.attend_split(q, k, v, mask, pos, pos, real, n_real, spec))(q, k, v)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(real)], np.asarray(ref)[np.asarray(real)], atol=1e-5)


def hf_text(kind, tmp_path, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=61, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, initializer_range=0.1, tie_word_embeddings=tie)
    if kind == "llama":
        model = HFLlama(LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_text_models_match_transformers(kind, tie, tmp_path):
    from jaxdebias.convert import from_hf

    hf = hf_text(kind, tmp_path, tie)
    ours = from_hf(tmp_path)
    assert isinstance(ours, LlamaForCausalLM)
    ids = np.random.default_rng(1).integers(0, 97, (2, 40))
    am = np.ones_like(ids)
    am[1, :7] = 0  # left padding
    pos = np.where(am == 1, am.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am),
                 position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(ours(ids, am).logits)
    assert np.abs(got - ref)[am.astype(bool)].max() <= 1e-4
    # TriangleMix covering everything is dense attention; a sparse one changes only the deep layers' prefill
    full = interventions.TriangleMix(n_init=0, n_local=64, n_last=0, starting_layer=1)
    np.testing.assert_allclose(np.asarray(ours(ids, am, triangle=full).logits), got, atol=1e-5)
    sparse = interventions.TriangleMix(n_init=2, n_local=4, n_last=3, starting_layer=1, path="split")
    masked = interventions.TriangleMix(n_init=2, n_local=4, n_last=3, starting_layer=1, path="masked")
    a, b = (np.asarray(ours(ids, am, triangle=t).logits) for t in (sparse, masked))
    np.testing.assert_allclose(a[am.astype(bool)], b[am.astype(bool)], atol=1e-5)
    assert np.abs(a - got)[am.astype(bool)].max() > 1e-3


def test_trianglemix_bad_input():
    with pytest.raises(ValueError, match="n_local must be > 0"):
        interventions.TriangleMix(n_local=0)
    with pytest.raises(ValueError, match="starting_layer 40 is past the model's 32 layers"):
        interventions.TriangleMix(starting_layer=40).check(32)
    with pytest.raises(ValueError, match="path must be"):
        interventions.TriangleMix(path="flash")


@pytest.mark.parametrize("T,n_init,n_local,n_last", [(256, 4, 40, 10), (40, 2, 8, 3), (384, 0, 128, 0)])
def test_splash_path_equals_masked(T, n_init, n_local, n_last):
    """The TPU splash-attention path, run by Pallas' interpreter on the CPU (right padding, as generate makes)."""
    B, N, K, Hd = 2, 4, 2, 16
    q, k, v = _qkv(B, T, N, K, Hd, seed=3)
    real = np.zeros((B, T), bool)
    real[0], real[1, :T - 13] = True, True
    real = jnp.asarray(real)
    pos = jnp.where(real, jnp.cumsum(real, 1) - 1, 0)
    mask = slot_mask(jnp.broadcast_to(jnp.arange(T), (B, T)), real)
    spec = interventions.TriangleMix(n_init=n_init, n_local=n_local, n_last=n_last, starting_layer=0, path="splash")
    ref = interventions.attend_masked(q, k, v, mask, pos, pos, real, jnp.sum(real, 1), spec)
    got = interventions.attend_splash(q, k, v, mask, pos, pos, real, jnp.sum(real, 1), spec)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(real)], np.asarray(ref)[np.asarray(real)], atol=1e-5)
