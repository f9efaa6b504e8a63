"""The ``jaxdebias`` command line: one module per command (``run``, ``evaluate``, ``grid``, ``calibrate``,
``bias``, ``demo``), the inputs (images, prompts, tokenizers, models, specs), the batched runner and the figures.
Argument parsing lives in ``main`` only; every command is a function over library objects that a notebook can
call too."""
