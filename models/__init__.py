"""Flax NNX ports of LLaVA-style models (installed as ``jaxdebias.models``)."""
