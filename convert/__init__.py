"""Hugging Face checkpoint -> Orbax conversion (installed as ``jaxdebias.convert``)."""
