"""The toy LLaVA-1.5: its configs, and its checkpoint in the format ``jaxdebias-convert`` writes.

The shipped model keeps LLaVA-1.5's shapes where they matter to token pruning: a CLIP-shaped tower at 336 px,
patch 14 (576 visual tokens; 4 encoder layers of which LLaVA's ``vision_feature_layer=-2`` runs 3; CLS dropped),
the 2-layer GELU projector and a 24-layer Llama decoder, so FastV's layer 2, PyramidDrop's layers 2/10/20 and
SparseVLM's 2/6/15 all apply. It is thin (width 64 in the tower and the decoder), and its decoder is trained at 6
layers ("shallow") and then stacked into the 24 (``stack``), so that it trains on two CPU cores.

On disk (``save``; what ``jaxdebias.convert.load`` reads): ``params/`` (an Orbax pytree of the parameters
under their module paths), ``config.json`` (a transformers ``LlavaConfig``), ``jaxdebias.json`` (the marker), the
tokenizer (``tokenizer.json``, ``tokenizer_config.json``) and ``preprocessor_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from importlib import resources

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import transformers
from flax import nnx

from jaxdebias.convert.load import FORMAT_VERSION, MARKER, load as load_checkpoint, nest
from jaxdebias.models import llava
from jaxdebias.toy import data, tokenizer

PRESETS = {
    # the shipped model: 576 visual tokens, tower 64 wide (3 of 4 layers run), 24 decoder layers 32 wide
    "shipped": {"side": 336, "vision": (64, 256, 4, 4), "text": (64, 256, 24, 4)},
    # the shipped model's first training phase: 6 decoder layers, stacked 4 times into the 24 (progressive stacking)
    "shallow": {"side": 336, "vision": (64, 256, 4, 4), "text": (64, 256, 6, 4)},
    # tests: 2 x 2 = 4 visual tokens, 2 decoder layers
    "tiny": {"side": 28, "vision": (16, 32, 2, 2), "text": (16, 32, 2, 2)},
    "tiny-deep": {"side": 28, "vision": (16, 32, 2, 2), "text": (16, 32, 4, 2)},  # "tiny" stacked twice
}


def default_path() -> str:
    """The shipped checkpoint inside the package."""
    return str(resources.files("jaxdebias") / "assets" / "toy_model")


def hf_config(preset: str, tok) -> dict:
    """The transformers ``LlavaConfig`` (as a dict) of a preset with this tokenizer's special ids."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown toy preset {preset!r}; expected one of {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    vd, vf, vl, vh = p["vision"]
    td, tf, tl, th = p["text"]
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=vd, intermediate_size=vf, num_hidden_layers=vl, num_attention_heads=vh,
            image_size=p["side"], patch_size=14, projection_dim=vd, hidden_act="quick_gelu"),
        text_config=transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=td, intermediate_size=tf, num_hidden_layers=tl, num_attention_heads=th,
            num_key_value_heads=th, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tokenizer.image_token_id(tok), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    d = cfg.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    return d


def config(preset: str, tok) -> llava.LlavaConfig:
    return llava.LlavaConfig.from_hf_config(hf_config(preset, tok))


def data_config(model_cfg: llava.LlavaConfig, max_len: int | None = None, turns: int = 8) -> data.DataConfig:
    n = model_cfg.vision.num_features
    return data.DataConfig(side=model_cfg.vision.image_size, n_image=n, max_len=max_len or n + 192, turns=turns)


