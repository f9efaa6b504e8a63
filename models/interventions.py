"""Attention interventions inside the decoder: VAR redistribution and TriangleMix sparse prefill.

Axes: B batch, T query slots, S key slots, H query heads, G key/value heads, R query heads per key/value head,
E head dim, Q edited rows.

VAR - "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et al., ICLR 2025) and the
authors' release (seilk/VisAttnSink). Sinks are measured on each layer's residual input at prefill; the rows
after the image (and, at decode, the new token's row) get their probabilities recomputed exactly, edited by
``jaxdebias.image_centric_heads`` / ``var_redistribute``, and multiplied with V; every other row stays on the
fused attention path.

TriangleMix - "TriangleMix: Accelerating Prefilling via Decoding-time Contribution Sparsity" (2025). From
``starting_layer`` on, prefill attention keeps only ``j <= i and (i >= N - n_last' or j < n_init or
i - j < n_local)``, with ``n_last' = min(n_last, N - 1)`` and N each sample's real prompt length; decode is dense.
Paths: "masked" (dense attention under the pattern: same numerics everywhere, no savings) and "split" (a causal
band of n_local keys computed block by block + the sink columns + the last rows, merged through their
log-sum-exp, which really skips the middle). Positions i, j are position ids (the count of real tokens before).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

import jaxdebias as jd
from jaxdebias.models.rows import attention_rows, put_rows, rows_after_image, weighted_values


@dataclasses.dataclass(frozen=True)
class VarSpec:
    """VAR settings (released defaults). sink_dims: the LLM's sink dimensions (``jd.known_sink_dims(name)``), or
    "discover" to find the ``n_discover`` strongest massive-activation dims of each prompt batch on layer 2's
    input; layers: "released" (2 .. L-1, what the released code runs), "intended" (2 .. L-2, what its config
    says) or an explicit tuple."""

    sink_dims: tuple | str
    p: float = 0.6
    tau: float = 20.0
    rho: float = 0.5
    min_visual: float = 0.2
    layers: tuple | str = "released"
    n_discover: int = 2

    def __post_init__(self):
        if isinstance(self.sink_dims, str):
            if self.sink_dims != "discover":
                raise ValueError(f"sink_dims must be a tuple of ints or 'discover', got {self.sink_dims!r}; "
                                 f"published dims: {jd.KNOWN_SINK_DIMS}.")
        else:
            dims = tuple(int(d) for d in self.sink_dims)
            if not dims:
                raise ValueError("VAR needs sink dimensions: give them (jd.known_sink_dims(...)) or "
                                 "sink_dims='discover'.")
            object.__setattr__(self, "sink_dims", dims)
        for name in ("p", "rho", "min_visual"):
            jd._checks.check_fraction(name, getattr(self, name))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))

    def layer_set(self, num_layers: int) -> tuple[int, ...]:
        if self.layers == "released":
            return tuple(range(2, num_layers))
        if self.layers == "intended":
            return tuple(range(2, num_layers - 1))
        bad = [l for l in self.layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"VAR layers {bad} are outside the model's 0..{num_layers - 1}.")
        return tuple(self.layers)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VarContext:
    """VAR's inputs for one prefill. visual: bool[B, T] image slots (the keys VAR redistributes to; at prefill
    also the image span); rows: int[B, Q] / row_valid: bool[B, Q] the query rows to edit; dims: int[Z] sink dims
    (empty with sink_dims="discover")."""

    visual: jax.Array
    rows: jax.Array
    row_valid: jax.Array
    dims: jax.Array
    spec: VarSpec = dataclasses.field(metadata={"static": True})


def var_context(var: VarSpec | None, is_img, real, span: int) -> VarContext | None:
    """VAR's inputs for a prefill: the real image slots and the rows after the image span (``rows_after_image``)."""
    if var is None:
        return None
    rows, row_valid = rows_after_image(is_img, real, span)
    dims = jnp.zeros((0,), jnp.int32) if var.sink_dims == "discover" else jnp.asarray(var.sink_dims, jnp.int32)
    return VarContext(is_img & real, rows, row_valid, dims, var)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VarRows:
    """VAR's input to one attention layer: edit ``rows`` int[B, Q] (where ``row_valid`` bool[B, Q]) with the
    image keys ``visual`` bool[B, S] and this layer's sink keys ``sink`` bool[B, S]."""

    rows: jax.Array
    row_valid: jax.Array
    visual: jax.Array
    sink: jax.Array
    spec: VarSpec = dataclasses.field(metadata={"static": True})


