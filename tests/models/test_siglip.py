"""The SigLIP tower (``jaxdebias.models.siglip``) against transformers' SiglipVisionModel: weights copied through
``convert.tables.SIGLIP``; the features LLaVA-OneVision selects (``hidden_states[vision_feature_layer]``, asked for
as its ``get_image_features`` asks), ``last_hidden_state`` (post_layernorm) and an earlier feature layer equal
transformers' in fp32; the token-merging encoder stage (no CLS: nothing protected) against transformers' layers run
one by one with the NumPy merge rule; the published OneVision vision configs and the preset's parameter shapes
against transformers' on the meta device.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdebias.convert import tables
from jaxdebias.methods import illava
from jaxdebias.models.layers import abstract
from jaxdebias.models.siglip import SiglipVisionConfig, SiglipVisionTower

torch = pytest.importorskip("torch")

from tests.jaxdebias.test_illava_rules import ref_encoder_merge  # noqa: E402

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf and -7b-ov-hf config.json, "vision_config" (identical in both), with
# their top-level "vision_feature_layer": -1 and "vision_feature_select_strategy": "full"
ONEVISION_VISION = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                    "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 26,
                    "patch_size": 14, "vision_use_head": False}
PATCHES = 36  # the tiny tower: 90 // 14 = 6 x 6 (6 pixels left over, as OneVision's 384 // 14 = 27)


def params_by_path(module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def param_at(module, dotted: str):
    for part in dotted.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def converted(key: str, value):
    """A SiglipVisionModel tensor through ``tables.SIGLIP`` (the one rule its key matches): (our path under the
    tower, the value in our layout), or (None, None) for a tensor the port does not use."""
    canon = "vision." + key.removeprefix("vision_model.")
    rules = [(p, t, tr) for p, t, tr in tables.SIGLIP if re.fullmatch(p, canon)]
    assert len(rules) == 1, f"{key}: {len(rules)} rules"
    pat, template, transform = rules[0]
    if template is None:
        return None, None
    path = re.sub(pat, template, canon).removeprefix("vision_tower.")
    return path, value if transform is None else transform(value)


def load_into(tower, hf):
    """Copies transformers' weights into ``tower`` (layers past its feature layer skipped); every parameter of
    ours is set exactly once."""
    want, seen = params_by_path(tower), set()
    for key, value in hf.state_dict().items():
        path, value = converted(key, value.detach().numpy())
        if path is None or (path.startswith("layers.") and int(path.split(".")[1]) >= tower.cfg.layers_run):
            continue
        param = param_at(tower, path)
        assert param[...].shape == value.shape and path not in seen, path
        param[...] = jnp.asarray(value)
        seen.add(path)
    assert seen == set(want)


@pytest.fixture(scope="module")
def towers():
    """(transformers' SiglipVisionModel with eager attention, our tower with its weights, pixels float32[2, 3, 90,
    90]): 6 x 6 = 36 patches (as at 384 / 14, the last 6 pixel rows and columns are never read), 3 layers, all
    run (OneVision's feature layer -1)."""
    from transformers import SiglipVisionConfig as HfConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf_cfg = HfConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                      image_size=90, patch_size=14, vision_use_head=False, layer_norm_eps=1e-5)
    hf = SiglipVisionModel._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial weights, biases and norms: every parameter matters
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    tower = SiglipVisionTower(SiglipVisionConfig.from_hf_config(hf_cfg), rngs=nnx.Rngs(0))
    load_into(tower, hf)
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 3, 90, 90)).astype(np.float32)
    pixels[1] = np.abs(pixels[1]) * 2
    return hf, tower, pixels


def hf_features(hf, pixels, feature_layer):
    """``hidden_states[feature_layer]`` as LlavaOnevisionModel.get_image_features asks for it (its
    ``select_hidden_states`` passes the layer as ``output_hidden_states``), and ``last_hidden_state``."""
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels), output_hidden_states=feature_layer)
    return out.hidden_states[feature_layer].numpy(), out.last_hidden_state.numpy()


