"""iLLaVA's encoder stage inside our CLIP tower (``ClipVisionTower.with_merges``, hulianyuyy/iLLaVA@4068149
siglip_encoder.py L390-420) against transformers' CLIPVisionModel run layer by layer (eager attention, its
probabilities captured) with the NumPy rule of ``tests/jaxdebias/test_illava_rules.py`` applied between the
attention residual and the MLP, CLS protected (ours); no merge = ``__call__`` exactly; the tower's FLOPs fall.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdebias as jd
from jaxdebias.methods import illava
from jaxdebias.models.clip import ClipVisionConfig, ClipVisionTower

torch = pytest.importorskip("torch")

from tests.jaxdebias.test_illava_rules import ref_encoder_merge  # noqa: E402


@pytest.fixture(scope="module")
def towers():
    """(transformers' CLIPVisionModel, our tower with its weights, pixels float32[2, 3, 84, 84]): 6 x 6 patches +
    CLS = 37 tokens, 5 layers of which 4 run (feature layer -2)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                              image_size=84, patch_size=14, initializer_range=0.1, initializer_factor=1.0)
    hf = CLIPVisionModel._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    tower = ClipVisionTower(ClipVisionConfig.from_hf_config(hf_cfg), rngs=nnx.Rngs(0))

    def put(param, value):
        assert param[...].shape == value.shape
        param[...] = jnp.asarray(value)

    put(tower.patch_embedding, sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))  # -> [p, p, C, D]
    put(tower.class_embedding, sd["embeddings.class_embedding"])
    put(tower.position_embedding, sd["embeddings.position_embedding.weight"])
    put(tower.pre_layrnorm.scale, sd["pre_layrnorm.weight"])
    put(tower.pre_layrnorm.bias, sd["pre_layrnorm.bias"])
    for i, layer in enumerate(tower.layers):
        for name, mod in (("layer_norm1", layer.layer_norm1), ("layer_norm2", layer.layer_norm2)):
            put(mod.scale, sd[f"encoder.layers.{i}.{name}.weight"])
            put(mod.bias, sd[f"encoder.layers.{i}.{name}.bias"])
        for name, mod in [(f"self_attn.{n}", getattr(layer.self_attn, n)) for n in ("q_proj", "k_proj", "v_proj",
                                                                               "out_proj")] + \
                         [(f"mlp.{n}", getattr(layer.mlp, n)) for n in ("fc1", "fc2")]:
            put(mod.kernel, sd[f"encoder.layers.{i}.{name}.weight"].T)
            put(mod.bias, sd[f"encoder.layers.{i}.{name}.bias"])
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 3, 84, 84)).astype(np.float32)
    pixels[1] = np.abs(pixels[1]) * 2
    return hf, tower, pixels


def reference(hf, pixels, layers, r, runs=4):
    """transformers' layers one by one, the NumPy rule (CLS protected) between attention residual and MLP.
    Returns (patch features float[B, 36 - len(layers) r, D], their raster patch indices)."""
    with torch.no_grad():
        x = hf.pre_layrnorm(hf.embeddings(torch.from_numpy(pixels)))
        source = np.tile(np.arange(x.shape[1]), (x.shape[0], 1))
        for i, layer in enumerate(hf.encoder.layers[:runs]):
            h, attn = layer.self_attn(layer.layer_norm1(x))  # eager: attn = softmax probabilities [B, H, P, P]
            x = x + h
            if i in layers:
                out = [ref_encoder_merge(x[b].numpy(), attn[b].numpy(), r, protected=1) for b in range(len(x))]
                x = torch.from_numpy(np.stack([o[0] for o in out]).astype(np.float32))
                source = np.stack([s[o[1]] for s, o in zip(source, out)])
            x = x + layer.mlp(layer.layer_norm2(x))
    return x.numpy()[:, 1:], source[:, 1:] - 1


def merge_rule(r):
    """The iLLaVA encoder stage's rule as the method module hands it to the tower (CLS protected)."""
    return functools.partial(illava.illava_encoder_merge, r=r, protected=1)


@jax.jit(static_argnums=(0, 3, 4))
def _run(graphdef, state, pixels, layers, r):
    return nnx.merge(graphdef, state).with_merges(pixels, layers, merge_rule(r))


def jitted(tower, pixels, layers, r):
    """How a jitted prefill calls the tower: ``layers`` and ``r`` static (one compile per setting, shared here)."""
    return _run(*nnx.split(tower), pixels, layers, r)


def test_reference_without_merges_is_transformers(towers):
    hf, tower, pixels = towers
    feats, source = reference(hf, pixels, (), 0)
    with torch.no_grad():
        want = hf(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tower(pixels)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(source, np.tile(np.arange(36), (2, 1)))


@pytest.mark.parametrize("layers, r", [((0, 3), 5), ((1, 2), 8)])
def test_merges_equal_transformers_with_the_numpy_rule(towers, layers, r):
    hf, tower, pixels = towers
    want_feats, want_source = reference(hf, pixels, layers, r)
    feats, source = jitted(tower, pixels, layers, r)
    assert feats.shape == (2, 36 - len(layers) * r, 32) and source.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(source), want_source)
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(want_source[0], want_source[1])  # per-image selections
    assert np.all(np.diff(want_source, axis=1) > 0)  # original order kept


def test_no_merge_is_call_exactly(towers):
    _, tower, pixels = towers
    plain = np.asarray(tower(pixels))
    feats, source = tower.with_merges(pixels, (), merge_rule(5))
    np.testing.assert_array_equal(np.asarray(feats), plain)
    np.testing.assert_array_equal(np.asarray(source), np.tile(np.arange(36), (2, 1)))
    # r = 0 merges nothing: the method then has no encoder stage at all (the tower runs as __call__)
    assert jd.PruneSpec("illava", options={"vit_layers": (1, 2), "vit_r": 0}).encoder(36) is None
    assert jd.PruneSpec("illava", options={"vit_layers": (), "vit_r": 5}).encoder(36) is None


def test_full_select_keeps_cls_first_and_checks(towers):
    _, tower, pixels = towers
    full = ClipVisionTower(dataclasses.replace(tower.cfg, select_strategy="full"), rngs=nnx.Rngs(1))
    nnx.update(full, nnx.state(tower))
    f_default, s_default = jitted(tower, pixels, (1, 2), 8)
    f_full, s_full = jitted(full, pixels, (1, 2), 8)
    assert f_full.shape == (2, 21, 32) and np.all(np.asarray(s_full[:, 0]) == 0)
    np.testing.assert_array_equal(np.asarray(s_full[:, 1:]) - 1, np.asarray(s_default))
    np.testing.assert_allclose(np.asarray(f_full[:, 1:]), np.asarray(f_default), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layers"):
        tower.with_merges(pixels, (4,), merge_rule(2))  # layer 4 does not run (feature layer -2)
    with pytest.raises(ValueError, match="r="):
        tower.with_merges(pixels, (0, 1), merge_rule(18))  # 36 - 2 * 18 patches would be left


def test_flops_fall(towers):
    _, tower, pixels = towers
    graphdef, state = nnx.split(tower)

    def flops(layers, r):
        cost = _run.lower(graphdef, state, pixels, layers, r).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    full, merged = flops((), 0), flops((1, 2), 8)  # 37 tokens in layers 0-1, 29 in 2, 21 in 3
    assert 0 < merged < 0.9 * full, (merged, full)  # 0.86 here
