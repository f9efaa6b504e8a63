"""Training checkpoints of the toy model: parameters, optimizer state and the run's settings under
``OUT/checkpoints/step_XXXXXXX`` (Orbax), written to a temporary directory and renamed, so a kill never leaves a
half checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

def _ckpt_dir(out) -> str:
    return os.path.join(out, "checkpoints")


def latest_checkpoint(out) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint in ``out``, or None."""
    root = _ckpt_dir(out)
    if not os.path.isdir(root):
        return None
    done = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    return (done[-1], os.path.join(root, f"step_{done[-1]:07d}")) if done else None


def _indexed(leaves) -> dict:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}


def save_checkpoint(out, step: int, params, opt_state, meta: dict, keep: int = 2) -> str:
    """Writes step ``step`` (parameters, optimizer state, step, the run's configuration) atomically and keeps
    the newest ``keep`` checkpoints."""
    root = _ckpt_dir(out)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = os.path.join(root, f".step_{step:07d}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tree = {"params": _indexed(jax.tree.leaves(params)), "opt": _indexed(jax.tree.leaves(opt_state))}
    ocp.save(os.path.join(tmp, "state"), tree)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "step": step}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    old = sorted(n for n in os.listdir(root) if n.startswith("step_"))[:-keep]
    for n in old:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return final


def restore_checkpoint(path, params, opt_state, sharding):
    """(params, opt_state) from a checkpoint, shaped and placed like the given fresh ones."""
    target = {name: {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding)
                     for i, x in enumerate(jax.tree.leaves(tree))}
              for name, tree in (("params", params), ("opt", opt_state))}
    got = ocp.load(os.path.join(path, "state"), target)

    def rebuild(tree, name):
        leaves = [got[name][f"{i:05d}"] for i in range(len(jax.tree.leaves(tree)))]
        return jax.tree.unflatten(jax.tree.structure(tree), leaves)

    return rebuild(params, "params"), rebuild(opt_state, "opt")
