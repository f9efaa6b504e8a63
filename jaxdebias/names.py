"""The vocabulary of voting query rows, shared by ``jd.query_mask`` and the pruning stages (method names and
their aliases are the registry's: ``jaxdebias.methods``)."""

from __future__ import annotations

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
