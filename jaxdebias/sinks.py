"""Visual attention sinks and VAR attention redistribution.

Source: "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et al., ICLR 2025) and
the authors' released code (seilk/VisAttnSink). The rules here follow that code:

  sink value      phi(x) = max_{d in D_sink} |x_d| / sqrt(mean_d(x_d^2) + 1e-6), on the residual-stream input
                  of a layer (before its norm), fp32; a token is a sink when phi > tau (strict), tau = 20.
  selected rows   per (head, query row): image mass sum_V a >= 0.2 and visual-sink share
                  sum_{S & V} a / sum_V (a + 1e-6) <= rho = 0.5; a sample with no visual sink selects nothing.
  redistribution  on a selected row every sink key (visual and text) keeps p = 0.6 of its weight; the freed
                  (1 - p) * sum_S a goes to the non-sink image keys in proportion to their weight. Row sums are
                  unchanged; a row whose non-sink image mass is 0 is left unchanged.

Axes: B batch, H heads, Q query rows, T keys / sequence, D model dim.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxdebias import _checks

# Published sink dimensions (hidden-state indices) of the LLM decoders.
KNOWN_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llama-2-7b": (1415, 2533),
    "vicuna-7b": (1415, 2533),
    "llava-1.5-7b": (1415, 2533),
    "llama-2-13b": (2100, 4743),
    "vicuna-13b": (2100, 4743),
    "llava-1.5-13b": (2100, 4743),
}


def known_sink_dims(model: str, *, as_released: bool = False) -> tuple[int, ...]:
    """Published sink dims for a model name (case-insensitive); the error lists the known names and points to
    ``discover_sink_dims`` for others.

    ``as_released=True`` gives what the released VAR code (seilk/VisAttnSink@98e62d6) actually runs: its model-name
    setter is never called, so every model - 13B included - runs the 7B dims {1415, 2533}. Use it to reproduce the
    published 13B numbers; the default gives each model its own published dims."""
    key = model.lower()
    if key not in KNOWN_SINK_DIMS:
        raise KeyError(f"No published sink dimensions for {model!r}. Known: {', '.join(KNOWN_SINK_DIMS)}. "
                       "For another LLM, find them with jaxdebias.discover_sink_dims(hidden_states).")
    return KNOWN_SINK_DIMS["llava-1.5-7b"] if as_released else KNOWN_SINK_DIMS[key]


def _dims(sink_dims, d: int):
    dims = jnp.asarray(sink_dims, jnp.int32).reshape(-1)
    if dims.size == 0:
        raise ValueError("sink_dims is empty; give the sink dimensions (or find them with discover_sink_dims).")
    if _checks.is_concrete(dims) and (int(dims.max()) >= d or int(dims.min()) < 0):
        raise ValueError(f"sink_dims {list(map(int, dims))} out of range for hidden size {d}.")
    return dims


def sink_dim_value(hidden, sink_dims):
    """phi(x) = max_{d in D_sink} |x_d| / rms(x).

    Args:
      hidden: float[..., D] residual-stream states (any leading axes, e.g. [B, T, D]).
      sink_dims: int[S] sink dimension indices.

    Returns:
      float32[...] one value per token.
    """
    x = jnp.asarray(hidden, jnp.float32)
    dims = _dims(sink_dims, x.shape[-1])
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1) + 1e-6)
    return jnp.max(jnp.abs(jnp.take(x, dims, axis=-1)), axis=-1) / rms


def sink_tokens(hidden, sink_dims, tau: float = 20.0):
    """bool[...] True where ``sink_dim_value(hidden, sink_dims) > tau`` (strict, as released)."""
    return sink_dim_value(hidden, sink_dims) > tau


@partial(jax.jit, static_argnames=("top",))
def discover_sink_dims(hidden, *, top: int = 2, valid=None):
    """Finds the sink dimensions of an unknown LLM from its hidden states.

    Sink tokens (BOS, and a few visual tokens) carry massive activations in a handful of fixed dimensions. For
    each dimension take the largest ``|x_d| / rms(x)`` over all valid tokens; the sink dimensions are the
    ``top`` dimensions with the largest such value (massive-activation dims reach hundreds, ordinary ones a few).

    Args:
      hidden: float[..., T, D] residual-stream states of a middle layer (layer >= 2), over a few prompts.
      top: static number of dimensions to return.
      valid: bool[..., T] tokens to consider (default all; mask padding).

    Returns:
      (dims int32[top] in decreasing strength, strength float32[top] = the max ratio reached in each).
    """
    x = jnp.asarray(hidden, jnp.float32)
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    ratio = jnp.abs(x) / rms
    if valid is not None:
        ratio = jnp.where(jnp.asarray(valid, bool)[..., None], ratio, 0.0)
    per_dim = jnp.max(ratio.reshape(-1, x.shape[-1]), axis=0)
    strength, dims = jax.lax.top_k(per_dim, top)
    return dims.astype(jnp.int32), strength


def _check_attn(attn, visual_mask, sink_mask):
    _checks.check_rank("attn", attn, 4, "float[B, H, Q, T]")
    B, _, _, T = attn.shape
    for name, m in (("visual_mask", visual_mask), ("sink_mask", sink_mask)):
        if jnp.shape(m) != (B, T):
            raise ValueError(f"{name} must be bool[B, T] = {(B, T)} to match attn {attn.shape}, got "
                             f"{jnp.shape(m)}.")


def image_centric_heads(attn, visual_mask, sink_mask, *, min_visual: float = 0.2, rho: float = 0.5):
    """Rows VAR edits: the image gets >= ``min_visual`` of the row and its visual sinks <= ``rho`` of that.

    Args:
      attn: float[B, H, Q, T] softmax probabilities (before any change).
      visual_mask: bool[B, T] image-token keys; sink_mask: bool[B, T] sink keys (visual and text).
      min_visual: minimum image mass of a selected row (0.2 as released).
      rho: maximum share of the image mass held by visual sinks (0.5 as released).

    Returns:
      bool[B, H, Q] selected rows (all False for a sample with no visual sink).
    """
    _check_attn(attn, visual_mask, sink_mask)
    _checks.check_fraction("min_visual", min_visual)
    _checks.check_fraction("rho", rho)
    a = attn.astype(jnp.float32)
    vis = jnp.asarray(visual_mask, bool)[:, None, None, :]
    vsink = vis & jnp.asarray(sink_mask, bool)[:, None, None, :]
    image_mass = jnp.sum(jnp.where(vis, a, 0.0), -1)
    image_mass_eps = jnp.sum(jnp.where(vis, a + 1e-6, 0.0), -1)
    sink_share = jnp.sum(jnp.where(vsink, a, 0.0), -1) / image_mass_eps
    has_vsink = jnp.any(vsink, axis=-1)
    return (image_mass >= min_visual) & (sink_share <= rho) & has_vsink


def var_redistribute(attn, visual_mask, sink_mask, row_mask, *, p: float = 0.6):
    """VAR: on selected rows, sinks keep ``p`` of their weight; the rest goes to non-sink image tokens.

    Args:
      attn: float[B, H, Q, T] softmax probabilities.
      visual_mask: bool[B, T] image keys; sink_mask: bool[B, T] all sink keys (visual and text).
      row_mask: bool[B, H, Q] (or broadcastable, e.g. [B, H, 1] for whole heads) rows to edit, typically from
        ``image_centric_heads``.
      p: fraction of its weight a sink keeps, in [0, 1] (0.6 as released; p = 1 is the identity).

    Returns:
      float[B, H, Q, T] in attn's dtype; rows sum as before, unselected rows unchanged bit for bit.
    """
    _check_attn(attn, visual_mask, sink_mask)
    _checks.check_fraction("p", p)
    a = attn.astype(jnp.float32)
    sink = jnp.asarray(sink_mask, bool)[:, None, None, :]
    nonsink_img = jnp.asarray(visual_mask, bool)[:, None, None, :] & ~sink
    freed = (1.0 - p) * jnp.sum(jnp.where(sink, a, 0.0), -1, keepdims=True)
    receive = jnp.sum(jnp.where(nonsink_img, a, 0.0), -1, keepdims=True)
    gain = freed / jnp.where(receive > 0, receive, 1.0)
    edited = jnp.where(sink, a * p, jnp.where(nonsink_img, a * (1.0 + gain), a))
    edit = jnp.broadcast_to(jnp.asarray(row_mask, bool), a.shape[:3])[..., None] & (receive > 0)
    return jnp.where(edit, edited.astype(attn.dtype), attn)
