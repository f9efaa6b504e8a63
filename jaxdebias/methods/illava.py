"""iLLaVA (hulianyuyy/iLLaVA@4068149, arXiv 2412.06263): token merging in the vision encoder and in the LLM.

Encoder stage (``EncoderMerge``; ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``
L390-420): in each of the encoder layers ``vit_layers``, between the attention residual and the MLP, the r + 1
least-attended tokens merge into one (``illava_encoder_merge``); the decoder sees the shorter image at contiguous
positions. LLM stage (``MergeStage``; ``forward_illava`` L1019-1062) at layer k (8): the last token's attention in
layer k - 1 orders the visual tokens, the r + 1 least attended merge into the (N - r)-th and ``keep`` = N - r
remain at their positions in the merged sequence; decoding continues from the pruned caches, after the prompt's
last position (the merged prompt is shorter than the placeholders it came from).

OneVision's release (the defaults on ``jaxdebias.models.llava_onevision``, its option families
"llava_onevision" and "llava_onevision_video"): images - SigLIP layers 5-8 merge 92 each in every view (729 ->
361, a 19 x 19 grid the anyres packing then lays out), the LLM stage at layer 8 keeps 70% of each image's span
(newlines included, as the release counts it); videos - layers 3-6, the LLM stage at layer 2. LLaVA-1.5 (ours, no
release): CLIP layers 5-8 merge 72 each (576 -> 288, CLS never merged), and ``keep`` sets how many of the 288 the
LLM stage keeps - or, with the option ``llm_r`` (the release's ``illava_llm_r``), the release's own count per
sample: ``illava_llm_count`` of its real span tokens merged away (0.70 on 288: 86 merged, 202 kept), ``keep`` then
unused.

Axes: B batch, P tower tokens, N tokens of the span, D width, H heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxdebias import _checks
from jaxdebias.methods.base import Block, EncoderInputs, EncoderStage, Method, Stage, StageInputs

# hulianyuyy/iLLaVA@4068149; 0-based layers. Published OneVision image defaults (README):
ONEVISION_VIT_LAYERS, ONEVISION_VIT_R = (5, 6, 7, 8), 92  # illava_vit_k/_r: SigLIP 729 -> 361
ONEVISION_LLM_LAYER, ONEVISION_LLM_R = 8, 0.70  # illava_llm_k/_r
ONEVISION_VIDEO_VIT_LAYERS, ONEVISION_VIDEO_LLM_LAYER = (3, 4, 5, 6), 2  # video benchmarks (README), r 92, 0.70
# OURS for LLaVA-1.5 (no release): the same layers of CLIP-L/336's 23 that run, r scaled to 576 patches (72/576
# vs 92/729 per layer): 576 -> 288 patches, CLS never merged; the LLM stage layer as OneVision's.
LLAVA15_VIT_LAYERS, LLAVA15_VIT_R = (5, 6, 7, 8), 72
LLM_LAYER = 8


@dataclasses.dataclass(frozen=True)
class EncoderMerge(EncoderStage):
    """r tokens merged away in each encoder layer of ``layers`` (CLS protected on CLIP)."""

    layers: tuple = LLAVA15_VIT_LAYERS
    r: int = LLAVA15_VIT_R

    def check(self, n: int, method: str) -> None:
        if self.r < 0 or n - len(self.layers) * self.r < 1:
            raise ValueError(f"{method}: the encoder stage merges {len(self.layers) * self.r} of {n} tokens; "
                             "lower the option vit_r.")

    def encode(self, inp: EncoderInputs) -> Block:
        merge = functools.partial(illava_encoder_merge, r=self.r, protected=inp.tower.cls_tokens)
        feats, raster = inp.tower.with_merges(inp.pixels, self.layers, merge)
        return Block(feats, jnp.ones(raster.shape, bool), raster)

    def view_tokens(self, p: int) -> int:
        """Each view keeps p - len(layers) r tokens (SigLIP on OneVision: 729 -> 361)."""
        return p - len(self.layers) * self.r


@dataclasses.dataclass(frozen=True)
class MergeStage(Stage):
    """The tokens beyond ``keep`` and the last kept one merge into it (weights 1 .. r + 1). With ``llm_r`` (the
    release's rule) each sample keeps its own count of its real span tokens (``illava_llm_count``), at most
    ``keep``."""

    llm_r: float | None = None
    bucketed = False
    maskable = False

    def select(self, inp: StageInputs) -> Block:
        if self.llm_r is not None:
            idx, valid, merged = illava_llm_merge_counted(inp.h, inp.scores, inp.valid, self.llm_r, self.slots)
            return Block(merged, valid, idx)
        idx, merged = illava_llm_merge(inp.h, inp.scores, inp.h.shape[1] - self.slots, valid=inp.valid)
        return Block(merged, jnp.take_along_axis(inp.valid, idx, axis=1), idx)


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    layer = options["llm_layer"] if layer is None else layer
    if options.get("llm_r") is None:
        return (MergeStage(layer, keep, "last", "tap"),)
    enc = encoder(keep, n, options)  # the release's rule: a kept fraction (or a merged count) of each span
    m = n if enc is None else enc.size
    most = max(k - illava_llm_count(k, options["llm_r"]) for k in range(1, m + 1))
    return (MergeStage(layer, most, "last", "tap", llm_r=float(options["llm_r"])),)


def encoder(keep: int, n: int, options: dict) -> EncoderStage | None:
    layers, r = tuple(options["vit_layers"]), int(options["vit_r"])
    return EncoderMerge(n - len(layers) * r, layers, r) if layers and r else None


METHOD = Method("illava", "hulianyuyy/iLLaVA@4068149", stages, encoder=encoder,
                budget="tokens the LLM stage keeps of what the encoder stage leaves (288 on LLaVA-1.5); with option "
                       "llm_r, the release's fraction instead",
                positions="original", pad_tau=0.5,
                options=(("vit_layers", LLAVA15_VIT_LAYERS), ("vit_r", LLAVA15_VIT_R), ("llm_r", None),
                         ("llm_layer", LLM_LAYER)),
                family_options=(
                    ("llava_onevision", (("vit_layers", ONEVISION_VIT_LAYERS), ("vit_r", ONEVISION_VIT_R),
                                         ("llm_r", ONEVISION_LLM_R), ("llm_layer", ONEVISION_LLM_LAYER))),
                    ("llava_onevision_video", (("vit_layers", ONEVISION_VIDEO_VIT_LAYERS), ("vit_r", ONEVISION_VIT_R),
                                               ("llm_r", ONEVISION_LLM_R),
                                               ("llm_layer", ONEVISION_VIDEO_LLM_LAYER)))))


def _weighted_rows(x, rows, w):
    """x float[B, P, D], rows int[B, Q], w float[B, Q] -> float32[B, D] sum w x[rows] / sum w (or x[rows[:, 0]])."""
    vals = jnp.take_along_axis(x.astype(jnp.float32), rows[..., None], axis=1)  # [B, Q, D]
    total = jnp.sum(w, axis=1, keepdims=True)
    merged = jnp.einsum("bq,bqd->bd", w, vals) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, merged, vals[:, 0])


def illava_encoder_merge(x, attn, r: int, protected: int = 0):
    """iLLaVA's encoder stage (src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py L390-420),
    between a layer's attention residual and its MLP. a_p = mean over query rows of mean_h attn[..., p] (the
    attention token p receives); idx = the r + 1 least-attended tokens, ascending (the release's
    ``topk(r + 1, largest=False)`` leaves ties open; ours: lower index first); x[idx[-1]] <- sum_j w_j x[idx[j]] /
    sum_j w_j with w = (r + 1, r, ..., 1), the least attended weighing most (fp32 as released, cast back to
    x.dtype as it casts to fp16); idx[:-1] are dropped, the others keep their order. The release runs SigLIP
    without CLS (``protected=0``); ``protected=1`` never merges or drops CLIP's CLS at index 0 (ours, LLaVA-1.5).

    x: float[B, P, D]; attn: float[B, H, P, P] probabilities (rows: queries); r: static, r + 1 <= P - protected;
    protected: static count of leading tokens that are never candidates.
    Returns (x' float[B, P - r, D] in x.dtype, kept int32[B, P - r] ascending indices into P)."""
    x, attn = jnp.asarray(x), jnp.asarray(attn)
    B, P, _ = x.shape
    if attn.ndim != 4 or attn.shape[-2:] != (P, P) or attn.shape[0] != B:
        raise ValueError(f"attn must be float[B, H, P, P] with (B, P) = {(B, P)}, got shape {attn.shape}.")
    if not 0 <= r <= P - protected - 1:
        raise ValueError(f"iLLaVA merges r + 1 of {P - protected} tokens: r={r} not in [0, {P - protected - 1}].")
    a = jnp.mean(jnp.mean(attn.astype(jnp.float32), axis=1), axis=1)  # [B, P] received attention
    a = jnp.where(jnp.arange(P) < protected, jnp.inf, a)
    idx = jax.lax.top_k(-a, r + 1)[1]  # [B, r + 1] ascending a, ties lower index first
    merged = _weighted_rows(x, idx, jnp.broadcast_to(jnp.arange(r + 1, 0, -1, dtype=jnp.float32), idx.shape))
    rows = jnp.arange(B)[:, None]
    x = x.at[rows[:, 0], idx[:, -1]].set(merged.astype(x.dtype))
    dropped = jnp.zeros((B, P), bool).at[rows, idx[:, :-1]].set(True)
    kept = jnp.argsort(dropped, axis=1, stable=True)[:, :P - r].astype(jnp.int32)  # the others, ascending
    return jnp.take_along_axis(x, kept[..., None], axis=1), kept


def illava_llm_count(n: int, llm_r: float) -> int:
    """r, the tokens iLLaVA's LLM stage merges away (``forward_illava`` L1035-1038): round(n (1 - llm_r)) for
    0 < llm_r < 1, else round(llm_r) (Python's round: halves to even; the release leaves llm_r = 1 undefined)."""
    r = round(n * (1 - llm_r)) if 0 < llm_r < 1 else round(llm_r) if llm_r >= 1 else -1
    if not 0 <= r <= n - 1:
        raise ValueError(f"llm_r={llm_r!r}: a kept fraction in (0, 1) or a merged count in [1, n - 1], n={n}.")
    return int(r)


def illava_llm_merge(x, scores, r: int, valid=None):
    """iLLaVA's LLM stage (src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py
    ``forward_illava`` L1019-1062), at decoder layer k on its input rows of the N visual tokens.

    scores = mean_h A^{k-1}[last, o:o+N]; idx = all N tokens by descending score (ties: lower index first, as
    ``lax.top_k``); the r + 1 lowest idx[N-r-1:] are merged into idx[N-r-1] with weights (1, 2, ..., r + 1) in
    that order (the least attended weighs most; fp32 here, float64 in the release; cast back to x.dtype as it
    casts to fp16); sort(idx[:N-r]) are kept. ``valid`` (ours, for padding): invalid tokens rank below every
    valid one and merge with weight 0 (a target whose whole group is invalid keeps its own row).

    x: float[B, N, D]; scores: float[B, N]; r: static count in [0, N - 1] (``illava_llm_count``);
    valid: optional bool[B, N]. Returns (kept int32[B, N - r] ascending, features float[B, N - r, D] in x.dtype,
    slot-aligned with kept; the merged slot is kept[b, j] == idx[b, N-r-1])."""
    x, scores = jnp.asarray(x), jnp.asarray(scores)
    B, N, _ = x.shape
    _checks.check_same_shape("scores", scores, "x[..., 0]", x[..., 0])
    if not 0 <= r <= N - 1:
        raise ValueError(f"iLLaVA merges r + 1 of N={N} tokens: r={r} not in [0, {N - 1}].")
    s = scores.astype(jnp.float32)
    idx = jax.lax.top_k(s if valid is None else jnp.where(valid, s, -jnp.inf), N)[1]  # [B, N] descending
    group = idx[:, N - r - 1:]  # [B, r + 1]: the merge target first
    w = jnp.broadcast_to(jnp.arange(1, r + 2, dtype=jnp.float32), group.shape)
    w = w if valid is None else w * jnp.take_along_axis(valid, group, axis=1)
    x = x.at[jnp.arange(B), group[:, 0]].set(_weighted_rows(x, group, w).astype(x.dtype))
    kept = jnp.sort(idx[:, :N - r], axis=1).astype(jnp.int32)
    return kept, jnp.take_along_axis(x, kept[..., None], axis=1)




def illava_llm_merge_counted(x, scores, valid, llm_r: float, slots: int):
    """``illava_llm_merge`` with the release's count per sample: each sample b merges r_b = ``illava_llm_count``
    (n_b, llm_r) of its n_b valid tokens (by descending score: the r_b + 1 lowest merge into the (n_b - r_b)-th
    with weights 1 .. r_b + 1) and keeps k_b = n_b - r_b; invalid tokens rank last and never count.

    x: float[B, N, D]; scores: float[B, N]; valid: bool[B, N]; llm_r: the release's illava_llm_r; slots: static
    >= every k_b. Returns (kept int32[B, slots] ascending (0 where unused), used bool[B, slots], features
    float[B, slots, D] in x.dtype)."""
    x, scores, valid = jnp.asarray(x), jnp.asarray(scores), jnp.asarray(valid, bool)
    B, N, _ = x.shape
    table = jnp.asarray([n - illava_llm_count(n, llm_r) if n else 0 for n in range(N + 1)], jnp.int32)  # k(n)
    n_b = jnp.sum(valid, axis=1)
    k_b = table[n_b]  # [B]
    idx = jax.lax.top_k(jnp.where(valid, scores.astype(jnp.float32), -jnp.inf), N)[1]  # [B, N] descending
    rank = jnp.arange(N)[None, :]
    w = jnp.where((rank >= k_b[:, None] - 1) & (rank < n_b[:, None]), rank - k_b[:, None] + 2, 0).astype(
        jnp.float32)  # 1 .. r_b + 1 over the group, the target first
    target = jnp.take_along_axis(idx, jnp.maximum(k_b - 1, 0)[:, None], axis=1)[:, 0]
    merged = _weighted_rows(x, idx, w)
    rows = jnp.arange(B)
    x = x.at[rows, target].set(jnp.where((k_b > 0)[:, None], merged.astype(x.dtype), x[rows, target]))
    kept = jnp.sort(jnp.where(rank < k_b[:, None], idx, N), axis=1)[:, :slots]
    used = kept < N
    kept = jnp.where(used, kept, 0).astype(jnp.int32)
    return kept, used, jnp.take_along_axis(x, kept[..., None], axis=1)
