"""Conversion as data: how each checkpoint layout names its tensors, and where each tensor goes in our model.

Two steps, each a table of regular expressions:
1. ``LAYOUTS[layout]``: (pattern, replacement) rules that rewrite a source key into a canonical key
   (``text.*`` decoder body, ``lm_head.*``, ``vision.*`` CLIP vision transformer,
   ``image_tower.*`` / ``video_tower.*`` Video-LLaVA's two CLIP towers, ``projector.*``); the first
   matching rule wins. A key no rule matches is unknown.
2. ``LLAVA``: (canonical pattern, our parameter path template, transform). A path template of ``None`` marks a
   tensor the port knows and deliberately does not use (CLIP's post-layernorm, position-id buffers ...).

Transforms receive an array (numpy or jax; the loader runs them jitted on the host CPU) and return it in our
layout: Linear weights [out, in] become kernels [in, out]; the CLIP patch convolution [D, C, p, p] becomes
[p, p, C, D]. ``DESCRIBE`` names each transform in error messages.
"""

from __future__ import annotations

import re


def transpose(x):
    return x.T


def conv_to_hwio(x):
    return x.transpose(2, 3, 1, 0)


# How error messages name each transform ("... expects (a, b) after transposing, which turns ...").
DESCRIBE = {transpose: "transposing (a Linear weight [out, in] becomes a kernel [in, out])",
            conv_to_hwio: "reordering the convolution weight [out, in, h, w] to [h, w, in, out]"}


