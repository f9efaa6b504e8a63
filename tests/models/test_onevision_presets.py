"""LLaVA-OneVision's presets against transformers: the 0.5B and 7B checkpoints' tensor names and shapes (from
transformers' LlavaOnevisionForConditionalGeneration built on the meta device: no memory) planned by our converter
onto the presets' abstract parameters (``nnx.eval_shape``), every shape compared and the totals equal.

The configs are llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf's (the fields that set shapes). Our port builds no
SigLIP attention-pooling head (the configs set vision_use_head False, so transformers builds none either), keeps
SigLIP's post_layernorm as a parameter, and the tied 0.5B has no lm_head of its own."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdebias.convert import tables  # noqa: E402
from jaxdebias.convert.load import abstract, model_for, target_shapes, unused_paths  # noqa: E402
from jaxdebias.convert.source import _after, detect_layout, plan  # noqa: E402
from jaxdebias.models.llava import param_count  # noqa: E402
from jaxdebias.models.llava_onevision import LlavaOnevision, LlavaOnevisionConfig  # noqa: E402

from ..convert.test_llava_13b import ShapesOnly  # noqa: E402

SIGLIP_SO400M_OV = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                    "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                    "vision_use_head": False}
_COMMON = {"model_type": "llava_onevision", "image_token_index": 151646, "video_token_index": 151647,
           "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
           "vision_aspect_ratio": "anyres_max_9",
           "image_grid_pinpoints": [[h * 384, w * 384] for h in range(1, 7) for w in range(1, 7)],
           "vision_config": SIGLIP_SO400M_OV}
_QWEN2 = {"model_type": "qwen2", "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
          "bos_token_id": 151643, "eos_token_id": 151645}
HUB = {
    "0.5b": {**_COMMON, "tie_word_embeddings": True,
             "text_config": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                             "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                             "tie_word_embeddings": True}},
    "7b": {**_COMMON, "tie_word_embeddings": False,
           "text_config": {**_QWEN2, "vocab_size": 152128, "hidden_size": 3584, "intermediate_size": 18944,
                           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                           "tie_word_embeddings": False}},
}
PRESETS = {"0.5b": LlavaOnevisionConfig.onevision_qwen2_0_5b, "7b": LlavaOnevisionConfig.onevision_qwen2_7b}
# parameters of the whole model (SigLIP 26 layers with post_layernorm, projector, image_newline, Qwen2; a tied
# LM head counted once), as transformers counts them
TOTAL = {"0.5b": 893_618_208, "7b": 8_030_807_584}

# transformers 5's in-memory names -> the Hub checkpoints' (transformers 4 save format)
TO_HUB = [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
          (r"^model\.vision_tower\.(?:vision_model\.)?", "vision_tower.vision_model."),
          (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^model\.image_newline$", "image_newline")]


@pytest.fixture(scope="module", params=["0.5b", "7b"])
def both(request):
    """(name, transformers meta model, our config, our parameter shapes) for one preset."""
    from transformers import LlavaOnevisionConfig as HFConfig
    from transformers import LlavaOnevisionForConditionalGeneration

    name = request.param
    with torch.device("meta"):
        hf = LlavaOnevisionForConditionalGeneration(HFConfig(**{k: v for k, v in HUB[name].items()
                                                                if k != "model_type"}))
    cfg = PRESETS[name]()
    model = abstract(LlavaOnevision, cfg)
    return name, hf, cfg, target_shapes(model), param_count(model)


def test_hub_config_gives_the_preset(both):
    name, _, cfg, _, _ = both
    ours, cls, prefix = model_for(HUB[name], jnp.bfloat16)
    assert cls is LlavaOnevision and prefix == "language_model"
    assert ours == cfg


def test_total_parameters_match_transformers(both):
    name, hf, cfg, shapes, count = both
    theirs = sum(p.numel() for p in hf.parameters())  # tied tensors once
    assert count == sum(int(np.prod(s)) for s in shapes.values())
    assert count == theirs == TOTAL[name], (count, theirs)
    tied = hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert tied == cfg.text.tie_word_embeddings == (name == "0.5b")
    assert (("language_model", "lm_head", "kernel") in shapes) == (not tied)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_every_tensor_plans_onto_a_parameter_of_its_shape(both, layout):
    """Every tensor of the checkpoint (Hub names, or transformers 5's in-memory names) maps to exactly one of our
    parameters, with the same shape after the converter's transform; only a tied lm_head is left over."""
    name, hf, cfg, target, _ = both
    shapes = {}
    for key, p in hf.state_dict().items():
        if layout == "hub":
            for pat, rep in TO_HUB:
                key = re.sub(pat, rep, key)
        shapes[key] = tuple(p.shape)
    source = ShapesOnly(shapes)
    assert detect_layout(source.refs) == layout
    steps = plan(source, layout, target, text_prefix="language_model", unused=unused_paths(cfg),
                 rules=tables.SIGLIP_CANONICAL)
    assert {s.path for s in steps} == set(target)  # every parameter exactly once (plan raises otherwise)
    for s in steps:
        assert _after(s.transform, shapes[s.key]) == target[s.path], s.key
    left = set(shapes) - {s.key for s in steps}
    lm_head = "language_model.lm_head.weight" if layout == "hub" else "lm_head.weight"
    assert left == ({lm_head} if cfg.text.tie_word_embeddings else set())
    # spot checks against the published widths
    t, v = cfg.text, cfg.vision
    hd = t.hidden_size // t.num_heads
    assert hd == 64 if name == "0.5b" else hd == 128
    assert target[("language_model", "layers", t.num_layers - 1, "self_attn", "k_proj", "kernel")] == \
        (t.hidden_size, t.num_kv_heads * hd)
    assert target[("language_model", "layers", 0, "self_attn", "q_proj", "bias")] == (t.hidden_size,)
    assert target[("vision_tower", "layers", 25, "mlp", "fc1", "kernel")] == (1152, 4304)
    assert target[("vision_tower", "position_embedding")] == (729, 1152) and v.grid == 27
    assert target[("multi_modal_projector", "linear_1", "kernel")] == (1152, t.hidden_size)
    assert target[("image_newline",)] == (t.hidden_size,)
