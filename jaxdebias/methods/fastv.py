"""FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV@d165972:src/transformers/src/transformers/models/llama/
modeling_llama.py L717-822).

At the start of decoder layer K (2), the last prompt token's attention in layer K - 1 (heads averaged) keeps the
``keep`` image tokens it attends to most, at their original positions. The debias paper's FastV caps the budget at
the content tokens (padding is no candidate); its "before" setting (padding only) builds the mask as LLaVA-NeXT
unpads a grid (``before_geometry``, intcomp/attention-bias@e75ebe7:patches/FastV.patch ~L605). Its release decodes
in *mask mode*: nothing leaves the sequence, layers >= K mask the pruned image keys, and every generated token
re-selects from its own layer-(K - 1) row (``decode``); the fast decode here removes the tokens at prefill and
keeps that selection.

``keep`` counts the image tokens layers >= K see.
"""

from __future__ import annotations

from jaxdebias.methods.base import Method, Stage


def stages(keep: int, layer: int | None, n: int, num_layers: int, options: dict) -> tuple[Stage, ...]:
    return (Stage(2 if layer is None else layer, keep, "last", "tap"),)


METHOD = Method("fastv", "pkunlp-icler/FastV@d165972", stages, budget="image tokens kept from layer K (2) on",
                positions="original", pad_tau=0.5, pad_candidates=False, before_geometry="unpad",
                decode=("mask", "every_token"))
