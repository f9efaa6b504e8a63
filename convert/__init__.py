"""Checkpoints (installed as ``jaxdebias.convert``): Hugging Face -> Orbax conversion, streaming and torch-free
(``write.convert``), and loading onto a device or a mesh (``load.load``, ``load.from_hf``).

    from jaxdebias.convert import load, from_hf
    model = load("out/llava-7b")               # a converted checkpoint, straight to the device
    small = from_hf("path/to/tiny-llava")      # a Hugging Face checkpoint converted in memory
"""

from jaxdebias.convert.load import from_hf, load
from jaxdebias.convert.source import ConversionError
from jaxdebias.convert.write import convert

__all__ = ["ConversionError", "convert", "from_hf", "load"]