LAYOUTS: dict[str, list[tuple[str, str]]] = {
    # llava-hf/* on the Hub (transformers 4.x save format)
    "hub": [
        (r"^language_model\.model\.", "text."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^vision_tower\.vision_model\.", "vision."),
        (r"^multi_modal_projector\.", "projector."),
        (r"^image_newline$", "image_newline"),  # LLaVA-NeXT (llava-hf/llava-v1.6-*)
    ],
    # transformers 5.x: save_pretrained drops CLIP's inner `vision_model.`; in-memory names are `model.`-prefixed
    "transformers5": [
        (r"^(?:language_model\.)?lm_head\.", "lm_head."),
        (r"^(?:model\.)?language_model\.(?:model\.)?", "text."),
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
        (r"^(?:model\.)?multi_modal_projector\.", "projector."),
        (r"^(?:model\.)?image_newline$", "image_newline"),  # LLaVA-NeXT
    ],
    # liuhaotian/llava-v1.5-*: LLaMA names, `mm_projector.{0,2}`, CLIP from a separate checkpoint (`--vision`)
    "original": [
        (r"^model\.mm_projector\.0\.", "projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "projector.linear_2."),
        (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision."),
        (r"^lm_head\.", "lm_head."),
        (r"^model\.", "text."),
        # the separate CLIP checkpoint (CLIPModel or CLIPVisionModel)
        (r"^vision_model\.", "vision."),
        (r"^(text_model\.|logit_scale|text_projection\.|visual_projection\.)", "unused.clip_text."),
    ],
    # Video-LLaVA (LanguageBind/Video-LLaVA-7B-hf, transformers 4 or 5): two CLIP towers with or without the
    # inner `vision_model.`, one projector
    "video_llava": [
        (r"^(?:language_model\.)?lm_head\.", "lm_head."),
        (r"^(?:model\.)?language_model\.(?:model\.)?", "text."),
        (r"^(?:model\.)?image_tower\.(?:vision_model\.)?", "image_tower."),
        (r"^(?:model\.)?video_tower\.(?:vision_model\.)?", "video_tower."),
        (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    ],
    # a text-only LlamaForCausalLM / Qwen2ForCausalLM checkpoint
    "causal_lm": [
        (r"^lm_head\.", "lm_head."),
        (r"^model\.", "text."),
    ],
}

_LN = [("weight", "scale"), ("bias", "bias")]

# canonical key pattern -> (parameter path template or None, transform or None). Paths are dotted; integers index
# lists. `{text}` is replaced by the decoder's prefix ("language_model" in LLaVA, "model" in a causal LM).
CANONICAL: list[tuple[str, str | None, object]] = [
    (r"vision\.embeddings\.patch_embedding\.weight", "vision_tower.patch_embedding", conv_to_hwio),
    (r"vision\.embeddings\.class_embedding", "vision_tower.class_embedding", None),
    (r"vision\.embeddings\.position_embedding\.weight", "vision_tower.position_embedding", None),
    (r"vision\.embeddings\.position_ids", None, None),
    *[(rf"vision\.pre_layrnorm\.{a}", f"vision_tower.pre_layrnorm.{b}", None) for a, b in _LN],
    (r"vision\.post_layernorm\.(weight|bias)", None, None),
    *[(rf"vision\.encoder\.layers\.(\d+)\.(layer_norm[12])\.{a}", rf"vision_tower.layers.\1.\2.{b}", None)
      for a, b in _LN],
    (r"vision\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight",
     r"vision_tower.layers.\1.\2.kernel", transpose),
    (r"vision\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.bias",
     r"vision_tower.layers.\1.\2.bias", None),
    (r"projector\.(linear_[12])\.weight", r"multi_modal_projector.\1.kernel", transpose),
    (r"projector\.(linear_[12])\.bias", r"multi_modal_projector.\1.bias", None),
    (r"text\.embed_tokens\.weight", "{text}.embed_tokens.embedding", None),
    (r"text\.norm\.weight", "{text}.norm.weight", None),
    (r"text\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"{text}.layers.\1.\2.weight", None),
    (r"text\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight",
     r"{text}.layers.\1.\2.kernel", transpose),
    (r"text\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.bias", r"{text}.layers.\1.\2.bias",
     None),
    (r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None, None),
    (r"lm_head\.weight", "{text}.lm_head.kernel", transpose),
    (r"image_newline", "image_newline", None),  # LLaVA-NeXT: one [D] vector after each row of tile features
    (r"unused\..*", None, None),
]


def _tower_rules(canonical: str, param: str) -> list:
    """The CLIP rules above for another tower: canonical prefix ``canonical.`` -> parameters under ``param``."""
    out = []
    for pat, template, transform in CANONICAL:
        if pat.startswith(r"vision\."):
            out.append((re.escape(canonical) + pat[len(r"vision"):],
                        None if template is None else param + template[len("vision_tower"):], transform))
    return out


# Video-LLaVA's two towers (``image_tower.*``, ``video_tower.*`` canonical keys)
CANONICAL += _tower_rules("image_tower", "image_tower") + _tower_rules("video_tower", "video_tower")


# SigLIP vision tower (jaxdebias.models.siglip, LLaVA-OneVision's): canonical ``vision.*`` keys (the layouts above
# map ``vision_tower.vision_model.`` there) -> ``vision_tower.*`` parameters.
# The encoder layers are named as CLIP's; SigLIP adds the patch convolution's bias, has no CLS embedding or
# pre-layernorm, and its post_layernorm is a parameter of the port; the attention-pooling head is never built.
SIGLIP: list[tuple[str, str | None, object]] = [
    (r"vision\.embeddings\.patch_embedding\.weight", "vision_tower.patch_embedding", conv_to_hwio),
    (r"vision\.embeddings\.patch_embedding\.bias", "vision_tower.patch_bias", None),
    (r"vision\.embeddings\.position_embedding\.weight", "vision_tower.position_embedding", None),
    (r"vision\.embeddings\.position_ids", None, None),
    *[(rf"vision\.post_layernorm\.{a}", f"vision_tower.post_layernorm.{b}", None) for a, b in _LN],
    (r"vision\.head\..*", None, None),  # vision_use_head's pooling head (OneVision's configs set it False)
    *[rule for rule in CANONICAL if rule[0].startswith(r"vision\.encoder\.")],
]

# A model with a SigLIP tower (LLaVA-OneVision): SigLIP's vision rules, every other rule as above.
SIGLIP_CANONICAL = SIGLIP + [rule for rule in CANONICAL if not rule[0].startswith(r"vision\.")]