def test_features_equal_transformers(towers):
    hf, tower, pixels = towers
    assert tower.cfg.layers_run == 3 and tower.cfg.layer_norm_eps == 1e-5 and tower.cfg.num_features == PATCHES
    want, last = hf_features(hf, pixels, -1)
    feats = jax.jit(lambda t, x: t(x))(tower, pixels)
    assert feats.shape == (2, PATCHES, 32) and feats.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(feats), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tower.last_hidden_state(pixels)), last, rtol=1e-5, atol=1e-5)
    # OneVision's features are taken before post_layernorm: the two differ
    assert not np.allclose(want, last, atol=1e-2)
    with torch.no_grad():  # the embeddings: no CLS, conv bias and position embeddings (hidden_states[0])
        emb = hf.embeddings(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(np.asarray(tower.embedded(pixels)), emb, rtol=1e-5, atol=1e-5)
    unread = pixels.copy()  # the pixels past the 6 x 14 = 84 grid: transformers' convolution never reads them
    unread[:, :, 84:] = unread[:, :, :, 84:] = 7.0
    np.testing.assert_array_equal(np.asarray(tower.embedded(unread)), np.asarray(tower.embedded(pixels)))


def test_an_earlier_feature_layer_builds_fewer_layers(towers):
    hf, tower, pixels = towers
    short = SiglipVisionTower(dataclasses.replace(tower.cfg, feature_layer=-2), rngs=nnx.Rngs(1))
    assert len(short.layers) == 2
    load_into(short, hf)
    want, _ = hf_features(hf, pixels, -2)
    np.testing.assert_allclose(np.asarray(short(pixels)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs all 3 layers"):
        short.last_hidden_state(pixels)


def reference(hf, pixels, layers, r):
    """transformers' layers one by one, the NumPy rule (nothing protected) between attention residual and MLP.
    Returns (features float[B, 36 - len(layers) r, D], their raster patch indices)."""
    with torch.no_grad():
        x = hf.embeddings(torch.from_numpy(pixels))
        source = np.tile(np.arange(x.shape[1]), (x.shape[0], 1))
        for i, layer in enumerate(hf.encoder.layers):
            h, attn = layer.self_attn(layer.layer_norm1(x))  # eager: attn = softmax probabilities [B, H, P, P]
            x = x + h
            if i in layers:
                out = [ref_encoder_merge(x[b].numpy(), attn[b].numpy(), r, protected=0) for b in range(len(x))]
                x = torch.from_numpy(np.stack([o[0] for o in out]).astype(np.float32))
                source = np.stack([s[o[1]] for s, o in zip(source, out)])
            x = x + layer.mlp(layer.layer_norm2(x))
    return x.numpy(), source


@jax.jit(static_argnums=(0, 3, 4))
def _merged(graphdef, state, pixels, layers, r):
    merge = functools.partial(illava.illava_encoder_merge, r=r, protected=0)
    return nnx.merge(graphdef, state).with_merges(pixels, layers, merge)


def merged(tower, pixels, layers, r):
    """As a jitted prefill calls the tower: ``layers`` and ``r`` static."""
    return _merged(*nnx.split(tower), pixels, layers, r)


@pytest.mark.parametrize("layers, r", [((1,), 7), ((0, 2), 5)])
def test_merges_equal_transformers_with_the_numpy_rule(towers, layers, r):
    hf, tower, pixels = towers
    want_feats, want_source = reference(hf, pixels, layers, r)
    feats, source = merged(tower, pixels, layers, r)
    assert feats.shape == (2, PATCHES - len(layers) * r, 32) and source.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(source), want_source)
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(want_source[0], want_source[1])  # per-image selections
    assert np.all(np.diff(want_source, axis=1) > 0)  # original order kept


def test_no_merge_is_call(towers):
    hf, tower, pixels = towers
    plain = np.asarray(tower(pixels))
    feats, source = tower.with_merges(pixels, (), functools.partial(illava.illava_encoder_merge, r=5))
    np.testing.assert_array_equal(np.asarray(feats), plain)
    np.testing.assert_array_equal(np.asarray(source), np.tile(np.arange(PATCHES), (2, 1)))
    # r = 0 merges the least attended token into itself: every layer keeps all tokens, features unchanged
    feats, source = merged(tower, pixels, (0, 1, 2), 0)
    np.testing.assert_array_equal(np.asarray(source), np.tile(np.arange(PATCHES), (2, 1)))
    np.testing.assert_allclose(np.asarray(feats), plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"Merge layers \(1, 3\) must be distinct ints in \[0, 3\)"):
        tower.with_merges(pixels, (1, 3), illava.illava_encoder_merge)
    with pytest.raises(ValueError, match="no CLS token"):
        tower.with_cls_attention(pixels)
    with pytest.raises(ValueError, match=r"pixel_values must be float\[B, 3, 90, 90\].*got \(2, 3, 98, 98\)"):
        tower(np.zeros((2, 3, 98, 98), np.float32))


def test_onevision_configs():
    from transformers import LlavaOnevisionConfig, SiglipVisionConfig as HfConfig

    cfg = SiglipVisionConfig.from_hf_config(ONEVISION_VISION, feature_layer=-1, select_strategy="full")
    assert cfg == SiglipVisionConfig.so400m_384()
    assert (cfg.num_layers, cfg.layers_run, cfg.grid, cfg.num_features) == (26, 26, 27, 729)
    hf = HfConfig(**ONEVISION_VISION)  # transformers' reading of the same dict: the omitted keys' defaults
    assert (cfg.layer_norm_eps, cfg.num_channels) == (hf.layer_norm_eps, hf.num_channels) == (1e-6, 3)
    assert hf.hidden_act == "gelu_pytorch_tanh"
    top = LlavaOnevisionConfig()  # transformers' default is the 7b's
    assert SiglipVisionConfig.from_hf_config(top.vision_config, feature_layer=top.vision_feature_layer,
                                             select_strategy=top.vision_feature_select_strategy) == cfg
    # a config.json that leaves out every default reads as transformers reads it
    bare = SiglipVisionConfig.from_hf_config({"model_type": "siglip_vision_model"})
    d = HfConfig()
    assert (bare.hidden_size, bare.intermediate_size, bare.num_layers, bare.num_heads, bare.image_size,
            bare.patch_size) == (d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads,
                                 d.image_size, d.patch_size)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "clip_vision_model"}, "runs SigLIP"),
    ({"hidden_act": "gelu"}, "gelu_pytorch_tanh"),
    ({"image_size": 13}, "no patch fits"),
    ({"num_attention_heads": 7}, "not divisible"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        SiglipVisionConfig.from_hf_config({**ONEVISION_VISION, **change})


@pytest.mark.parametrize("kw, message", [
    ({"select_strategy": "default"}, "no CLS token"),
    ({"feature_layer": [-2, -1]}, "lists of layers"),
    ({"feature_layer": -28}, r"in \[-27, 26\]"),
])
def test_feature_selection_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        SiglipVisionConfig.from_hf_config(ONEVISION_VISION, **kw)


def test_preset_parameters_equal_transformers():
    """Every tensor of transformers' OneVision tower (meta device) lands, through ``tables.SIGLIP``, on a
    parameter of the preset of the same shape; the counts are equal (1152 x 26 layers, 729 positions)."""
    from transformers import SiglipVisionConfig as HfConfig, SiglipVisionModel

    with torch.device("meta"):
        hf = SiglipVisionModel(HfConfig(**ONEVISION_VISION))
    ours = abstract(SiglipVisionTower, SiglipVisionConfig.so400m_384())
    shapes = {path: tuple(v.get_value().shape) for path, v in params_by_path(ours).items()}
    seen = {}
    for key, p in hf.named_parameters():
        path, value = converted(key, np.broadcast_to(np.float32(0), tuple(p.shape)))  # a view, no memory
        if path is not None:
            seen[path] = value.shape
    assert seen == shapes
    count = sum(int(np.prod(s)) for s in shapes.values())
    D, F = 1152, 4304
    layer = 2 * 2 * D + 4 * (D * D + D) + (D * F + F) + (F * D + D)  # two norms, q/k/v/out, fc1/fc2
    by_hand = (14 * 14 * 3 * D + D) + 729 * D + 26 * layer + 2 * D  # patch conv, positions, layers, post_layernorm
    assert count == sum(p.numel() for p in hf.parameters()) == by_hand == 397_747_744
