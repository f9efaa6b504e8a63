"""LLaVA-1.5-13B through the converter and the loader: the whole 13B checkpoint's tensor names and shapes (from
transformers' model built on the meta device: no memory) planned onto our 13B model's abstract parameters, and
parity on a small config with 13B's decoder head layout (40 query heads = 40 KV heads, MHA) and a few layers."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.convert import convert, load  # noqa: E402
from jaxdebias.convert.load import abstract, model_for, target_shapes, unused_paths  # noqa: E402
from jaxdebias.convert.source import ConversionError, Source, detect_layout, plan  # noqa: E402
from jaxdebias.models.llava import Llava, LlavaConfig  # noqa: E402

# llava-hf/llava-1.5-13b-hf's config.json (the fields that set shapes)
HUB_13B = {
    "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                    "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
}


class ShapesOnly(Source):
    """A Source with tensor names and shapes and no data (planning reads nothing else)."""

    def __init__(self, shapes: dict):
        self.refs = {k: np.empty(0) for k in shapes}
        self._shapes = shapes

    def shape(self, key):
        return self._shapes[key]


def hub_13b_shapes() -> dict:
    """Key -> shape of llava-hf/llava-1.5-13b-hf as the Hub stores it (transformers 4 names), from transformers'
    LlavaForConditionalGeneration built on the meta device."""
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(HFLlavaConfig(**{k: v for k, v in HUB_13B.items() if k != "model_type"}))
    rename = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
              (r"^model\.vision_tower\.(?:vision_model\.)?", "vision_tower.vision_model."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector.")]
    out = {}
    for key, p in hf.state_dict().items():
        for pat, rep in rename:
            key = re.sub(pat, rep, key)
        out[key] = tuple(p.shape)
    return out


def test_the_whole_13b_checkpoint_plans_onto_the_13b_model():
    cfg, cls, prefix = model_for(HUB_13B, jnp.bfloat16)
    assert cfg == LlavaConfig.llava_1_5_13b()  # the preset is what the Hub config gives
    text = cfg.text
    assert (text.num_layers, text.hidden_size, text.num_heads, text.num_kv_heads, text.hd) == (40, 5120, 40, 40, 128)
    shapes = hub_13b_shapes()
    source = ShapesOnly(shapes)
    assert detect_layout(source.refs) == "hub"
    target = target_shapes(abstract(cls, cfg))
    steps = plan(source, "hub", target, text_prefix=prefix, unused=unused_paths(cfg))
    assert {s.path for s in steps} == set(target)  # every parameter exactly once (plan raises otherwise)
    assert target[("language_model", "layers", 39, "self_attn", "q_proj", "kernel")] == (5120, 5120)
    assert target[("language_model", "layers", 39, "mlp", "down_proj", "kernel")] == (13824, 5120)
    assert target[("multi_modal_projector", "linear_1", "kernel")] == (1024, 5120)
    n = sum(int(np.prod(v)) for v in target.values())
    assert 13.0e9 < n < 13.4e9, n  # ~13.35B with the tower's last layer left out
    # a 13B checkpoint whose config says 7B is caught before anything is read, with the shapes named
    cfg7, cls7, _ = model_for({**HUB_13B, "text_config": {**HUB_13B["text_config"], "hidden_size": 4096,
                                                          "intermediate_size": 11008, "num_hidden_layers": 32,
                                                          "num_attention_heads": 32, "num_key_value_heads": 32}},
                              jnp.bfloat16)
    with pytest.raises(ConversionError, match=r"\(5120, 5120\)|not known|have no tensor"):
        plan(source, "hub", target_shapes(abstract(cls7, cfg7)), unused=unused_paths(cfg7))


@pytest.fixture(scope="module")
def small_13b_heads(tmp_path_factory):
    """llava-1.5-13b's decoder head layout (40 heads, MHA) at head_dim 8, 3 layers, small vocab and tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlavaConfig

    torch.manual_seed(13)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                              image_size=42, patch_size=14, initializer_range=0.1)
    text = LlamaConfig(vocab_size=151, hidden_size=320, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=40, num_key_value_heads=40, initializer_range=0.05, pad_token_id=0,
                       rms_norm_eps=1e-5)
    hf = LlavaForConditionalGeneration(HFLlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_id=150)).eval()
    hf.config._attn_implementation = "eager"
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    path = tmp_path_factory.mktemp("llava13b_heads")
    hf.save_pretrained(path / "hf")
    convert(path / "hf", path / "ckpt", dtype="float32", progress=False)
    return hf, load(path / "ckpt")


def test_13b_head_layout_converts_loads_and_matches_transformers(small_13b_heads):
    from jaxdebias.models.generate import Batch, generate

    hf, ours = small_13b_heads
    assert isinstance(ours, Llava) and ours.cfg.text.num_heads == ours.cfg.text.num_kv_heads == 40
    rng = np.random.default_rng(0)
    ids = np.array([[1, 5, 9] + [150] * 9 + [17, 33, 8]])
    am = np.ones_like(ids)
    px = rng.normal(size=(1, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(am))
        toks = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                           attention_mask=torch.tensor(am), max_new_tokens=6, do_sample=False)
    np.testing.assert_allclose(np.asarray(ours(ids, px, am).logits), ref.logits.numpy(), atol=1e-4)
    got = generate(ours, Batch(ids, px, am), max_new_tokens=6, stop_at_eos=False).tokens
    np.testing.assert_array_equal(got, toks[:, ids.shape[1]:].numpy())
