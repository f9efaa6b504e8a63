"""The pruning methods: one module each, found through one registry.

Each module holds all of its method - the released schedule and what ``keep`` means, its released defaults
(positions, padding threshold and geometry, candidates), its selection or merge rule over a stage's tokens, its
encoder stage if any, how the release decodes, and the release it follows - and ends with a ``METHOD`` record
(``base.Method``). Adding a method is one new module and one line in ``REGISTRY``.
"""

from __future__ import annotations

from jaxdebias.methods import fastv, himap, illava, pdrop, pool, random, sparsevlm, tokencarve, visionzip
from jaxdebias.methods.base import Block, EncoderInputs, EncoderStage, Method, Stage, StageInputs

REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (
    fastv, pdrop, sparsevlm, himap, tokencarve, visionzip, illava, random, pool)}
METHODS = tuple(REGISTRY)
METHOD_ALIASES = {alias: m.name for m in REGISTRY.values() for alias in m.aliases}


def canonical_method(name: str) -> str:
    """The canonical name of a pruning method ("PyramidDrop" -> "pdrop"); ValueError for an unknown one."""
    key = str(name).lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ValueError(f"Unknown pruning method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(METHOD_ALIASES)}).")
    return key


def get(name: str) -> Method:
    """The registry's ``Method`` for a name or alias."""
    return REGISTRY[canonical_method(name)]


__all__ = ["Block", "EncoderInputs", "EncoderStage", "METHODS", "METHOD_ALIASES", "Method", "REGISTRY", "Stage",
           "StageInputs", "canonical_method", "get"]
