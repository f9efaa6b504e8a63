"""CLIP ViT vision tower (as LLaVA uses it) in Flax NNX.

Axes: B images, C channels, Y and X patch-grid rows and columns, P patches (+1 with CLS), D width, F MLP width,
H heads, E head dim.

LLaVA reads ``hidden_states[vision_feature_layer]`` of the tower (default -2: the input of the last layer), so
only the layers up to that one are built and run; the last layer and ``post_layernorm`` are never used and are
not parameters of this port. The CLS token is dropped for ``vision_feature_select_strategy="default"``.

``ClipVisionTower.with_merges`` runs a token-merging encoder stage (iLLaVA's: ``jaxdebias.methods.illava``): in the
chosen layers a merge rule shortens the tokens between the attention residual and the MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdebias.models import layers


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2
    select_strategy: str = "default"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def grid(self) -> int:
        """Patches per side: image_size // patch_size (the remainder pixels are never read)."""
        return self.image_size // self.patch_size

    @property
    def layers_run(self) -> int:
        """Encoder layers LLaVA runs: hidden_states has num_layers + 1 entries (the first is the embeddings)."""
        return self.feature_layer % (self.num_layers + 1)

    @property
    def num_features(self) -> int:
        """Visual tokens per image fed to the projector."""
        return self.grid**2 + (self.select_strategy == "full")

    @classmethod
    def clip_vit_large_336(cls, **kw) -> ClipVisionConfig:
        """openai/clip-vit-large-patch14-336, LLaVA-1.5's tower."""
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, hf, *, feature_layer=-2, select_strategy="default", **kw) -> ClipVisionConfig:
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ValueError(f"Unsupported vision tower {d.get('model_type')!r}: this port runs CLIP ViT "
                             "(model_type 'clip_vision_model').")
        if d.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"Unsupported vision hidden_act {d.get('hidden_act')!r}; CLIP uses 'quick_gelu'.")
        if not isinstance(feature_layer, int):
            raise ValueError(f"vision_feature_layer={feature_layer!r}: only a single int layer is supported.")
        if select_strategy not in ("default", "full"):
            raise ValueError(f"Unsupported vision_feature_select_strategy {select_strategy!r}; "
                             "expected 'default' or 'full'.")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   image_size=d["image_size"], patch_size=d["patch_size"], num_channels=d.get("num_channels", 3),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-5), feature_layer=feature_layer,
                   select_strategy=select_strategy, **kw)