def save(model: llava.Llava, tok, hf: dict, path, *, extra: dict | None = None) -> str:
    """Writes ``model`` (fp32) with its tokenizer as a jaxdebias checkpoint directory; atomic (a temporary sibling
    renamed at the end). ``extra`` goes into the marker (training facts)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; remove it or choose another destination.")
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        params = {tuple(p): np.asarray(v.get_value(), np.float32)
                  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        ocp.save(os.path.join(tmp, "params"), nest(params))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        tok.save_pretrained(tmp)
        side = hf["vision_config"]["image_size"]
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "CLIPImageProcessor", "image_mean": list(data.CLIP_MEAN),
                       "image_std": list(data.CLIP_STD), "size": {"shortest_edge": side},
                       "crop_size": {"height": side, "width": side}, "do_resize": True, "do_center_crop": True,
                       "resample": 3, "do_normalize": True, "image_aspect_ratio": "pad"}, f, indent=1)
        marker = {"format_version": FORMAT_VERSION, "model_type": "llava", "dtype": "float32",
                  "layout": "jaxdebias-toy", "source": "jaxdebias.toy.train", "tensors": len(params),
                  "parameters": int(sum(a.size for a in params.values())), **(extra or {})}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=1)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path, dtype=jnp.float32):
    """(model, tokenizer) from a checkpoint directory written by ``save`` (or ``jaxdebias-convert``)."""
    model = load_checkpoint(path, dtype=dtype)
    return model, tokenizer.load(path)


def load_default():
    """(model, tokenizer) of the shipped toy model: a trained LLaVA-1.5-shaped model, fp32, on the default
    device. The tokenizer is a transformers ``PreTrainedTokenizerFast``; the image token is
    ``model.cfg.image_token_id``."""
    path = default_path()
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise FileNotFoundError(f"The shipped toy model is missing from {path} (package data not installed?). "
                                "Reinstall jaxdebias, or train one: python -m jaxdebias.toy.train --out DIR.")
    return load(path)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """float32[grid * grid + 1, dim]: fixed 2-D sine-cosine position embeddings (MAE's), a zero row for CLS first.
    Half the channels encode the row, half the column, each at ``dim / 4`` frequencies."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def enc(pos):
        a = pos.reshape(-1, 1) * freq
        return np.concatenate([np.sin(a), np.cos(a)], 1)

    table = np.concatenate([enc(rows), enc(cols)], 1)
    return np.concatenate([np.zeros((1, dim)), table], 0).astype(np.float32)


RESIDUAL_OUT = ("o_proj", "down_proj", "out_proj", "fc2")  # matrices that write into a residual stream


def init(preset: str, tok, seed: int) -> llava.Llava:
    """A freshly initialised model of a preset (deterministic in ``seed``), initialised for its small width:
    every matrix normal with std ``1/sqrt(fan_in)``, those writing into a residual stream further scaled by
    ``1/sqrt(2 * layers)`` (GPT-2's rule), token embeddings std 1, and the vision tower's position embeddings
    2-D sine-cosine (MAE's), so patches know their neighbours from the start.

    (The ports' own initialiser, normal(0.02), is the transformers default for widths in the thousands; at width
    64 it starts every attention map uniform and the toy decoder then stays on its text prior: held-out yes/no
    and colour at chance after 600 steps, even with the scene given in words.)"""
    model = llava.Llava(config(preset, tok), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    depth = {"vision_tower": model.cfg.vision.num_layers, "language_model": model.cfg.text.num_layers}
    flat = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(v.get_value())
        name = [str(k) for k in path]
        if name[-1] == "kernel" or name[-1] == "patch_embedding":
            std = 1 / np.sqrt(np.prod(x.shape[:-1]))
            if any(n in RESIDUAL_OUT for n in name):
                std /= np.sqrt(2 * depth[name[0]])
            x = rng.normal(0, std, x.shape)
        elif name[-1] == "embedding":
            x = rng.normal(0, 1.0, x.shape)
        flat.append((path, v.replace(jnp.asarray(x, v.get_value().dtype))))
    nnx.update(model, nnx.from_flat_state(flat))
    v = model.cfg.vision
    model.vision_tower.position_embedding[...] = jnp.asarray(sincos_2d(v.grid, v.hidden_size))
    return model


STACK_MODES = ("split", "identity")


def stack(shallow: llava.Llava, preset: str, tok, seed: int = 0, mode: str = "split") -> llava.Llava:
    """Progressive stacking (Gong et al., ICML 2019): a model of ``preset`` whose decoder layers ``r*k ... r*k + r
    - 1`` (``r`` = its depth / ``shallow``'s) all start as copies of ``shallow``'s layer ``k``; every other parameter
    is copied as is. ``mode`` says how the ``r`` copies share the layer's update to the residual stream:

    - "split": each copy's output projections (``o_proj``, ``down_proj``) are ``1/r`` of the original, so the group
      takes ``r`` steps of a quarter size where the shallow model took one (a residual network read as an ODE):
      close to the shallow model's function, and every layer attends and writes;
    - "identity": the first copy is the layer, the others have zero output projections: exactly the shallow
      model's function, the extra layers silent until trained.

    ``preset`` must differ from ``shallow``'s configuration only in the decoder depth, a multiple of
    ``shallow``'s. Training the shallow model and stacking it costs far less than training the deep one."""
    if mode not in STACK_MODES:
        raise ValueError(f"Unknown stacking mode {mode!r}; expected one of {', '.join(STACK_MODES)}.")
    deep = init(preset, tok, seed)
    L, depth = shallow.cfg.text.num_layers, deep.cfg.text.num_layers
    same = dataclasses.replace(shallow.cfg, text=dataclasses.replace(shallow.cfg.text, num_layers=depth))
    if same != deep.cfg or depth % L:
        raise ValueError(f"Cannot stack a {L}-layer toy model into preset {preset!r} ({depth} layers): the "
                         "configurations must differ only in the decoder depth, a multiple of the shallow one's.")
    r = depth // L
    source = dict(nnx.to_flat_state(nnx.state(shallow, nnx.Param)))
    flat = []
    for path, v in nnx.to_flat_state(nnx.state(deep, nnx.Param)):
        in_layer = path[:2] == ("language_model", "layers")
        x = source[(*path[:2], path[2] // r, *path[3:]) if in_layer else path].get_value()
        if in_layer and path[-2] in RESIDUAL_OUT:
            x = x / r if mode == "split" else (x if path[2] % r == 0 else jnp.zeros_like(x))
        flat.append((path, v.replace(x)))
    nnx.update(deep, nnx.from_flat_state(flat))
    return deep


def answer_logits(model, ids, px, am):
    """float32[B, V] next-token logits at each sample's last real token of a right-padded prompt batch."""
    logits = _forward(model, jnp.asarray(ids), jnp.asarray(px), jnp.asarray(am))
    last = np.asarray(am).sum(1) - 1
    return np.asarray(logits)[np.arange(len(last)), last]


@nnx.jit
def _forward(model, ids, px, am):
    return model(ids, px, am).logits

