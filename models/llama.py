"""Llama / Vicuna decoder (also Qwen2's qkv-bias variant) in Flax NNX, with attention taps and a KV cache.

Axes: B batch, T query slots, S key slots (T at prefill, the cache length at decode), D width, H query heads,
G key/value heads, E head dim, F MLP width, V vocab, L layers, Q tapped query rows.

Parameter names follow transformers (``layers[i].self_attn.q_proj.kernel`` ...) so that conversion is a table.
Kernels are stored [in, out] and carry partition specs for a ("data", "model") mesh: column-parallel
projections split their output over "model", row-parallel ones their input.

Masks are built from slots, not positions (``rows.slot_mask``); positions only feed RoPE. This keeps left and right
padding, KV caches and pruned (gathered) sequences on one code path. Interventions arrive as named records:
``interventions.VarContext`` (VAR) and ``interventions.TriangleAttention`` (TriangleMix).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdebias as jd
from jaxdebias.models import layers
from jaxdebias.models.interventions import TriangleAttention, TriangleMix, VarContext, VarRows, VarSpec, var_rows
from jaxdebias.models.rows import attention_rows, causal_attention, put_rows, row_probs, slot_mask, take_rows


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # llama3: factor, low/high_freq_factor, original_max
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: attention window; this port checks prompts stay within it
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def llama2_7b(cls, **kw) -> LlamaConfig:
        """Llama-2-7B / Vicuna-7B-v1.5 (the LLaVA-1.5-7B decoder; llava-hf pads the vocab to 32064)."""
        return cls(**kw)

    @classmethod
    def llama2_13b(cls, **kw) -> LlamaConfig:
        return cls(**{"hidden_size": 5120, "intermediate_size": 13824, "num_layers": 40, "num_heads": 40,
                      "num_kv_heads": 40, **kw})

    @classmethod
    def from_hf_config(cls, hf, **kw) -> LlamaConfig:
        """From a transformers LlamaConfig / Qwen2Config / MistralConfig (object or dict, transformers 4 or 5
        style). Mistral is Llama-shaped; its sliding window is recorded and never reached (checked on input)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"Unsupported text model_type {model_type!r}: this port runs 'llama', 'qwen2' and "
                             "'mistral'.")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Unsupported hidden_act {act!r} in the text config: the Llama MLP here is SwiGLU (silu).")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = tuple((k, float(rope[k])) for k in
                            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        elif rope_type not in ("default", None):
            raise ValueError(f"Unsupported rope_type {rope_type!r}: supported are 'default' and 'llama3'.")
        if d.get("sliding_window") and d.get("use_sliding_window"):
            raise ValueError("Sliding-window attention (use_sliding_window=True) is not supported by this port.")
        qwen = model_type == "qwen2"
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(d.get("attention_bias", False)),
            o_bias=False if qwen else bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=d.get("sliding_window") if model_type == "mistral" else None, **kw)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """float32[E / 2] inverse frequencies (default or llama3-scaled), as transformers computes them."""
    dim = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    s = dict(cfg.rope_scaling)
    factor, low, high, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s[
        "original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [B, T, heads, E]; positions: int[B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def cached_attention(q, k, v, mask):
    """Softmax attention of q [B, T, H, E] over a cache k, v [B * G, S, E] (grouped-query heads) under mask
    bool[B, T, S], as ``jax.nn.dot_product_attention``'s XLA path computes it (fp32 logits and softmax, probs in
    the cache's dtype). The decode step's attention: the cache's one leading batch axis and the operand order (q
    first, then v first) are forms XLA:CPU's dots take as they are, so the cache is neither transposed nor copied
    (a [B, G, S, E] cache is reshaped for the dot, and XLA then duplicates the in-place update). A prompt keeps
    ``jax.nn.dot_product_attention`` (``rows.causal_attention``). Returns [B, T, H, E]."""
    B, T, H, E = q.shape
    G = k.shape[0] // B
    R = H // G
    qn = q.reshape(B, T, G, R, E).transpose(0, 2, 1, 3, 4).reshape(B * G, T * R, E)
    logits = jnp.einsum("nqe,nse->nqs", qn, k.astype(q.dtype), preferred_element_type=jnp.float32)
    allowed = jnp.broadcast_to(mask[:, None, :, None, :], (B, G, T, R, mask.shape[-1])).reshape(logits.shape)
    logits = jnp.where(allowed, logits * np.float32(1 / math.sqrt(E)), -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nse,nqs->nqe", v, probs)
    return out.reshape(B, G, T, R, E).transpose(0, 2, 1, 3, 4).reshape(B, T, H, E).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Fixed-size cache with one entry per layer, so that a donated cache is updated in place and layers after a
    pruning stage can hold shorter sequences than the layers before it.

    k, v: L-tuples of [B * G, S_l, E] (batch and key/value heads as one leading axis: ``cached_attention`` reads
    it in place); valid: L-tuple of bool[B, S_l] (slot holds a real token);
    length: L-tuple of int32[] (next free slot); next_pos: L-tuple of int32[B] (position id of the next token);
    sink, visual: L-tuples of bool[B, S_l] (VAR's prefill sink set and image span, all False without VAR).
    """

    k: tuple
    v: tuple
    valid: tuple
    length: tuple
    next_pos: tuple
    sink: tuple = ()  # per layer bool[B, S_l]: VAR sink keys found at prefill (empty without VAR)
    visual: tuple = ()  # per layer bool[B, S_l]: image keys (empty without VAR)

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, sizes, dtype=None) -> KVCache:
        """``sizes``: one int for every layer, or an L-sequence of per-layer slot counts."""
        sizes = (sizes,) * cfg.num_layers if isinstance(sizes, int) else tuple(sizes)
        if len(sizes) != cfg.num_layers:
            raise ValueError(f"KVCache needs {cfg.num_layers} layer sizes, got {len(sizes)}.")
        dtype = dtype or cfg.dtype
        kv = lambda S: jnp.zeros((batch * cfg.num_kv_heads, S, cfg.hd), dtype)  # noqa: E731
        flags = lambda: tuple(jnp.zeros((batch, S), bool) for S in sizes)  # noqa: E731
        return cls(tuple(kv(S) for S in sizes), tuple(kv(S) for S in sizes), flags(),
                   (jnp.zeros((), jnp.int32),) * len(sizes), (jnp.zeros((batch,), jnp.int32),) * len(sizes),
                   flags(), flags())

    def with_prompt(self, start: int, stop: int, valid, next_pos) -> KVCache:
        """Records that layers [start, stop) hold a prompt of T slots (bool[B, T] ``valid``) at slots [0, T)."""
        T = valid.shape[1]
        upd = lambda old, new: old[:start] + (new,) * (stop - start) + old[stop:]  # noqa: E731
        vals = self.valid[:start] + tuple(v.at[:, :T].set(valid) for v in self.valid[start:stop]) + self.valid[stop:]
        return dataclasses.replace(self, valid=vals, length=upd(self.length, jnp.asarray(T, jnp.int32)),
                                   next_pos=upd(self.next_pos, jnp.asarray(next_pos, jnp.int32)))


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        D, H, G, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.hd
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = layers.linear(D, H * E, bias=cfg.qkv_bias, shard="col", **kw)
        self.k_proj = layers.linear(D, G * E, bias=cfg.qkv_bias, shard="col", **kw)
        self.v_proj = layers.linear(D, G * E, bias=cfg.qkv_bias, shard="col", **kw)
        self.o_proj = layers.linear(H * E, D, bias=cfg.o_bias, shard="row", **kw)
        self.heads = (H, G, E)

    def queries(self, x, positions, inv_freq):
        """Rotated queries [B, T, H, E] of x [B, T, D]."""
        B, T, _ = x.shape
        H, _, E = self.heads
        return rope(self.q_proj(x).reshape(B, T, H, E), positions, inv_freq)

    def keys(self, x, positions, inv_freq):
        """Rotated keys [B, T, G, E] of x [B, T, D]."""
        B, T, _ = x.shape
        _, G, E = self.heads
        return rope(self.k_proj(x).reshape(B, T, G, E), positions, inv_freq)

    def __call__(self, x, positions, inv_freq, mask, *, kv=None, slot=None, tap_rows=None,
                 attend: TriangleAttention | None = None, var: VarRows | None = None):
        """x: [B, T, D]; positions: int[B, T]; mask: bool[B, T, S]; kv: (k, v) [B * G, S, E] cache of this layer,
        written at ``slot``; tap_rows: int[B, Q] rows whose probabilities are returned; attend: TriangleMix in
        place of the fused attention; var: VAR's rows to recompute with its edit.

        Returns (out [B, T, D], (k, v) written cache [B * G, S, E] or this step's keys [B, T, G, E], probs
        float32[B, H, Q, S] or None).
        """
        B, T, _ = x.shape
        H, G, E = self.heads
        q, k = self.queries(x, positions, inv_freq), self.keys(x, positions, inv_freq)
        v = self.v_proj(x).reshape(B, T, G, E)
        written = None
        if kv is not None:  # write in the cache's head-major layout; [B, S, G, E] views for the other paths
            written = tuple(jax.lax.dynamic_update_slice_in_dim(
                c, new.astype(c.dtype).transpose(0, 2, 1, 3).reshape(B * G, T, E), slot, axis=1)
                for c, new in zip(kv, (k, v)))
            k, v = (c.reshape(B, G, -1, E).transpose(0, 2, 1, 3) for c in written)  # dropped by XLA where unused
        k_q, v_q = k.astype(q.dtype), v.astype(q.dtype)
        if attend is not None:
            out = attend(q, k_q, v_q, mask)
        elif written is not None and T == 1:  # decode: over the cache in place
            out = cached_attention(q, *written, mask)
        else:  # a prompt at slots [0, T): only the keys its causal mask can reach
            out = causal_attention(q, k_q, v_q, mask)
        if var is not None:
            edited, _ = var_rows(q, k, v, mask, var)
            out = put_rows(out, var.rows, var.row_valid, edited)
        probs = None if tap_rows is None else attention_rows(q, k, mask, tap_rows)
        return self.o_proj(out.reshape(B, T, H * E)), (k, v) if written is None else written, probs


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = layers.linear(cfg.hidden_size, cfg.intermediate_size, shard="col", **kw)
        self.up_proj = layers.linear(cfg.hidden_size, cfg.intermediate_size, shard="col", **kw)
        self.down_proj = layers.linear(cfg.intermediate_size, cfg.hidden_size, shard="row", **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def probe(self, x, positions, inv_freq, mask, rows):
        """The attention rows this layer would compute on input x [B, T, D], without running it:
        float32[B, H, Q, T]. Queries are projected for the Q rows (int[B, Q]) only, keys for every token."""
        h = self.input_layernorm(x)
        q = self.self_attn.queries(take_rows(h, rows), take_rows(positions, rows), inv_freq)  # [B, Q, H, E]
        return row_probs(q, self.self_attn.keys(h, positions, inv_freq), take_rows(mask, rows)[:, :, :x.shape[1]])

    def __call__(self, x, positions, inv_freq, mask, **kw):
        """Returns (output, (k, v), tapped probs or None, the attention block's output [B, T, D])."""
        a, kv, probs = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, **kw)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv, probs, a


def _widen(x, num_slots: int):
    """bool[B, T] prompt flags at slots [0, T) of a cache with ``num_slots`` slots -> bool[B, num_slots]."""
    B, T = x.shape
    return x if num_slots == T else jnp.zeros((B, num_slots), bool).at[:, :T].set(x)


class LlamaModel(nnx.Module):
    """Embedding, decoder layers, final norm and LM head."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.linear(cfg.hidden_size, cfg.vocab_size, bias=False, shard="col", dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype, rngs=rngs)

    def logits(self, h):
        """h: [..., D] final-layer states -> float32[..., V]."""
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", h, self.embed_tokens.embedding[...].astype(h.dtype)).astype(
                jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def run_layers(self, h, positions, mask, *, start=0, stop=None, cache=None, taps=layers.Taps(), real=None,
                   var: VarContext | None = None, triangle: TriangleMix | None = None):
        """Runs layers [start, stop) over a prompt. h: [B, T, D]; positions int[B, T]; mask bool[B, T, S].

        With ``cache`` (a KVCache) each layer writes its keys/values at slots [0, T) and attends over its cache
        (S = that layer's cache size; ``mask`` must cover it). ``real``: bool[B, T] real-token slots (default
        all). ``var``: VAR on its layers (sinks measured on each layer's input, the context's rows edited);
        ``triangle``: sparse prefill from its starting layer. Returns a ``layers.LayerRun`` (h, the cache or None, the
        ``Tapped`` arrays).
        """
        stop = self.cfg.num_layers if stop is None else stop
        B, T, _ = h.shape
        S = mask.shape[2]
        real = jnp.ones((B, T), bool) if real is None else real
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg))  # a constant of the config, not a parameter
        tapped = layers.Tapped()
        new = {name: list(getattr(cache, name)) for name in ("k", "v", "sink", "visual")} if cache is not None else {}
        var_layers = () if var is None else var.spec.layer_set(self.cfg.num_layers)
        dims = None if var is None or var.spec.sink_dims == "discover" else var.dims
        attend = TriangleAttention.bind(triangle, positions, real, S)
        sparse_from = self.cfg.num_layers if triangle is None else triangle.starting_layer
        for i in range(start, stop):
            if i in taps.hidden_layers:
                tapped.hidden_states[i] = h.astype(jnp.float32)
            edit = None
            if i in var_layers:
                if dims is None:  # discover the sink dims once, on the first VAR layer's input
                    dims = jd.discover_sink_dims(h, top=var.spec.n_discover, valid=real)[0]
                sink = jd.sink_tokens(h, dims, var.spec.tau) & real
                tapped.sinks[i] = sink
                edit = VarRows(var.rows, var.row_valid, _widen(var.visual, S), _widen(sink, S), var.spec)
                if cache is not None:
                    new["sink"][i], new["visual"][i] = edit.sink, edit.visual
            h, (k, v), probs, attn_out = self.layers[i](
                h, positions, inv_freq, mask, kv=None if cache is None else (cache.k[i], cache.v[i]), slot=0,
                tap_rows=taps.rows if i in taps.attn_layers else None, attend=attend if i >= sparse_from else None,
                var=edit)
            if probs is not None:
                tapped.attentions[i] = probs
            if i in taps.out_layers:
                tapped.attn_outputs[i] = attn_out.astype(jnp.float32)
            if cache is not None:
                new["k"][i], new["v"][i] = k, v
        if cache is not None:
            cache = dataclasses.replace(cache, **{name: tuple(x) for name, x in new.items()})
        return layers.LayerRun(h, cache, tapped)

    def decode(self, h, cache: KVCache, var: VarSpec | None = None, reselect=None):
        """One new token per sample. h: [B, 1, D] embeddings. Each layer writes at its own next slot and uses its
        own position counter (they differ after pruning). With ``var``, the new token's row is edited on VAR's
        layers using each layer's prefill sinks and image span from the cache. ``reselect`` (FastV's mask mode,
        ``sequence.MaskReselect``): the new token's row in layer ``reselect.layer - 1`` gives the keys
        (``reselect(probs) -> bool[B, S]``) that the layers from ``reselect.layer`` on may attend to.
        Returns (states [B, 1, D], cache).
        """
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg))
        B = h.shape[0]
        ks, vs, valids, lens, poss = (list(x) for x in (cache.k, cache.v, cache.valid, cache.length, cache.next_pos))
        var_layers = () if var is None else var.layer_set(self.cfg.num_layers)
        row, row_valid = jnp.zeros((B, 1), jnp.int32), jnp.ones((B, 1), bool)
        tap_layer = None if reselect is None else reselect.layer - 1
        allowed = None
        for i in range(self.cfg.num_layers):
            slot = lens[i]
            valids[i] = jax.lax.dynamic_update_slice_in_dim(valids[i], jnp.ones((B, 1), bool), slot, axis=1)
            mask = slot_mask(jnp.full((B, 1), slot), valids[i] if allowed is None else valids[i] & allowed)
            edit = VarRows(row, row_valid, cache.visual[i], cache.sink[i], var) if i in var_layers else None
            h, (ks[i], vs[i]), probs, _ = self.layers[i](h, poss[i][:, None], inv_freq, mask, kv=(ks[i], vs[i]),
                                                         slot=slot, var=edit, tap_rows=row if i == tap_layer else None)
            if i == tap_layer:
                allowed = reselect(probs)
            lens[i], poss[i] = slot + 1, poss[i] + 1
        return h, dataclasses.replace(cache, k=tuple(ks), v=tuple(vs), valid=tuple(valids), length=tuple(lens),
                                      next_pos=tuple(poss))


class LlamaForCausalLM(nnx.Module):
    """The decoder as a plain language model (``model.model`` holds the LlamaModel, as in transformers)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.model = LlamaModel(cfg, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, taps: layers.Taps = layers.Taps(),
                 triangle: TriangleMix | None = None):
        """input_ids int[B, T]; attention_mask [B, T]. Returns Output with logits float32[B, T, V]."""
        ids = jnp.asarray(input_ids)
        real = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = layers.default_positions(real) if position_ids is None else jnp.asarray(position_ids)
        mask = slot_mask(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), real)
        h = self.model.embed_tokens(ids)
        if triangle is not None:
            triangle.check(self.model.cfg.num_layers)
        run = self.model.run_layers(h, positions, mask, taps=taps, real=real, triangle=triangle)
        return layers.Output(logits=self.model.logits(run.h), **run.tapped.fields())