def var_rows(q, k, v, mask, edit: VarRows):
    """VAR-edited attention output of the edited rows: (out float32[B, Q, H, E], selected bool[B, H, Q]).
    q: [B, T, H, E]; k, v: [B, S, G, E]; mask: bool[B, T, S]."""
    probs = attention_rows(q, k, mask, edit.rows)  # [B, H, Q, S]
    selected = jd.image_centric_heads(probs, edit.visual, edit.sink, min_visual=edit.spec.min_visual,
                                      rho=edit.spec.rho)
    selected = selected & edit.row_valid[:, None, :]
    edited = jd.var_redistribute(probs, edit.visual, edit.sink, selected, p=edit.spec.p)
    return weighted_values(edited, v), selected


@dataclasses.dataclass(frozen=True)
class TriangleMix:
    """TriangleMix settings. Published: n_init 8, n_local 512, n_last 128; starting_layer 16 for Llama-3.1-8B (32
    layers), 20 for Qwen2.5-7B (28 layers); our LLaVA-1.5 default 16 of 32. path: "masked", "split" or "auto"
    ("splash" on TPU, "split" on GPU, "masked" on CPU). block: query block of the split path's band."""

    n_init: int = 8
    n_local: int = 512
    n_last: int = 128
    starting_layer: int = 16
    path: str = "auto"
    block: int = 128

    def __post_init__(self):
        for name in ("n_init", "n_last", "starting_layer"):
            if getattr(self, name) < 0:
                raise ValueError(f"TriangleMix {name} must be >= 0, got {getattr(self, name)}.")
        if self.n_local <= 0:
            raise ValueError(f"TriangleMix n_local must be > 0 (the local window), got {self.n_local}.")
        if self.path not in ("auto", "masked", "split", "splash"):
            raise ValueError(f"TriangleMix path must be 'auto', 'masked', 'split' or 'splash', got {self.path!r}.")

    def check(self, num_layers: int):
        if self.starting_layer >= num_layers:
            raise ValueError(f"TriangleMix starting_layer {self.starting_layer} is past the model's {num_layers} "
                             "layers; nothing would be sparse.")

    def resolved_path(self) -> str:
        """The path that runs: "splash" on TPU, "split" on GPU, "masked" on CPU unless set explicitly."""
        if self.path != "auto":
            return self.path
        return {"cpu": "masked", "tpu": "splash"}.get(jax.devices()[0].platform, "split")


def triangle_allowed(qpos, kpos, n_real, spec: TriangleMix):
    """bool[B, T, S] from index vectors: qpos int[B, T], kpos int[B, S], n_real int[B] (computed, not stored)."""
    i, j, n = qpos[:, :, None], kpos[:, None, :], n_real[:, None, None]
    last = jnp.minimum(spec.n_last, n - 1)
    return (j <= i) & ((i >= n - last) | (j < spec.n_init) | (i - j < spec.n_local))


def attend_masked(q, k, v, mask, qpos, kpos, real, n_real, spec: TriangleMix):
    """Dense attention under the TriangleMix pattern (and the usual slot mask)."""
    m = mask & triangle_allowed(qpos, kpos, n_real, spec)
    return jax.nn.dot_product_attention(q, k, v, mask=m[:, None])


def _softmax_parts(logits, valid):
    """Row max-shifted exp sums for a partial softmax: (m [.., 1], l [..], e [.., S])."""
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(logits - m), 0.0)
    return m, jnp.sum(e, -1), e


