"""Checkpoints -> models on a device or a mesh: a converted Orbax checkpoint (``load``) or a Hugging Face checkpoint
converted in memory (``from_hf``). The command line, the notebooks and the converter all load through here; the
converter (``jaxdebias.convert.write``) only writes.

The on-disk format: ``params/`` (Orbax, parameter paths as nested string keys), ``config.json`` (normalised to the
transformers layout), ``jaxdebias.json`` (the marker: format version, dtype, source), and the tokenizer and
processor files copied beside them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from jaxdebias.convert.source import ConversionError, Source, detect_layout, list_weight_files, plan, stream
from jaxdebias.models import llama, llava, llava_next, video_llava


def config_path(src) -> str:
    """config.json of a checkpoint directory, or beside the first of an explicit list of weight files."""
    base = os.path.dirname(os.fspath(src[0])) if isinstance(src, (list, tuple)) else os.fspath(src)
    return os.path.join(base, "config.json")


def read_config(src) -> dict:
    if not isinstance(src, (list, tuple)) and not os.path.isdir(src):
        raise ConversionError(f"{src} is not a checkpoint directory (expected config.json and *.safetensors).")
    path = config_path(src)
    if not os.path.isfile(path):
        raise ConversionError(f"No config.json at {path}; a Hugging Face checkpoint directory holds config.json "
                              "beside its weights.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path} is not valid JSON ({e}).") from None


ORIGINAL_IMAGE_TOKEN = -200  # IMAGE_TOKEN_INDEX of the original LLaVA code: placeholder ids below the vocab


def normalize_config(config: dict, vision=None) -> dict:
    """A transformers-style config dict for any supported source.

    The original LLaVA release (liuhaotian/llava-v1.5-*) keeps Llama fields at the top level, names its projector
    in ``mm_projector_type`` and loads CLIP from ``mm_vision_tower``; its vision config is read from the
    ``vision`` checkpoint directory and its image placeholder is the original IMAGE_TOKEN_INDEX, -200.
    """
    if "mm_projector_type" not in config and "mm_vision_tower" not in config:
        return config
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"Unsupported mm_projector_type {projector!r}: this port runs LLaVA-1.5's "
                              "'mlp2x_gelu' projector (Linear-GELU-Linear).")
    if vision is None:
        raise ConversionError("The original LLaVA release keeps the CLIP tower in a separate checkpoint: pass "
                              f"--vision DIR (a local copy of {config.get('mm_vision_tower', 'the CLIP model')}).")
    vcfg = read_config(vision)
    vcfg = vcfg.get("vision_config", vcfg)  # CLIPModel nests it; CLIPVisionModel does not
    vcfg = {"model_type": "clip_vision_model", **{k: v for k, v in vcfg.items() if k != "model_type"}}
    select = {"patch": "default", "cls_patch": "full"}.get(config.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise ConversionError(f"Unsupported mm_vision_select_feature {config['mm_vision_select_feature']!r}; "
                              "expected 'patch' or 'cls_patch'.")
    text = {k: v for k, v in config.items() if not k.startswith("mm_")}
    text["model_type"] = "llama"
    return {"model_type": "llava", "text_config": text, "vision_config": vcfg,
            "vision_feature_layer": config.get("mm_vision_select_layer", -2),
            "vision_feature_select_strategy": select, "image_token_id": ORIGINAL_IMAGE_TOKEN,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True}


def model_for(config: dict, dtype):
    """(our config, model class, text prefix) for a transformers-style config dict."""
    kind = config.get("model_type")
    try:
        if kind == "llava":
            return llava.LlavaConfig.from_hf_config(config, dtype=dtype), llava.Llava, "language_model"
        if kind == "llava_next":
            return (llava_next.LlavaNextConfig.from_hf_config(config, dtype=dtype), llava_next.LlavaNext,
                    "language_model")
        if kind == "video_llava":
            return (video_llava.VideoLlavaConfig.from_hf_config(config, dtype=dtype), video_llava.VideoLlava,
                    "language_model")
        if kind in ("llama", "qwen2", "mistral"):
            return llama.LlamaConfig.from_hf_config(config, dtype=dtype, param_dtype=dtype), \
                llama.LlamaForCausalLM, "model"
    except (KeyError, ValueError) as e:
        raise ConversionError(f"config.json is not a supported {kind} config: {e}") from None
    raise ConversionError(f"config.json has model_type {kind!r}; supported: 'llava' (LLaVA-1.5), 'llava_next' "
                          "(LLaVA-NeXT), 'video_llava' "
                          "(Video-LLaVA), and 'llama' / 'qwen2' text models.")


def unused_paths(cfg):
    """Parameters a checkpoint has and the port deliberately does not build."""
    text = cfg.text if hasattr(cfg, "text") else cfg
    runs = cfg.vision.layers_run if hasattr(cfg, "vision") else None

    def unused(path):
        towers = ("vision_tower", "image_tower", "video_tower")
        if path[0] in towers and len(path) > 2 and path[1] == "layers" and runs is not None:
            return path[2] >= runs  # layers past vision_feature_layer
        return text.tie_word_embeddings and path[-2:] == ("lm_head", "kernel")

    return unused


def abstract(cls, cfg):
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def target_shapes(model) -> dict[tuple, tuple]:
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def prepare(src, *, layout="auto", vision=None, dtype=jnp.float32):
    """Reads config and weight headers, checks everything, and returns (cfg, cls, source, steps, layout)."""
    config = normalize_config(read_config(src), vision)
    cfg, cls, prefix = model_for(config, dtype)
    files = list_weight_files(src)
    if vision is not None:
        files = files + list_weight_files(vision)
    source = Source(files)
    layout = detect_layout(source.refs) if layout == "auto" else layout
    steps = plan(source, layout, target_shapes(abstract(cls, cfg)), text_prefix=prefix, unused=unused_paths(cfg))
    return cfg, cls, source, steps, layout, config


def from_hf(src, *, dtype=jnp.float32, layout="auto", vision=None, sharding=None):
    """Converts a HF checkpoint straight into a model in memory (for small models and tests).

    Each tensor is converted and placed on the device as it is read; nothing is randomly initialised.
    """
    cfg, cls, source, steps, _, _ = prepare(src, layout=layout, vision=vision, dtype=dtype)
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


MARKER = "jaxdebias.json"
FORMAT_VERSION = 1


def nest(flat: dict[tuple, object]) -> dict:
    """{(a, 0, b): x} -> {"a": {"0": {"b": x}}} (Orbax trees take string keys)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return out


