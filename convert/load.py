"""Checkpoints -> models on a device or a mesh: a converted Orbax checkpoint (``load``) or a Hugging Face checkpoint
converted in memory (``from_hf``). The command line, the notebooks and the converter all load through here; the
converter (``jaxdebias.convert.write``) only writes.

The on-disk format: ``params/`` (Orbax, parameter paths as nested string keys), ``config.json`` (normalised to the
transformers layout), ``jaxdebias.json`` (the marker: format version, dtype, source, and a ``checksum`` of every
parameter, see ``digest.checksum``), and the tokenizer and processor files copied beside them.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from jaxdebias.convert import digest
from jaxdebias.convert.files import ConversionError, Source, list_weight_files, require_dir
from jaxdebias.convert import tables
from jaxdebias.convert.source import detect_layout, plan, stream, warn_overflow
from jaxdebias.models import llama, llava, llava_next, llava_onevision, video_llava
from jaxdebias.models.layers import abstract
from jaxdebias.models.siglip import SiglipVisionTower


def config_path(src) -> str:
    """config.json of a checkpoint directory, or beside the first of an explicit list of weight files."""
    base = os.path.dirname(os.fspath(src[0])) if isinstance(src, (list, tuple)) else os.fspath(src)
    return os.path.join(base, "config.json")


def read_config(src) -> dict:
    """The config.json of a checkpoint directory (or beside an explicit list of weight files), as a dict."""
    if not isinstance(src, (list, tuple)):
        require_dir(os.fspath(src), "a checkpoint directory", "config.json and *.safetensors")
    path = config_path(src)
    if not os.path.isfile(path):
        raise ConversionError(f"No config.json at {path}; a Hugging Face checkpoint directory holds config.json "
                              "beside its weights.")
    with open(path, "rb") as f:
        try:
            config = json.loads(f.read())
        except (ValueError, RecursionError) as e:
            raise ConversionError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a JSON {type(config).__name__}; expected an object (a transformers "
                              "config).")
    return config


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
        if kind == "llava_onevision":
            return (llava_onevision.LlavaOnevisionConfig.from_hf_config(config, dtype=dtype),
                    llava_onevision.LlavaOnevision, "language_model")
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
                          "(Video-LLaVA), 'llava_onevision' (LLaVA-OneVision), and 'llama' / 'qwen2' text models.")


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
    rules = tables.SIGLIP_CANONICAL if getattr(cls, "tower", None) is SiglipVisionTower else tables.CANONICAL
    steps = plan(source, layout, target_shapes(abstract(cls, cfg)), text_prefix=prefix, unused=unused_paths(cfg),
                 rules=rules)
    return cfg, cls, source, steps, layout, config


def from_hf(src, *, dtype=jnp.float32, layout="auto", vision=None, sharding=None):
    """Converts a HF checkpoint straight into a model in memory (for small models and tests).

    Each tensor is converted and placed on the device as it is read; nothing is randomly initialised.
    """
    cfg, cls, source, steps, _, _ = prepare(src, layout=layout, vision=vision, dtype=dtype)
    model = abstract(cls, cfg)
    values, overflow = {}, {}
    for t in stream(source, steps, np.dtype(jnp.dtype(dtype))):
        values[t.path] = jax.device_put(t.array) if sharding is None else jax.device_put(t.array, sharding(t.path))
        overflow[dotted(t.path)] = t.overflow
    warn_overflow(overflow, dtype)
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


def dotted(path: tuple) -> str:
    """("language_model", "layers", 0, "norm") -> "language_model.layers.0.norm" (the marker's and messages' name)."""
    return ".".join(map(str, path))


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


def _shown(value) -> str:
    """A marker value for a message, with its JSON type when that is what is wrong ("'1' (a string)")."""
    if value is None:
        return "missing"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = {str: "a string", bool: "a boolean", float: "a number with a fraction", list: "a list", dict: "an object"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


def read_marker(dst: str) -> dict:
    """The checked marker of a converted checkpoint directory (``jaxdebias.json``)."""
    require_dir(dst, "a checkpoint directory", f"{MARKER}, config.json and params/ (written by jaxdebias-convert)")
    marker = os.path.join(dst, MARKER)
    redo = f"Convert the checkpoint again: jaxdebias-convert SRC {dst}."
    if not os.path.isfile(marker):
        raise ConversionError(f"{dst} is not a jaxdebias checkpoint (no {MARKER}). Convert a Hugging Face "
                              "checkpoint first: jaxdebias-convert SRC DST.")
    try:
        with open(marker, "rb") as f:
            meta = json.loads(f.read())
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{marker} is not valid JSON ({e}); the checkpoint is damaged. {redo}") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{marker} holds a JSON {type(meta).__name__}, expected an object; the checkpoint is "
                              f"damaged. {redo}")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ConversionError(f"{dst} has checkpoint format {_shown(version)}; this version reads format "
                              f"{FORMAT_VERSION} (an integer). {redo}")
    try:
        if not isinstance(meta.get("dtype"), str):
            raise TypeError
        jnp.dtype(meta["dtype"])
    except TypeError:
        raise ConversionError(f"{marker} names dtype {_shown(meta.get('dtype'))}, not a dtype; the checkpoint is "
                              f"damaged. {redo}") from None
    digests = meta.get("digests")
    if digests is not None and (meta.get("checksum") != digest.CHECKSUM or not isinstance(digests, dict)):
        raise ConversionError(f"{marker} holds checksums of kind {_shown(meta.get('checksum'))}; this version checks "
                              f"{digest.CHECKSUM!r}. Update jaxdebias, convert the checkpoint again, or load with "
                              "verify=False.")
    return meta


def _orbax_error(dst: str, meta: dict, e: Exception) -> ConversionError:
    """One message for an Orbax/TensorStore read failure: the parameter (when the error names it) and the cause,
    without TensorStore's spec dump."""
    text = f"{e} {e.__cause__ or ''}"
    param = re.findall(r"([A-Za-z_][\w.]*)/(?:c/|zarr\.json)", text) or re.findall(r"'path': '([^'/][^']*)/'", text)
    cause = str(e.__cause__ or e).strip().splitlines()[0].split(" [tensorstore_spec")[0]
    cause = cause if len(cause) <= 300 else cause[:300] + " ..."
    what = f"parameter {param[0]}" if param else "the parameters"
    return ConversionError(f"{dst}: {what} could not be read from params/ ({cause}). A params file is missing, "
                           "truncated or damaged; convert the checkpoint again: jaxdebias-convert "
                           f"{meta.get('source', 'SRC')} {dst}.")


