"""Hugging Face checkpoint -> Orbax checkpoint on disk, streaming, without torch (``jaxdebias-convert``).

Every check (config, safetensors headers, key layout, dtypes, shapes, every parameter set exactly once) runs before
anything is written; tensors stream one at a time from memory-mapped safetensors files into a temporary sibling
directory (``.<dst>.partial-<pid>``) that is renamed into place only when complete. The marker records a digest of
every parameter, which ``jaxdebias.convert.load`` checks as it reads. A conversion that dies (kill -9, power loss)
leaves its temporary behind; the next conversion to the same destination removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from tqdm.auto import tqdm

from jaxdebias._checks import process_alive
from jaxdebias.convert.digest import CHECKSUM, checksum
from jaxdebias.convert.load import FORMAT_VERSION, MARKER, config_path, dotted, nest, prepare
from jaxdebias.convert.source import ConversionError, stream, warn_overflow

# Files copied beside the weights so that the checkpoint directory is all a user needs at inference.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


def _chunks(items, budget: int):
    """Groups ``source.Converted`` items into lists whose arrays total at most ``budget`` bytes (or one item)."""
    group, size = [], 0
    for item in items:
        if group and size + item.array.nbytes > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += item.array.nbytes
    if group:
        yield group


def remove_stale_partials(dst: str) -> list[str]:
    """Removes the ``.<dst>.partial-<pid>`` folders of conversions to ``dst`` whose process no longer runs (killed
    with SIGKILL, or the machine stopped); returns their paths. A folder whose pid was reused by an unrelated
    process is kept (it is removed on a later run)."""
    parent, base = os.path.split(dst)
    if os.name == "nt" or not os.path.isdir(parent):  # os.kill(pid, 0) terminates the process on Windows
        return []
    pattern = re.compile(re.escape(f".{base}.partial-") + r"(\d+)")
    removed = []
    for name in os.listdir(parent):
        m = pattern.fullmatch(name)
        if m and int(m[1]) != os.getpid() and not process_alive(int(m[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


@contextlib.contextmanager
def _deferred_interrupts():
    """While writing, SIGINT (Ctrl-C) and SIGTERM are recorded instead of raised: ``stop()`` raises
    KeyboardInterrupt at the next tensor boundary, when no Orbax write is in flight, so the caller's cleanup removes
    a folder nothing writes into any more. Outside the main thread (where handlers cannot be set) it does nothing."""
    got = []

    def stop():
        if got:
            raise KeyboardInterrupt(f"signal {got[0]}")

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def convert(src, dst, *, dtype="bfloat16", layout="auto", vision=None, progress=True) -> dict:
    """Converts a HF checkpoint to an Orbax checkpoint at ``dst``, streaming, and returns a summary dict.

    Every check runs before anything is written. Tensors are read one at a time from memory-mapped files, cast,
    digested (``digest.checksum``, stored in the marker for ``load`` to check) and appended to a partial Orbax
    checkpoint in a temporary sibling directory, flushed whenever the buffered tensors reach the size of the largest
    tensor; the directory is renamed to ``dst`` only when complete, so an interrupted run never leaves a checkpoint
    that looks valid. Ctrl-C (SIGINT) or SIGTERM stops at the next tensor boundary and removes the temporary;
    temporaries of dead earlier runs are removed first. Values that overflow the target dtype (float16's +-65504)
    become inf and are reported in a RuntimeWarning with their count.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst):
        raise ConversionError(f"{dst} already exists; remove it or choose another destination.")
    np_dtype = np.dtype(jnp.dtype(dtype))
    cfg, cls, source, steps, layout, config = prepare(src, layout=layout, vision=vision, dtype=jnp.dtype(dtype))
    total = sum(source.nbytes(s.key) for s in steps)
    largest = max(int(np.prod(source.shape(s.key))) * np_dtype.itemsize for s in steps)
    parent = os.path.dirname(dst)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConversionError(f"Cannot write {dst}: its parent {parent} is a file, not a directory.")
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(dst)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    no_compression = ocp.Context()  # weights barely compress; skipping compression doubles the write rate
    no_compression.array.saving.use_compression = False
    digests, overflow = {}, {}
    try:
        with _deferred_interrupts() as stop:
            os.makedirs(tmp)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress)
            for group in _chunks(stream(source, steps, np_dtype), budget=largest):
                stop()
                for t in group:
                    digests[dotted(t.path)] = checksum(t.array)
                    overflow[dotted(t.path)] = t.overflow
                with no_compression:
                    ocp.partial.save(os.path.join(tmp, "params"), nest({t.path: t.array for t in group}))
                bar.update(sum(t.source_bytes for t in group))
                bar.set_postfix(tensors=f"{len(digests)}/{len(steps)}")
            bar.close()
            stop()
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
                       "source_bytes": int(total), "overflow": {k: n for k, n in overflow.items() if n}}
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({**summary, "checksum": CHECKSUM, "digests": digests}, f, indent=1)
            stop()
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warn_overflow(overflow, np_dtype)
    return summary