def _placement(mesh):
    """path, spec -> a sharding for restoring one parameter (replicated on one device without a mesh)."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's (multi-host safe)
        return lambda shape, spec: one

    def on_mesh(shape, spec):
        spec = tuple(spec) if spec else ()
        spec = tuple(a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return on_mesh


def load(dst, *, dtype=None, mesh=None):
    """Restores a converted checkpoint straight to device(s): an abstract model gives the target shapes and
    shardings (from the parameters' partition specs when ``mesh`` is given), so no host copy of the model and
    no random initialisation is ever made.

    Args:
      dst: directory written by ``convert``.
      dtype: compute/parameter dtype (default: the stored one); a different dtype is cast on restore.
      mesh: optional ``jax.sharding.Mesh`` with axes ("data", "model").
    """
    dst = os.path.abspath(os.fspath(dst))  # Orbax reads absolute paths only; a user passes relative ones
    marker = os.path.join(dst, MARKER)
    if not os.path.isfile(marker):
        raise ConversionError(f"{dst} is not a jaxdebias checkpoint (no {MARKER}). Convert a Hugging Face "
                              "checkpoint first: jaxdebias-convert SRC DST.")
    with open(marker) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{dst} has checkpoint format {meta.get('format_version')}, this version reads "
                              f"{FORMAT_VERSION}; convert it again.")
    dtype = jnp.dtype(dtype or meta["dtype"])
    cfg, cls, _ = model_for(read_config(dst), dtype)
    model = abstract(cls, cfg)
    place = _placement(mesh)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    specs = {tuple(p): v.get_metadata().get("out_sharding") for p, v in flat.items()}
    target = nest({p: jax.ShapeDtypeStruct(v.get_value().shape, dtype, sharding=place(v.get_value().shape, specs[p]))
                    for p, v in flat.items()})
    restored = ocp.load(os.path.join(dst, "params"), target)

    def get(path):
        node = restored
        for p in path:
            node = node[str(p)]
        return node

    return fill(model, {p: get(p) for p in flat})
