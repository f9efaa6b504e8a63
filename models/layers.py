"""Small pieces shared by the model files: sharded linear/embedding layers, RMSNorm, positions, shape-only models
(``abstract``), the output records (``Output``; ``Taps`` what to tap, ``Tapped`` what was tapped, ``LayerRun``
what ``run_layers`` returns).

Axes (the project's legend, README "How the code is laid out"): B batch, T sequence slots, D width, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Partition specs on a ("data", "model") mesh: column-parallel splits the output features, row-parallel the input.
SHARDING = {"col": (None, "model"), "row": ("model", None), "embed": ("model", None), None: (None, None)}


class ShapeRngs:
    """``rngs`` for a model built only for its shapes (under ``nnx.eval_shape``): every stream gives one fixed key
    and nothing is counted. ``nnx.Rngs`` traces a counter increment per parameter, and flax probes each new count's
    ``.sharding``, whose error message (caught) walks the whole trace: construction grows quadratic in the parameter
    count, 26 s for LLaVA-1.5-13B on a 2-core CPU where fixed keys take 3 s."""

    def __call__(self):
        return jax.random.key(0)

    def __getattr__(self, stream: str):  # rngs.params(), rngs.dropout(), ...; not copy's or pickle's dunders
        if stream.startswith("_"):
            raise AttributeError(stream)
        return self


def abstract(cls, cfg):
    """The model ``cls(cfg, rngs=...)`` with ``jax.ShapeDtypeStruct`` parameters: its structure and shapes, nothing
    allocated (for counting, sharding, loading)."""
    return nnx.eval_shape(lambda: cls(cfg, rngs=ShapeRngs()))


def linear(din, dout, *, bias, shard=None, dtype, param_dtype, rngs):
    """nnx.Linear whose kernel [in, out] and bias carry partition specs (applied when placed on a mesh)."""
    with nnx.use_eager_sharding(False):
        return nnx.Linear(
            din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), SHARDING[shard]),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                            (SHARDING[shard][1],) if shard else (None,)))


def embed(num, dim, dtype, param_dtype, rngs):
    with nnx.use_eager_sharding(False):
        return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), SHARDING["embed"]))


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        with nnx.use_eager_sharding(False):
            self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def default_positions(attention_mask):
    """Position ids from a bool[B, T] mask: count of real tokens before, 0 on padding (as HF generate)."""
    real = attention_mask.astype(jnp.int32)
    return jnp.where(attention_mask, jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)


def last_real(h, valid):
    """h[b, last True slot of valid[b]] for each b. h: [B, T, D]; valid: bool[B, T] -> [B, D]."""
    last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[1]), 0), axis=1)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    """logits float32[B, T, V]; attentions {layer: float32[B, H, Q, S]}; hidden_states {layer: float32[B, T, D]};
    image_features [I, P, D] when the model saw images; attn_outputs {layer: float32[B, T, D]}; sinks {layer:
    bool[B, T]} (VAR's sink tokens on its layers)."""

    logits: Any
    attentions: dict = dataclasses.field(default_factory=dict)
    hidden_states: dict = dataclasses.field(default_factory=dict)
    image_features: Any = None
    attn_outputs: dict = dataclasses.field(default_factory=dict)
    sinks: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Taps:
    """What to return beside the logits (each into the ``Output`` field of the same meaning).

    attn_layers: decoder layers whose attention rows go to ``Output.attentions`` (static);
    rows: int[B, Q] query slots of those rows in the current sequence (traced);
    hidden_layers: layers whose residual-stream *input* goes to ``Output.hidden_states`` ([B, T, D], fp32);
    out_layers: layers whose attention block output (after o_proj, before the residual add) goes to
      ``Output.attn_outputs`` ([B, T, D], fp32).
    """

    attn_layers: tuple[int, ...] = ()
    rows: Any = None
    hidden_layers: tuple[int, ...] = ()
    out_layers: tuple[int, ...] = ()


jax.tree_util.register_dataclass(Taps, data_fields=["rows"], meta_fields=["attn_layers", "hidden_layers",
                                                                         "out_layers"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tapped:
    """What ``Taps`` asked for, by layer (the ``layers.Output`` fields of the same names): attentions {layer:
    float32[B, H, Q, S]}, hidden_states {layer: float32[B, T, D]} (the layer's input), attn_outputs {layer:
    float32[B, T, D]}, sinks {layer: bool[B, T]} (VAR's sink tokens on its layers)."""

    attentions: dict = dataclasses.field(default_factory=dict)
    hidden_states: dict = dataclasses.field(default_factory=dict)
    attn_outputs: dict = dataclasses.field(default_factory=dict)
    sinks: dict = dataclasses.field(default_factory=dict)

    def fields(self) -> dict:
        """The four dicts by name (to spread into ``layers.Output``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerRun:
    """What ``run_layers`` returns: h [B, T, D] the last run layer's output, cache (a KVCache, or None without
    one), tapped (``Tapped``)."""

    h: Any
    cache: Any
    tapped: Tapped