def attend_split(q, k, v, mask, qpos, kpos, real, n_real, spec: TriangleMix):
    """TriangleMix without the middle: for each query block only its band of keys (n_local back) and the sink
    columns are read, merged by log-sum-exp; the last rows of each sample are then recomputed densely.

    Assumes a prefill where slot order equals position order (the slot mask's causality); cost
    O(T * (n_local + block + n_init) + n_last * T) instead of O(T^2).
    """
    B, T, H, E = q.shape
    G = k.shape[2]
    R = H // G
    blk = min(spec.block, T)
    nb = -(-T // blk)
    pad = nb * blk - T
    span = blk + spec.n_local - 1  # keys a query block can reach through the band
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, nb, blk, G, R, E)
    qp = jnp.pad(qpos, ((0, 0), (0, pad)), constant_values=-1).reshape(B, nb, blk)
    mk = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(B, nb, blk, -1)
    # keys padded before (bands reaching left of slot 0) and after (the last block's rows past T)
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (span, pad), (0, 0), (0, 0)))
    vf = jnp.pad(v.astype(jnp.float32), ((0, 0), (span, pad), (0, 0), (0, 0)))
    kp = jnp.pad(kpos, ((0, 0), (span, pad)), constant_values=-(10**9))
    scale = 1.0 / math.sqrt(E)

    def band(b):  # keys [b*blk - n_local + 1, (b+1)*blk) in original slots -> padded offset +span
        start = b * blk - spec.n_local + 1 + span
        ks = jax.lax.dynamic_slice_in_dim(kf, start, span, axis=1)
        vs = jax.lax.dynamic_slice_in_dim(vf, start, span, axis=1)
        kps = jax.lax.dynamic_slice_in_dim(kp, start, span, axis=1)
        slots = start - span + jnp.arange(span)
        inside = (slots >= 0) & (slots < mask.shape[2])
        mks = jnp.take(mk[:, b], jnp.clip(slots, 0, mask.shape[2] - 1), axis=2) & inside[None, None, :]
        i, j = qp[:, b][:, :, None], kps[:, None, :]
        ok = mks & (j <= i) & (i - j < spec.n_local)
        logits = jnp.einsum("bqgre,bsge->bgrqs", qf[:, b], ks) * scale
        m, l, e = _softmax_parts(logits, ok[:, None, None])
        o = jnp.einsum("bgrqs,bsge->bgrqe", e, vs)
        return m[..., 0], l, o

    m1, l1, o1 = jax.lax.map(band, jnp.arange(nb))  # [nb, B, G, R, blk(, E)]
    if spec.n_init == 0:
        m2, l2, o2 = (jnp.full((B, G, R, T, 1), -jnp.inf), jnp.zeros((B, G, R, T)), jnp.zeros((B, G, R, T, E)))
    else:
        m2, l2, o2 = _sinks(q, k, v, mask, qpos, kpos, real, spec)
    return _merge_and_last_rows(q, k, v, mask, qpos, real, n_real, spec, (m1, l1, o1), (m2, l2, o2), nb, blk)


def _sinks(q, k, v, mask, qpos, kpos, real, spec):
    """Partial softmax over the sink columns (positions < n_init) outside the band; they sit right after each
    sample's left padding. Returns (m [B, G, R, T, 1], l [B, G, R, T], o [B, G, R, T, E])."""
    B, T, H, E = q.shape
    G = k.shape[2]
    R = H // G
    scale = 1.0 / math.sqrt(E)
    first = jnp.argmax(real, axis=1)[:, None]
    sink_slots = jnp.clip(first + jnp.arange(spec.n_init)[None, :], 0, k.shape[1] - 1)
    ks, vs = (jnp.take_along_axis(x, sink_slots[:, :, None, None], axis=1).astype(jnp.float32) for x in (k, v))
    kps = jnp.take_along_axis(kpos, sink_slots, axis=1)
    qr = q.astype(jnp.float32).reshape(B, T, G, R, E)
    i, j = qpos[:, :, None], kps[:, None, :]
    ok = (jnp.take_along_axis(mask, jnp.broadcast_to(sink_slots[:, None, :], (B, T, spec.n_init)), axis=2)
          & (j <= i) & (j < spec.n_init) & (i - j >= spec.n_local)
          & (jnp.arange(spec.n_init) < jnp.sum(real, 1)[:, None])[:, None, :])
    logits = jnp.einsum("bqgre,bsge->bgrqs", qr, ks) * scale
    m2, l2, e2 = _softmax_parts(logits, ok[:, None, None])
    return m2, l2, jnp.einsum("bgrqs,bsge->bgrqe", e2, vs)


def _merge_and_last_rows(q, k, v, mask, qpos, real, n_real, spec, band, sinks, nb, blk):
    B, T, H, E = q.shape
    (m1, l1, o1), (m2, l2, o2) = band, sinks

    def unblock(x):  # [nb, B, G, R, blk, ...] -> [B, G, R, T, ...]
        x = jnp.moveaxis(x, 0, 3)
        return x.reshape(*x.shape[:3], nb * blk, *x.shape[5:])[:, :, :, :T]

    m1, l1, o1 = unblock(m1), unblock(l1), unblock(o1)
    m = jnp.maximum(m1, m2[..., 0])
    a1, a2 = jnp.exp(m1 - m), jnp.exp(m2[..., 0] - m)
    denom = a1 * l1 + a2 * l2
    out = (a1[..., None] * o1 + a2[..., None] * o2) / jnp.where(denom > 0, denom, 1.0)[..., None]
    out = jnp.moveaxis(out.reshape(B, H, T, E), 2, 1)  # [B, T, H, E]
    return _last_rows(out, q, k, v, mask, qpos, real, n_real, spec).astype(q.dtype)


