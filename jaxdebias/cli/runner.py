"""The batched request runner: questions in, ``generate`` results out, one compiled program per shape bucket.

Axes: B batch (the runner's batch size, a multiple of the devices), N visual tokens.
"""

from __future__ import annotations

import jax

import jaxdebias as jd
from jaxdebias.cli.inputs import LoadedModel, Request
from jaxdebias.models.generate import generate
from jaxdebias.models.interventions import VarSpec
from jaxdebias.models.llava import shard_model


class Runner:
    """Pruned generation over benchmark rows. Batches are split over ``devices`` (default: this process's
    devices; the batch size is rounded up to a multiple of their number) on a ("data", "model") mesh; the last
    batch is padded by repeating its last request, so every batch has one shape."""

    def __init__(self, loaded: LoadedModel, spec: jd.PruneSpec | None, batch_size: int, *,
                 var: VarSpec | None = None, devices=None):
        self.loaded, self.spec, self.var, self.mesh = loaded, spec, var, None
        devices = jax.local_devices() if devices is None else list(devices)
        if len(devices) > 1:
            self.mesh = jax.make_mesh((len(devices), 1), ("data", "model"), devices=devices,
                                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
            shard_model(loaded.model, self.mesh)
            batch_size = -(-batch_size // len(devices)) * len(devices)
        self.batch_size = batch_size

    def requests(self, rows, image_dir) -> list[Request]:
        return [self.loaded.request_row(r, image_dir) for r in rows]

    def __call__(self, rows, image_dir, max_new_tokens: int):
        """Yields (row, its Request, the Result of its batch, its index in the batch), in row order."""
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            requests = self.requests(chunk, image_dir)
            requests += [requests[-1]] * (self.batch_size - len(requests))
            result = generate(self.loaded.model, self.loaded.batch(requests), prune=self.spec, var=self.var,
                              max_new_tokens=max_new_tokens, mesh=self.mesh)
            for i, row in enumerate(chunk):
                yield row, requests[i], result, i
