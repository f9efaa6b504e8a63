"""Pruning method names and their aliases: the one table every layer resolves a user's method name with."""

from __future__ import annotations

METHODS = ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve", "visionzip", "illava")
METHOD_ALIASES = {"pyramiddrop": "pdrop", "pyramid_drop": "pdrop", "sparse_vlm": "sparsevlm"}


def canonical_method(name: str) -> str:
    """The canonical name of a pruning method ("PyramidDrop" -> "pdrop"); ValueError for an unknown one."""
    key = str(name).lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(METHOD_ALIASES)}).")
    return key