def _last_rows(out, q, k, v, mask, qpos, real, n_real, spec):
    """The last rows of each sample see every earlier key: recompute them densely into out [B, T, H, E]."""
    T = q.shape[1]
    n_last = min(spec.n_last, T)
    if n_last > 0:
        last_pos = n_real[:, None] - 1 - jnp.arange(n_last)[::-1][None, :]  # positions H-n_last .. H-1
        hit = (qpos[:, None, :] == last_pos[:, :, None]) & real[:, None, :]
        rows = jnp.argmax(hit, axis=2)
        valid = jnp.any(hit, axis=2) & (last_pos >= n_real[:, None] - jnp.minimum(spec.n_last, n_real[:, None] - 1))
        probs = attention_rows(q, k, mask, rows)
        out = put_rows(out, rows, valid, weighted_values(probs, v))
    return out


def _triangle_band_mask(n_init: int, n_local: int):
    """Splash's computable mask for the static part of the pattern: j <= i and (j < n_init or i - j < n_local)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask  # TPU path

    class TriangleBandMask(splash_mask._ComputableMask):
        def __init__(self, shape):
            self.params = (n_init, n_local)
            super().__init__(shape=shape, mask_function=lambda q, kv: (kv <= q) & ((kv < n_init) | (q - kv < n_local)))

        def __eq__(self, other):
            return type(self) is type(other) and self.shape == other.shape and self.params == other.params

        def __hash__(self):
            return hash((type(self), self.shape, self.params))

    return TriangleBandMask


@functools.lru_cache(maxsize=16)
def _splash_kernel(T: int, heads: int, n_init: int, n_local: int, interpret: bool):
    """One splash-attention MQA kernel per (padded length, heads per kv group, pattern): built once, reused.
    (Pallas is imported here, on the TPU path only, to keep it out of every import of the models.)"""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    mask = splash_mask.MultiHeadMask([_triangle_band_mask(n_init, n_local)((T, T)) for _ in range(heads)])
    blk = 128
    sizes = splash_kernel.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    return splash_kernel.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def attend_splash(q, k, v, mask, qpos, kpos, real, n_real, spec: TriangleMix):
    """TriangleMix through the Pallas splash-attention kernel (TPU; interpreted elsewhere, for tests): the band and
    sink columns as a block-sparse computable mask - blocks outside the pattern are skipped - then each sample's
    last rows recomputed densely. Needs slots == positions (right padding, as ``generate`` produces); the
    prompt is padded to a multiple of the 128-slot kernel block."""
    B, T, H, E = q.shape
    G = k.shape[2]
    R = H // G
    Tp = -(-T // 128) * 128  # kernel blocks are 128 slots; padded keys lie after every real query
    kernel = _splash_kernel(Tp, R, spec.n_init, spec.n_local, jax.devices()[0].platform != "tpu")
    pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
    qs = jnp.pad(q.astype(jnp.float32) / math.sqrt(E), pad)  # splash does not scale the logits
    ks, vs = (jnp.pad(x[:, :T].astype(jnp.float32), pad) for x in (k, v))
    # [B, T, G, R, E] -> per (b, kv head): q [R, T, E], k, v [T, E]
    qg = jnp.transpose(qs.reshape(B, Tp, G, R, E), (0, 2, 3, 1, 4))
    kg, vg = (jnp.transpose(x, (0, 2, 1, 3)) for x in (ks, vs))
    out = jax.vmap(jax.vmap(kernel))(qg, kg, vg)  # [B, G, R, Tp, E]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, Tp, H, E)[:, :T]
    return _last_rows(out.astype(jnp.float32), q, k, v, mask, qpos, real, n_real, spec).astype(q.dtype)


ATTEND = {"masked": attend_masked, "split": attend_split, "splash": attend_splash}


@dataclasses.dataclass(frozen=True)
class TriangleAttention:
    """TriangleMix bound to one prefill: called as ``attend(q, k, v, mask)`` in place of the fused attention on
    the layers from ``spec.starting_layer`` on. qpos: int[B, T] query positions; kpos: int[B, S] key positions;
    real: bool[B, T] real prompt slots."""

    spec: TriangleMix
    qpos: jax.Array
    kpos: jax.Array
    real: jax.Array

    @classmethod
    def bind(cls, spec: TriangleMix | None, positions, real, num_slots: int) -> TriangleAttention | None:
        """For a prompt at slots [0, T) of a cache with ``num_slots`` slots (T without a cache)."""
        if spec is None:
            return None
        B, T = positions.shape
        kpos = positions if num_slots == T else jnp.zeros((B, num_slots), positions.dtype).at[:, :T].set(positions)
        return cls(spec, positions, kpos, real)

    def __call__(self, q, k, v, mask):
        attend = ATTEND[self.spec.resolved_path()]
        return attend(q, k, v, mask, self.qpos, self.kpos, self.real, jnp.sum(self.real, 1), self.spec)
