"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip@3151f6d:visionzip/clip_encoder.py L44-83, utils.py
L23-89; PyPI ``visionzip`` 0.1.3), an encoder-side method.

On the tower's feature layer: the CLS token first, then the dominant patches - those the CLS token attends to
most (heads summed) - in index order, then ``contextual`` tokens: of the remaining patches, targets are taken
evenly spaced and every other remaining patch joins the target with the most similar (head-averaged, normalised)
key; a contextual token is its target plus the mean of its joiners. The block goes through the projector and the
decoder sees it at contiguous positions; decoding continues from its caches.

``keep`` counts the block: 64 = CLS + 53 patches + 10 contextual (published: 54 + 10, 108 + 20, 162 + 30).
Options: ``contextual`` (default ``round(keep * 10 / 64)``), ``cls`` (True: CLS is the first dominant token, as
released). VisionZip has no debiased release: its padding choices (0.5, content cap) are ours.

Axes: B batch, N patches, C contextual tokens, D width, E key dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdebias.methods.base import Block, EncoderInputs, EncoderStage, Method, no_stages
from jaxdebias.prune import gather_tokens, kept_mask, select_topk


@dataclasses.dataclass(frozen=True)
class Zip(EncoderStage):
    """[CLS], ``dominant`` patches, ``contextual`` merged tokens: ``size`` = cls + dominant + contextual."""

    dominant: int = 0
    contextual: int = 0
    cls: bool = True

    @property
    def budget(self) -> int:
        return self.dominant

    def shaped(self, bucketed):
        dominant = bucketed(self.dominant, None)
        return dataclasses.replace(self, size=self.cls + dominant + self.contextual, dominant=dominant)

    def check(self, n: int, method: str) -> None:
        if self.size > n:
            raise ValueError(f"{method}: keep={self.size} exceeds the {n} visual tokens.")
        if self.dominant < 1:
            raise ValueError(f"{method}: keep={self.size} leaves no dominant patch beside the CLS token and "
                             f"{self.contextual} contextual tokens; raise keep.")

    def encode(self, inp: EncoderInputs) -> Block:
        feats, cls_feat, cls_attn, keys = inp.tower.with_cls_attention(inp.pixels)
        B, n = cls_attn.shape
        idx, slot, merge, cmask = visionzip_select(inp.debias(cls_attn), keys, inp.candidates, self.dominant,
                                                   self.contextual, limit=inp.limit)
        cls = int(self.cls)
        h = jnp.concatenate([cls_feat[:, None, :].astype(feats.dtype)[:, :cls], gather_tokens(feats, idx),
                             jnp.einsum("bcn,bnd->bcd", merge, feats.astype(jnp.float32)).astype(feats.dtype)], 1)
        return Block(h, jnp.concatenate([jnp.ones((B, cls), bool), slot, cmask], 1),
                     jnp.concatenate([jnp.full((B, cls), -1), idx, jnp.full((B, self.contextual), -1)], 1))


def contextual_split(keep: int, contextual: int | None) -> tuple[int, int]:
    """VisionZip's dominant / contextual split: published 54+10, 108+20, 162+30 for 64 / 128 / 192 tokens."""
    ctx = contextual if contextual is not None else max(1, round(keep * 10 / 64)) if keep >= 8 else 0
    if not 0 <= ctx < keep:
        raise ValueError(f"visionzip: contextual tokens ({ctx}) must be fewer than keep ({keep}).")
    return keep - ctx, ctx


def encoder(keep: int, n: int, options: dict) -> EncoderStage:
    dom, ctx = contextual_split(keep, options["contextual"])
    cls = bool(options["cls"])
    return Zip(keep, dom - cls, ctx, cls)


METHOD = Method("visionzip", "dvlab-research/VisionZip@3151f6d", no_stages, encoder=encoder,
                budget="tokens the decoder receives (CLS + dominant + contextual)", positions="reindex",
                pad_tau=0.5, pad_candidates=False, options=(("contextual", None), ("cls", True)))


def visionzip_select(cls_attn, keys, valid, dominant: int, contextual: int, limit=None):
    """VisionZip (Yang et al., CVPR 2025) on the tower's feature layer, checked against the released code
    (dvlab-research/VisionZip, PyPI ``visionzip`` 0.1.3, ``clip_encoder.py``); the CLS feature that the release
    puts first among the dominant tokens is added by the caller (``Zip.cls``).

    Dominant tokens: the ``dominant`` patches the CLS token attends to most (heads summed). Contextual tokens:
    among the remaining patches, ``contextual`` targets are taken evenly spaced (every ``n_rest // contextual``-th);
    every other remaining patch joins the target whose key (heads averaged, L2-normalised) is most similar; a
    contextual token is its target's feature plus the mean of the features that joined it.

    Args:
      cls_attn: float[B, N] CLS-to-patch attention; keys: float[B, N, Dk] of the same layer; valid: bool[B, N]
        candidate patches (e.g. content); dominant, contextual: static counts; limit: optional traced number of
        dominant tokens actually kept (<= dominant; the surplus slots are masked and their patches can merge).

    Returns:
      (dominant_idx int32[B, dominant] ascending, dominant_mask bool[B, dominant],
       merge float32[B, C, N]: contextual token c = sum_n merge[b, c, n] * feature[b, n],
       contextual_mask bool[B, C]).
    """
    idx, slot = select_topk(cls_attn, dominant, valid=valid, limit=limit)
    B, N = cls_attn.shape
    rest = valid & ~kept_mask(idx, slot, N)
    if contextual == 0:
        return idx, slot, jnp.zeros((B, 0, N), jnp.float32), jnp.zeros((B, 0), bool)
    order = jnp.cumsum(rest, axis=1) - 1  # rank of each remaining patch, in raster order
    step = jnp.maximum(jnp.sum(rest, axis=1, keepdims=True) // max(contextual, 1), 1)
    is_target = rest & (order % step == 0) & (order // step < contextual)
    target = jax.nn.one_hot(jnp.where(is_target, order // step, contextual), contextual + 1)[..., :contextual]
    k = keys.astype(jnp.float32)
    k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
    target_keys = jnp.einsum("bnc,bnd->bcd", target, k)  # [B, C, Dk]
    sim = jnp.einsum("bnd,bcd->bnc", k, target_keys)
    sim = jnp.where(jnp.any(target > 0, axis=1, keepdims=True), sim, -jnp.inf)  # groups without a target
    joins = (rest & ~is_target)[..., None] * jax.nn.one_hot(jnp.argmax(sim, -1), contextual)  # [B, N, C]
    mean = joins / jnp.maximum(jnp.sum(joins, axis=1, keepdims=True), 1.0)
    merge = jnp.swapaxes(target + mean, 1, 2)
    return idx, slot, merge, jnp.any(target > 0, axis=1)