def _layernorm(dim, eps, cfg, rngs):
    return nnx.LayerNorm(dim, epsilon=eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class ClipAttention(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        D = cfg.hidden_size
        self.q_proj = layers.linear(D, D, shard="col", **kw)
        self.k_proj = layers.linear(D, D, shard="col", **kw)
        self.v_proj = layers.linear(D, D, shard="col", **kw)
        self.out_proj = layers.linear(D, D, shard="row", **kw)
        self.heads = cfg.num_heads

    def __call__(self, x):
        B, P, D = x.shape
        q, k, v = (p(x).reshape(B, P, self.heads, D // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(jax.nn.dot_product_attention(q, k, v).reshape(B, P, D))

    def with_probs(self, x):
        """``__call__`` with explicit attention (as HF's "eager"): (float[B, P, D], probs float32[B, H, P, P])."""
        B, P, D = x.shape
        E = D // self.heads
        q, k, v = (p(x).reshape(B, P, self.heads, E) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = jnp.einsum("bqhe,bkhe->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(E)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhe->bqhe", probs.astype(v.dtype), v).reshape(B, P, D)
        return self.out_proj(out), probs

    def cls_probe(self, x):
        """The CLS row of this layer's attention and its keys, fp32: (float[B, H, P], float[B, P, H, E])."""
        B, P, D = x.shape
        E = D // self.heads
        q = self.q_proj(x[:, :1]).reshape(B, 1, self.heads, E).astype(jnp.float32)
        k = self.k_proj(x).reshape(B, P, self.heads, E).astype(jnp.float32)
        return jax.nn.softmax(jnp.einsum("bqhe,bphe->bhp", q, k) / jnp.sqrt(E), axis=-1), k


class ClipMLP(nnx.Module):
    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, shard="col", **kw)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, shard="row", **kw)

    def __call__(self, x):
        h = self.fc1(x)
        return self.fc2(h * jax.nn.sigmoid(1.702 * h))  # quick_gelu


class ClipEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(.)). float[B, P, D] -> float[B, P, D]. ``mlp``: the MLP
    class (CLIP's quick_gelu one; SigLIP passes its tanh-GELU one)."""

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs, mlp=None):
        self.layer_norm1 = _layernorm(cfg.hidden_size, cfg.layer_norm_eps, cfg, rngs)
        self.self_attn = ClipAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layernorm(cfg.hidden_size, cfg.layer_norm_eps, cfg, rngs)
        self.mlp = (mlp or ClipMLP)(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def merged(self, x, merge):
        """This layer with ``merge(x, probs) -> (x float[B, P', D], kept int32[B, P'])`` applied between the
        attention residual and the MLP (probs: float32[B, H, P, P] the layer's attention): x float[B, P, D] ->
        (float[B, P', D], kept int32[B, P'] ascending indices into P)."""
        out, probs = self.self_attn.with_probs(self.layer_norm1(x))
        x, kept = merge(x + out, probs)
        return x + self.mlp(self.layer_norm2(x)), kept


class ClipVisionTower(nnx.Module):
    """pixel_values float[B, C, H, W] (NCHW, as the HF processor gives) -> features float[B, P', D]."""

    cls_tokens = 1  # leading tokens a merging stage never merges (CLS)

    def __init__(self, cfg: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d), cfg.param_dtype))  # [p, p, C, D]
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), cfg.param_dtype))
        self.position_embedding = nnx.Param(init(rngs.params(), (cfg.grid**2 + 1, d), cfg.param_dtype))
        self.pre_layrnorm = _layernorm(d, cfg.layer_norm_eps, cfg, rngs)
        self.layers = nnx.List([ClipEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.layers_run)])

    def embed(self, pixel_values):
        cfg = self.cfg
        B = pixel_values.shape[0]
        side, p = cfg.grid, cfg.patch_size
        x = pixel_values.astype(cfg.dtype).reshape(B, cfg.num_channels, side, p, side, p)
        patches = jnp.einsum("bcypxq,pqcd->byxd", x, self.patch_embedding[...].astype(cfg.dtype))
        patches = patches.reshape(B, side * side, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(cfg.dtype), (B, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], 1) + self.position_embedding[...].astype(cfg.dtype)

    def embedded(self, pixel_values):
        """The checked input after embeddings and ``pre_layrnorm``: float[B, P + 1, D] (CLS first)."""
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be float[B, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}] (NCHW, as the HF image processor returns), got "
                             f"{pixel_values.shape}.")
        return self.pre_layrnorm(self.embed(pixel_values))

    def __call__(self, pixel_values):
        x = self.embedded(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.cfg.select_strategy == "default" else x

    def with_merges(self, pixel_values, layers: tuple[int, ...], merge):
        """The tower with a token-merging rule in some layers (iLLaVA's encoder stage): each layer in the static
        ``layers`` (0-based, among the ``cfg.layers_run`` that run) applies ``merge(x, probs) -> (x', kept)``
        between its attention residual and its MLP (see ``ClipEncoderLayer.merged``; a rule that keeps CLS at
        index 0 keeps the 'default' features' order). Without layers the features equal ``__call__``'s.

        Returns (features float[B, F', D], source int32[B, F']): F' and the feature order as ``__call__``
        (patches, or CLS + patches for select 'full'); source = each feature's index among ``__call__``'s
        features (for 'default' the raster patch index), ascending; a merged feature sits at the index of the
        token it was merged into."""
        cfg, layers = self.cfg, tuple(layers)
        if len(set(layers)) != len(layers) or not all(0 <= i < cfg.layers_run for i in layers):
            raise ValueError(f"Merge layers {layers} must be distinct, in [0, {cfg.layers_run}) (the layers that "
                             f"run up to feature_layer={cfg.feature_layer}).")
        x = self.embedded(pixel_values)
        source = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        for i, layer in enumerate(self.layers):
            if i in layers:
                x, kept = layer.merged(x, merge)
                source = jnp.take_along_axis(source, kept, axis=1)
            else:
                x = layer(x)
        return (x[:, 1:], source[:, 1:] - 1) if cfg.select_strategy == "default" else (x, source)

    def with_cls_attention(self, pixel_values):
        """VisionZip's inputs from the feature layer (the last layer run): the patch features as ``__call__``
        (float[B, P, D]), the CLS token's feature there (float[B, D]), its attention to the patches (heads
        summed, float32[B, P]) and that layer's patch keys averaged over heads (float32[B, P, E])."""
        if self.cfg.select_strategy != "default":
            raise ValueError("An encoder stage that reads CLS attention needs vision_feature_select_strategy "
                             "'default' (patch features without CLS); this tower keeps CLS in its features.")
        x = self.pre_layrnorm(self.embed(pixel_values))
        for layer in self.layers[:-1]:
            x = layer(x)
        last = self.layers[-1]
        probs, keys = last.self_attn.cls_probe(last.layer_norm1(x))
        x = last(x)
        return x[:, 1:], x[:, 0], jnp.sum(probs, axis=1)[:, 1:], jnp.mean(keys, axis=2)[:, 1:]
