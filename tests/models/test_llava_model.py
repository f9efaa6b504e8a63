"""Model properties that need no reference run: parameter count, compile counts, sharding, input errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdebias.models import llava
from jaxdebias.models import generate as gen
from jaxdebias.models.layers import abstract
from jaxdebias.models.llava import LlavaConfig

torch = pytest.importorskip("torch")

from .hf_tiny import make_hf_llava, prompts  # noqa: E402


def test_7b_parameter_count_reconciles_with_transformers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    hf_cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32),
        image_token_id=32000)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert hf_count == 7_063_427_072
    ours = llava.param_count(abstract(llava.Llava, LlavaConfig.llava_1_5_7b()))
    assert ours == llava.param_count(abstract(llava.Llava, LlavaConfig.from_hf_config(hf_cfg)))
    D, F = 1024, 4096
    last_vision_layer = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 2 * (2 * D)  # never run by LLaVA
    post_layernorm = 2 * D  # CLIP's post-layernorm, never used by LLaVA
    assert hf_count - ours == last_vision_layer + post_layernorm == 12_598_272


def _tiny(tmp_path):
    from jaxdebias.convert import from_hf

    make_hf_llava("gqa").save_pretrained(tmp_path)
    return from_hf(tmp_path)


def test_generation_compiles_once_per_bucket(tmp_path):
    model = _tiny(tmp_path)
    gen.prefill_step.clear_cache()  # other tests in this process may have compiled the same shapes
    gen.decode_step.clear_cache()
    p0, d0 = gen.prefill_step._cache_size(), gen.decode_step._cache_size()
    rng = np.random.default_rng(0)
    ids, am, px = prompts()
    def longer(extra):
        pre = np.concatenate([ids[:, :1], rng.integers(3, 140, (2, extra)), ids[:, 1:]], 1)
        return pre, np.concatenate([am[:, :1], np.ones((2, extra), am.dtype), am[:, 1:]], 1)

    for extra in range(0, 30, 5):  # prompt lengths 19..44 all fall in the 64-token bucket
        pre, pre_am = longer(extra)
        out = gen.generate(model, gen.Batch(pre, px, pre_am), max_new_tokens=5, stop_at_eos=False).tokens
        assert out.shape == (2, 5)
    assert gen.prefill_step._cache_size() - p0 == 1
    assert gen.decode_step._cache_size() - d0 == 1
    pre, pre_am = longer(60)  # 79 tokens: the 128 bucket, a second prefill and a second cache size
    gen.generate(model, gen.Batch(pre, px, pre_am), max_new_tokens=5)
    assert gen.prefill_step._cache_size() - p0 == 2
    from jaxdebias.models.layers import Taps  # the layer-input shortcut (bias report) = the full forward's tap

    out = model(ids, px, am, taps=Taps(hidden_layers=(1, 2), out_layers=(1,)))
    np.testing.assert_allclose(np.asarray(llava.layer_input(model, ids, px, am, 2)), np.asarray(out.hidden_states[2]),
                               atol=1e-5)
    lay = model.language_model.layers[1]  # the attention-output tap: layer 1's input + it, then the MLP = its output
    x = out.hidden_states[1] + out.attn_outputs[1]
    np.testing.assert_allclose(np.asarray(x + lay.mlp(lay.post_attention_layernorm(x))),
                               np.asarray(out.hidden_states[2]), atol=1e-5)


def test_sharded_logits_equal_single_device(tmp_path):
    assert len(jax.devices()) >= 4
    model = _tiny(tmp_path)
    ids, am, px = prompts()
    ref = np.asarray(model(ids, px, am).logits)
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    llava.shard_model(model, mesh)
    kernel = model.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 4  # really spread over the mesh
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    out = model(jax.device_put(jnp.asarray(ids), data), jax.device_put(jnp.asarray(px), data),
                jax.device_put(jnp.asarray(am), data))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=2e-5)


def test_bad_inputs_are_named(tmp_path):
    model = _tiny(tmp_path)
    ids, am, px = prompts()
    with pytest.raises(ValueError, match="hold 18 image tokens .* 1 image\\(s\\) give 9 features"):
        model(ids, px[:1], am)
    with pytest.raises(ValueError, match="pixel_values must be float\\[B, 3, 42, 42\\]"):
        model.image_features(px[:, :, :28, :28])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, px, am[:, 1:])
    with pytest.raises(ValueError, match="Not a LLaVA config"):
        LlavaConfig.from_hf_config({"model_type": "llava_next"})
    with pytest.raises(ValueError, match="projector_hidden_act 'relu'"):
        LlavaConfig.from_hf_config({"model_type": "llava", "projector_hidden_act": "relu"})


def test_stop_at_eos_pipelined_loop(tmp_path):
    """decode_loop keeps one step in flight: with stop_at_eos every token after a sample's first EOS is EOS, and
    the tokens before it are those of the run that ignores EOS."""
    model = _tiny(tmp_path)
    ids, am, px = prompts()
    free = gen.generate(model, gen.Batch(ids, px, am), max_new_tokens=8, stop_at_eos=False).tokens
    eos = int(free[0, 2])
    model.cfg = dataclasses.replace(model.cfg, eos_token_id=eos)
    stopped = gen.generate(model, gen.Batch(ids, px, am), max_new_tokens=8).tokens
    after = np.maximum.accumulate(free == eos, axis=1)
    np.testing.assert_array_equal(stopped, np.where(after, eos, free))
    assert (stopped[0, 2:] == eos).all()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_decode_attention_over_cache_layout(heads, kv_heads):
    """The decode step's attention over the [B * G, S, E] cache equals jax.nn.dot_product_attention on the same
    keys, and XLA updates the donated cache in place: no full-cache copy or transpose in the compiled step."""
    from jaxdebias.models.clip import ClipVisionConfig
    from jaxdebias.models.llama import KVCache, LlamaConfig, cached_attention

    rng = np.random.default_rng(0)
    B, S, E = 2, 24, 8
    q = jnp.asarray(rng.normal(size=(B, 1, heads, E)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, kv_heads, E)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((B, 1, S)) < 0.6).at[:, :, -1].set(True)
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(B * kv_heads, S, E)  # noqa: E731
    np.testing.assert_allclose(cached_attention(q, flat(k), flat(v), mask),
                               jax.nn.dot_product_attention(q, k, v, mask=mask[:, None]), atol=1e-6)
    cfg = LlavaConfig(ClipVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                       image_size=28, patch_size=14),
                      LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=heads,
                                  num_kv_heads=kv_heads))
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cache = KVCache.empty(cfg.text, B, 128).with_prompt(0, 2, jnp.ones((B, 16), bool), jnp.full((B,), 16))
    text = gen.decode_step.lower(gen.StaticDef(graphdef), state, jnp.zeros((B,), jnp.int32), cache,
                                 jax.random.key(0), temperature=0.0).compile().as_text()
    whole = re.compile(rf"= f32\[{B * kv_heads},128,{E}\]\S* (copy|transpose)\(")
    assert not [line for line in text.splitlines() if whole.search(line)]
