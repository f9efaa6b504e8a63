"""SigLIP vision tower (as LLaVA-OneVision uses it) in Flax NNX.

Axes: B images, C channels, Y and X patch-grid rows and columns, p patch side, P patches (no CLS: P = grid**2,
729 at 384/14), D width, F MLP width, H heads, E head dim.

How it differs from CLIP (``clip.py``): no CLS token and no pre-layernorm; the patch convolution has a bias; one
learned position embedding per patch, added as is (the tower takes only its own ``image_size``, so nothing is
interpolated); 384 is not a multiple of 14: the stride-14 convolution reads a 27 x 27 grid from the top-left
378 x 378 pixels and never sees the last 6 rows and columns (nor does this port); the MLP's activation is
``gelu_pytorch_tanh`` (tanh-approximate GELU); ``layer_norm_eps`` is 1e-6 by default. The attention is CLIP's
(``clip.ClipAttention``: q/k/v/out biases, scale E**-0.5).

LLaVA-OneVision's features: its checkpoints (``llava-hf/llava-onevision-qwen2-{0.5b,7b,72b}-ov-hf``) keep 26 of
google/siglip-so400m-patch14-384's 27 layers (the release deletes the last one) and read
``hidden_states[vision_feature_layer]`` with ``vision_feature_layer=-1`` and ``vision_feature_select_strategy=
"full"``: the 26th layer's output, all 729 patches, *without* ``post_layernorm`` (transformers' SiglipVisionModel
applies ``post_layernorm`` to ``last_hidden_state`` only; its ``hidden_states[-1]`` is taken before it). Only the
layers up to the feature layer are built and run. ``post_layernorm`` is a parameter (the checkpoints hold it), used
only by ``last_hidden_state`` (transformers' output of the same name); the attention-pooling head
(``vision_use_head``) is not built.

``SiglipVisionTower.with_merges`` runs a token-merging encoder stage with the contract of
``ClipVisionTower.with_merges``; SigLIP has no CLS token, so the rule protects no token (``protected=0``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdebias.models import layers
from jaxdebias.models.clip import ClipEncoderLayer, ClipVisionConfig

# transformers' SiglipVisionConfig defaults: a config.json written by save_pretrained leaves out values equal to
# them (the published OneVision configs omit num_channels, hidden_act and layer_norm_eps).
HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(ClipVisionConfig):
    """CLIP's tower config (``grid``, ``layers_run``) with SigLIP's defaults and checks: no CLS token."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    image_size: int = 384
    layer_norm_eps: float = 1e-6
    feature_layer: int = -1
    select_strategy: str = "full"

    def __post_init__(self):
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}: no "
                             "patch fits.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
        if not isinstance(self.feature_layer, int) or not -(self.num_layers + 1) <= self.feature_layer <= \
                self.num_layers:
            raise ValueError(f"vision_feature_layer={self.feature_layer!r}: expected one int indexing the "
                             f"{self.num_layers + 1} hidden states (embeddings + {self.num_layers} layers), in "
                             f"[{-(self.num_layers + 1)}, {self.num_layers}]; lists of layers are not supported.")
        if self.select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy={self.select_strategy!r}: SigLIP has no CLS token, "
                             "and 'default' would drop its first patch (as transformers does); this port runs "
                             "'full' (every patch), as LLaVA-OneVision does.")

    @property
    def num_features(self) -> int:
        """Visual tokens per image fed to the projector: every patch (729 at 384/14)."""
        return self.grid**2

    @classmethod
    def so400m_384(cls, **kw) -> SiglipVisionConfig:
        """google/siglip-so400m-patch14-384 as LLaVA-OneVision ships it (0.5b, 7b and 72b alike): 26 of its 27
        layers, features = the 26th layer's output (``hidden_states[-1]``, no post_layernorm), all 729 patches."""
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, hf, *, feature_layer=-1, select_strategy="full", **kw) -> SiglipVisionConfig:
        """From transformers' SiglipVisionConfig (or its dict: a checkpoint's ``config["vision_config"]``);
        ``feature_layer`` and ``select_strategy`` are the top-level ``vision_feature_layer`` and
        ``vision_feature_select_strategy``. Keys a config.json leaves out take transformers' defaults."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"Unsupported vision tower {d.get('model_type')!r}: this port runs SigLIP (model_type "
                             "'siglip_vision_model'); pass the checkpoint's vision_config, not the whole config.")
        d = {**HF_DEFAULTS, **d}
        if d["hidden_act"] != "gelu_pytorch_tanh":
            raise ValueError(f"Unsupported vision hidden_act {d['hidden_act']!r}; SigLIP uses 'gelu_pytorch_tanh'.")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   image_size=d["image_size"], patch_size=d["patch_size"], num_channels=d["num_channels"],
                   layer_norm_eps=d["layer_norm_eps"], feature_layer=feature_layer, select_strategy=select_strategy,
                   **kw)


def _layernorm(cfg: SiglipVisionConfig, rngs):
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         rngs=rngs)


class SiglipMLP(nnx.Module):
    """float[B, P, D] -> fc1 [D, F] -> gelu_pytorch_tanh -> fc2 [F, D] -> float[B, P, D]."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, shard="col", **kw)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, shard="row", **kw)

    def __call__(self, x):
        # gelu_pytorch_tanh: 0.5 h (1 + tanh(sqrt(2 / pi) (h + 0.044715 h^3))), jax's approximate GELU
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiglipVisionTower(nnx.Module):
    """pixel_values float[B, C, H, W] (NCHW, as the HF processor gives, H = W = image_size) -> features
    float[B, P, D] (``hidden_states[feature_layer]``: every patch in raster order, no post_layernorm)."""

    cls_tokens = 0  # no CLS: every token is a merge candidate

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        init = nnx.initializers.normal(0.02)
        self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d), cfg.param_dtype))  # [p, p, C, D]
        self.patch_bias = nnx.Param(jnp.zeros((d,), cfg.param_dtype))  # [D]
        self.position_embedding = nnx.Param(init(rngs.params(), (cfg.grid**2, d), cfg.param_dtype))  # [P, D]
        self.layers = nnx.List([ClipEncoderLayer(cfg, rngs=rngs, mlp=SiglipMLP) for _ in range(cfg.layers_run)])
        self.post_layernorm = _layernorm(cfg, rngs)

    def embedded(self, pixel_values):
        """The checked input after the patch convolution and position embeddings: float[B, P, D] (raster order;
        transformers' ``hidden_states[0]``)."""
        cfg = self.cfg
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be float[B, {cfg.num_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}] (NCHW, as the HF image processor returns), got "
                             f"{pixel_values.shape}; SigLIP's position embeddings fit its image_size only.")
        B, side, p = pixel_values.shape[0], cfg.grid, cfg.patch_size
        x = pixel_values[:, :, :side * p, :side * p]  # a 'valid' convolution: the remainder rows/columns unused
        x = x.astype(cfg.dtype).reshape(B, cfg.num_channels, side, p, side, p)
        patches = jnp.einsum("bcypxq,pqcd->byxd", x, self.patch_embedding[...].astype(cfg.dtype))
        patches = patches.reshape(B, side * side, -1) + self.patch_bias[...].astype(cfg.dtype)
        return patches + self.position_embedding[...].astype(cfg.dtype)

    def __call__(self, pixel_values):
        x = self.embedded(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return x

    def last_hidden_state(self, pixel_values):
        """transformers' ``last_hidden_state``: every layer, then ``post_layernorm``: float[B, P, D]. Only for a
        tower whose feature layer is the last (LLaVA-OneVision's features are ``__call__``, before the norm)."""
        cfg = self.cfg
        if cfg.layers_run != cfg.num_layers:
            raise ValueError(f"last_hidden_state needs all {cfg.num_layers} layers, but feature_layer="
                             f"{cfg.feature_layer} builds only {cfg.layers_run}; use __call__ for the features.")
        return self.post_layernorm(self(pixel_values))

    def with_merges(self, pixel_values, layers: tuple[int, ...], merge):
        """The tower with a token-merging rule in some layers (an encoder pruning stage): each layer in the static
        ``layers`` (0-based, among the ``cfg.layers_run`` that run) applies ``merge(x, probs) -> (x', kept)``
        between its attention residual and its MLP (see ``clip.ClipEncoderLayer.merged``; no CLS, so every token is
        a candidate). Without layers the features equal ``__call__``'s.

        Returns (features float[B, F', D], source int32[B, F']): source = each feature's raster patch index
        (its index among ``__call__``'s features), ascending; a merged feature sits at the index of the token it
        was merged into."""
        cfg, layers = self.cfg, tuple(layers)
        if len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < cfg.layers_run
                                                       for i in layers):
            raise ValueError(f"Merge layers {layers} must be distinct ints in [0, {cfg.layers_run}) (the layers "
                             f"that run up to feature_layer={cfg.feature_layer}).")
        x = self.embedded(pixel_values)
        source = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        for i, layer in enumerate(self.layers):
            if i in layers:
                x, kept = layer.merged(x, merge)
                source = jnp.take_along_axis(source, kept, axis=1)
            else:
                x = layer(x)
        return x, source

    def with_cls_attention(self, pixel_values):
        """Refused: an encoder stage that reads the CLS token's attention has no CLS token to read on SigLIP."""
        raise ValueError("SigLIP has no CLS token, so an encoder stage that reads CLS attention cannot run on this "
                         "tower (LLaVA-OneVision); choose a method that prunes inside the decoder or by merging.")