def load(dst, *, dtype=None, mesh=None, verify=True):
    """Restores a converted checkpoint straight to device(s): an abstract model gives the target shapes and
    shardings (from the parameters' partition specs when ``mesh`` is given), so no host copy of the model and
    no random initialisation is ever made.

    Every parameter is checked against the digest the converter stored in the marker (``digest.checksum``, computed on the
    device(s) where the array lands, so it costs about one extra read of the weights in device memory); a mismatch
    raises ConversionError naming the corrupt parameters. Checkpoints written before digests existed (no "digests"
    in the marker) still load, unchecked. When checking, parameters are restored in the stored dtype and cast to
    ``dtype`` afterwards, one at a time.

    Args:
      dst: directory written by ``convert``.
      dtype: compute/parameter dtype (default: the stored one); a different dtype is cast on restore.
      mesh: optional ``jax.sharding.Mesh`` with axes ("data", "model").
      verify: check the digests (default); False skips the check.

    Raises:
      ConversionError: not a checkpoint, a damaged marker or config, a params file Orbax cannot read, or a parameter
        whose digest does not match.
    """
    dst = os.path.abspath(os.fspath(dst))  # Orbax reads absolute paths only; a user passes relative ones
    meta = read_marker(dst)
    stored = jnp.dtype(meta["dtype"])
    dtype = jnp.dtype(dtype or stored)
    digests = meta.get("digests") if verify else None
    cfg, cls, _ = model_for(read_config(dst), dtype)
    model = abstract(cls, cfg)
    place = _placement(mesh)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    specs = {tuple(p): v.get_metadata().get("out_sharding") for p, v in flat.items()}
    restore = stored if digests is not None else dtype
    target = nest({p: jax.ShapeDtypeStruct(v.get_value().shape, restore,
                                           sharding=place(v.get_value().shape, specs[p]))
                   for p, v in flat.items()})
    params = os.path.join(dst, "params")
    require_dir(params, "a complete checkpoint's params/", "the Orbax parameter files; convert the checkpoint again")
    try:
        restored = ocp.load(params, target)
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions and ValueErrors with long specs
        raise _orbax_error(dst, meta, e) from None

    values = {}
    for path in flat:
        node = restored
        for p in path:
            node = node[str(p)]
        values[path] = node
    del restored, node  # the casts below free each stored-dtype array as they replace it
    if digests is not None:
        missing = [dotted(p) for p in flat if dotted(p) not in digests]
        lanes = {p: digest.lanes(v) for p, v in values.items()}  # dispatched together, then waited for
        bad = [dotted(p) for p in flat if dotted(p) in digests and digest.hexdigest(lanes[p]) != digests[dotted(p)]]
        if missing or bad:
            why = (f"{len(bad)} parameter(s) do not match the checksums written at conversion: "
                   f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else
                   f"its marker has no checksum for {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            raise ConversionError(f"{dst} is corrupt: {why}. The files changed on disk after conversion (a bad disk "
                                  "or copy?); convert the checkpoint again: jaxdebias-convert "
                                  f"{meta.get('source', 'SRC')} {dst}.")
        if dtype != stored:
            for p in values:  # one at a time
                values[p] = digest.cast(values[p], dtype)
    return fill(model, values)
