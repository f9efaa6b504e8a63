"""Hugging Face checkpoint -> Orbax checkpoint on disk, streaming, without torch (``jaxdebias-convert``).

Every check (config, key layout, shapes, every parameter set exactly once) runs before anything is written;
tensors stream one at a time from memory-mapped safetensors files into a temporary sibling directory that is
renamed into place only when complete. ``jaxdebias.convert.load`` reads what this writes.
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from tqdm.auto import tqdm

from jaxdebias.convert.load import FORMAT_VERSION, MARKER, config_path, nest, prepare
from jaxdebias.convert.source import ConversionError, stream

# Files copied beside the weights so that the checkpoint directory is all a user needs at inference.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


def _chunks(items, budget: int):
    """Groups (path, array, nbytes) items into lists whose arrays total at most ``budget`` bytes (or one item)."""
    group, size = [], 0
    for item in items:
        if group and size + item[1].nbytes > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += item[1].nbytes
    if group:
        yield group


def convert(src, dst, *, dtype="bfloat16", layout="auto", vision=None, progress=True) -> dict:
    """Converts a HF checkpoint to an Orbax checkpoint at ``dst``, streaming, and returns a summary dict.

    Every check runs before anything is written. Tensors are read one at a time from memory-mapped files, cast,
    and appended to a partial Orbax checkpoint in a temporary sibling directory, flushed whenever the buffered
    tensors reach the size of the largest tensor; the directory is renamed to ``dst`` only when complete, so an
    interrupted run never leaves a checkpoint that looks valid.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; remove it or choose another destination.")
    np_dtype = np.dtype(jnp.dtype(dtype))
    cfg, cls, source, steps, layout, config = prepare(src, layout=layout, vision=vision, dtype=jnp.dtype(dtype))
    total = sum(source.nbytes(s.key) for s in steps)
    largest = max(int(np.prod(source.shape(s.key))) * np_dtype.itemsize for s in steps)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Weights barely compress; skipping compression doubles the write rate.
    no_compression = ocp.Context(array_options=ocp.options.ArrayOptions(
        saving=ocp.options.ArrayOptions.Saving(use_compression=False)))
    try:
        os.makedirs(tmp)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress)
        done = 0
        for group in _chunks(stream(source, steps, np_dtype), budget=largest):
            with no_compression:
                ocp.partial.save(os.path.join(tmp, "params"), nest({p: a for p, a, _ in group}))
            done += len(group)
            bar.update(sum(n for _, _, n in group))
            bar.set_postfix(tensors=f"{done}/{len(steps)}")
        bar.close()
        with no_compression:
            ocp.partial.finalize(os.path.join(tmp, "params"))
        base = os.path.dirname(config_path(src))
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(base, name)):
                shutil.copy2(os.path.join(base, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w") as f:  # normalised: what load() reads
            json.dump(config, f, indent=1)
        summary = {"format_version": FORMAT_VERSION, "model_type": config["model_type"],
                   "dtype": np_dtype.name, "layout": layout, "source": os.path.abspath(base),
                   "tensors": len(steps), "parameters": int(sum(np.prod(source.shape(s.key)) for s in steps)),
                   "source_bytes": int(total)}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(summary, f, indent=1)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
