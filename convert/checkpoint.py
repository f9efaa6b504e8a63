"""HF checkpoint -> our model: in memory (``from_hf``) or to an Orbax checkpoint on disk (``convert``)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdebias.convert.loader import ConversionError, Source, detect_layout, list_weight_files, plan, stream
from jaxdebias.models import llama as llama_mod
from jaxdebias.models import llava as llava_mod


def read_config(src) -> dict:
    import json

    path = os.path.join(os.fspath(src), "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{src} has no config.json; a Hugging Face checkpoint directory holds config.json "
                              "beside its weights.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path} is not valid JSON ({e}).") from None


def model_for(config: dict, dtype):
    """(our config, model class, text prefix) for a HF config dict."""
    kind = config.get("model_type")
    if kind == "llava":
        return llava_mod.LlavaConfig.from_hf_config(config, dtype=dtype), llava_mod.Llava, "language_model"
    if kind in ("llama", "qwen2"):
        return llama_mod.LlamaConfig.from_hf_config(config, dtype=dtype, param_dtype=dtype), \
            llama_mod.LlamaForCausalLM, "model"
    raise ConversionError(f"config.json has model_type {kind!r}; supported: 'llava' (LLaVA-1.5), and 'llama' / "
                          "'qwen2' text models.")


def unused_paths(cfg):
    """Parameters a checkpoint has and the port deliberately does not build."""
    text = cfg.text if hasattr(cfg, "text") else cfg
    runs = cfg.vision.layers_run if hasattr(cfg, "vision") else None

    def unused(path):
        if path[0] == "vision_tower" and len(path) > 2 and path[1] == "layers" and runs is not None:
            return path[2] >= runs  # layers past vision_feature_layer
        return text.tie_word_embeddings and path[-2:] == ("lm_head", "kernel")

    return unused


def abstract(cls, cfg):
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def target_shapes(model) -> dict[tuple, tuple]:
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def prepare(src, *, layout="auto", vision=None, dtype=jnp.float32):
    """Reads config and weight headers, checks everything, and returns (cfg, cls, source, steps, layout)."""
    config = read_config(src)
    cfg, cls, prefix = model_for(config, dtype)
    files = list_weight_files(src)
    if vision is not None:
        files = files + list_weight_files(vision)
    source = Source(files)
    layout = detect_layout(source.refs) if layout == "auto" else layout
    if layout == "original" and cls is llava_mod.Llava and not any(k.startswith("vision_model.") or ".vision_model."
                                                                   in k for k in source.refs):
        raise ConversionError("The original LLaVA release keeps the CLIP tower in a separate checkpoint: pass "
                              "--vision DIR (e.g. a local copy of openai/clip-vit-large-patch14-336).")
    steps = plan(source, layout, target_shapes(abstract(cls, cfg)), text_prefix=prefix, unused=unused_paths(cfg))
    return cfg, cls, source, steps, layout


def from_hf(src, *, dtype=jnp.float32, layout="auto", vision=None, sharding=None):
    """Converts a HF checkpoint straight into a model in memory (for small models and tests).

    Each tensor is converted and placed on the device as it is read; nothing is randomly initialised.
    """
    cfg, cls, source, steps, _ = prepare(src, layout=layout, vision=vision, dtype=dtype)
    model = abstract(cls, cfg)
    values = {}
    for path, arr, _ in stream(source, steps, np.dtype(jnp.dtype(dtype))):
        values[path] = jax.device_put(arr) if sharding is None else jax.device_put(arr, sharding(path))
    return fill(model, values)


def fill(model, values: dict):
    """Puts concrete arrays (by path) into an abstract model."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, var in flat:
        if tuple(path) not in values:
            raise ConversionError(f"No value for {'.'.join(map(str, path))}.")
        leaves.append(var.replace(values[tuple(path)]))
    return nnx.merge(graphdef, nnx.from_flat_state(list(zip([p for p, _ in flat], leaves))))
