"""Pruning method names and their aliases: the one table every layer resolves a user's method name with."""

from __future__ import annotations

METHODS = ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve", "visionzip", "illava")
METHOD_ALIASES = {"pyramiddrop": "pdrop", "pyramid_drop": "pdrop", "sparse_vlm": "sparsevlm"}


# Which query rows vote - one vocabulary for ``jd.query_mask`` and the pruning stages (``jd.Stage.query``):
QUERY_KINDS = {
    "last": "the last real token of the prompt (FastV, TokenCarve, iLLaVA)",
    "instruction": "the last instruction token, a given position per sample (PyramidDrop)",
    "text": "every real token after the image (HiMAP's first stage)",
    "image": "the image tokens themselves (HiMAP's second stage)",
    "raters": "the text tokens after the image selected as raters (SparseVLM)",
}
QUERY_ALIASES = {"after_image": "text", "position": "instruction"}


def canonical_query(kind: str) -> str:
    """The canonical name of a query-row kind; ValueError for an unknown one."""
    key = QUERY_ALIASES.get(kind, kind)
    if key not in QUERY_KINDS:
        raise ValueError(f"Unknown query kind {kind!r}; known: {', '.join(QUERY_KINDS)} "
                         f"(aliases: {', '.join(QUERY_ALIASES)}).")
    return key


def canonical_method(name: str) -> str:
    """The canonical name of a pruning method ("PyramidDrop" -> "pdrop"); ValueError for an unknown one."""
    key = str(name).lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(METHOD_ALIASES)}).")
    return key
