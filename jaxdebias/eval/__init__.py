"""Evaluation on LLaVA-1.5's benchmarks: the metrics as the official scripts compute them (``metrics``), the
benchmark files in the LLaVA layout and the files the official scorers take (``benchmarks``), and the one way
results are written (``files``). Nothing here runs a model: ``jaxdebias.cli`` does that and calls in here."""
