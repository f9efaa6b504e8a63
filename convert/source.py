"""A generic, streaming, strict loader: source tensors -> our parameter paths, one tensor at a time.

The files are read through ``files.Source`` (headers checked, nothing paged in before it is converted; bf16 via
ml_dtypes, no torch). ``plan`` matches every source key to exactly one parameter (every converted weight must be
floating point) and ``stream`` converts them one by one. Every check names what is wrong: the key, the layout
assumed, the shapes, the file.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdebias.convert import tables
from jaxdebias.convert.files import FLOAT_DTYPES, ConversionError, Source, TensorRef

def detect_layout(keys) -> str:
    """Which of ``tables.LAYOUTS`` a set of source keys follows."""
    keys = list(keys)

    def has(pattern):
        return any(re.match(pattern, k) for k in keys)

    if has(r"(model\.)?video_tower\."):
        return "video_llava"
    if has(r"vision_tower\.vision_model\.") or (has(r"language_model\.model\.") and not has(r"vision_tower\.")):
        return "hub"
    if has(r"(model\.)?(vision_tower|multi_modal_projector|language_model)\."):
        return "transformers5"
    if has(r"model\.mm_projector\."):
        return "original"
    if has(r"model\.layers\."):
        return "causal_lm"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"Cannot tell the checkpoint layout from its keys (first: {sample}). Pass --layout "
                          f"{'|'.join(tables.LAYOUTS)}.")


@dataclass(frozen=True)
class Step:
    key: str  # source key
    path: tuple  # our parameter path
    transform: Callable | None


def _canonical(key: str, layout: str) -> str | None:
    for pat, rep in tables.LAYOUTS[layout]:
        if re.match(pat, key):
            return re.sub(pat, rep, key, count=1)
    return None


def _to_path(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _expected(path: tuple, steps: list, source: Source) -> str:
    """A missing parameter, the source tensor expected for it and the file(s) holding its siblings: guessed from a
    converted parameter that differs only in its layer indices (e.g. layer 2's q_proj for layer 3's)."""
    name = ".".join(map(str, path))
    for step in steps:
        other = step.path
        if len(other) != len(path) or any(a != b and not (isinstance(a, int) and isinstance(b, int))
                                           for a, b in zip(other, path)):
            continue
        key = step.key
        for a, b in zip(other, path):
            if a != b:
                key = key.replace(f".{a}.", f".{b}.", 1)
        prefix = key.rsplit(".", 2)[0] + "."
        files = sorted({os.path.basename(r.file) for k, r in source.refs.items()
                        if k.startswith(prefix) and isinstance(r, TensorRef)})
        where = f" (expected beside its siblings in {', '.join(files)})" if files else ""
        return f"{name} <- tensor {key!r}{where}"
    return name


def plan(source: Source, layout: str, target: dict[tuple, tuple], *, text_prefix: str = "language_model",
         unused: Callable[[tuple], bool] = lambda p: False, rules=None) -> list[Step]:
    """Matches every source tensor to exactly one target parameter, or raises ConversionError.

    Args:
      target: our parameter path -> expected shape (from ``nnx.eval_shape``).
      unused: paths the port deliberately drops (e.g. CLIP layers past the feature layer, a tied LM head).
      rules: the canonical table (default ``tables.CANONICAL``; ``tables.SIGLIP_CANONICAL`` for a SigLIP tower).
    """
    rules = tables.CANONICAL if rules is None else rules
    if layout not in tables.LAYOUTS:
        raise ConversionError(f"Unknown layout {layout!r}; expected one of {', '.join(tables.LAYOUTS)}.")
    steps, unknown, seen = [], [], {}
    for key in sorted(source.refs):
        canon = _canonical(key, layout)
        rule = None if canon is None else next(
            ((p, t, tr) for p, t, tr in rules if re.fullmatch(p, canon)), None)
        if rule is None:
            unknown.append(key)
            continue
        pat, template, transform = rule
        if template is None:
            continue
        path = _to_path(re.sub(pat, template, canon).replace("{text}", text_prefix))
        if path not in target:
            if unused(path):
                continue
            unknown.append(key)
            continue
        if path in seen:
            raise ConversionError(f"Tensors {seen[path]!r} and {key!r} both map to parameter "
                                  f"{'.'.join(map(str, path))} (layout {layout!r}).")
        seen[path] = key
        steps.append(Step(key, path, transform))
    if unknown:
        raise ConversionError(f"{len(unknown)} tensor(s) not known to the {layout!r} layout: "
                              f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}. "
                              "Is this the right checkpoint, and the right --layout?")
    missing = [p for p in target if p not in seen]
    if missing:
        names = "; ".join(_expected(p, steps, source) for p in missing[:12])
        raise ConversionError(f"{len(missing)} parameter(s) have no tensor in the checkpoint (layout {layout!r}): "
                              f"{names}{' ...' if len(missing) > 12 else ''}. The checkpoint is incomplete (a "
                              "shard not fully downloaded?) or its config does not match its weights.")
    for s in steps:  # dtypes and shapes, checked before any data is read
        name, want = ".".join(map(str, s.path)), tuple(target[s.path])
        where = f" in {source.refs[s.key].file}" if isinstance(source.refs[s.key], TensorRef) else ""
        if source.dtype(s.key) not in FLOAT_DTYPES:
            raise ConversionError(f"Tensor {s.key!r}{where} has dtype {source.dtype(s.key)}; parameter {name} takes "
                                  f"floating-point weights ({', '.join(FLOAT_DTYPES)}). The file's header is corrupt "
                                  "or the checkpoint is quantised; use an unquantised safetensors checkpoint.")
        shape = tuple(source.shape(s.key))
        found = _after(s.transform, shape)
        if found != want:
            how = tables.DESCRIBE.get(s.transform, getattr(s.transform, "__name__", "its transform"))
            gives = "cannot apply to it" if found is None else f"turns {shape} into {found}"
            hint = ("The checkpoint stores this tensor already in our layout, or the config does not match the "
                    "weights." if shape == want else "The config does not match the weights.")
            raise ConversionError(f"Tensor {s.key!r} has shape {shape}; parameter {name} expects {want}"
                                  + ("" if s.transform is None else f" after {how}, which {gives}")
                                  + (f" (the tensor is{where})" if where else "") + f". {hint}")
    return steps


def _after(transform, shape: tuple) -> tuple | None:
    """The shape ``transform`` gives a tensor of ``shape`` (None if it cannot apply), computed on a zero-stride view:
    no data is read or allocated."""
    if transform is None:
        return shape
    try:
        return tuple(transform(np.broadcast_to(np.zeros((), np.uint8), shape)).shape)
    except ValueError:
        return None


class Converted(NamedTuple):
    """One converted tensor: its parameter path, the host array (our layout, target dtype), the bytes it took in the
    source, and how many finite source values became +-inf in the target dtype (float16 overflow)."""
    path: tuple
    array: np.ndarray
    source_bytes: int
    overflow: int


@functools.lru_cache(maxsize=None)
def _jitted(transform, dtype):
    def run(x):
        y = x.astype(dtype)
        return (y if transform is None else transform(y)), jnp.sum(jnp.isfinite(x) & ~jnp.isfinite(y))
    return jax.jit(run)


def stream(source: Source, steps: list[Step], dtype) -> Iterator[Converted]:
    """Yields each step's tensor converted (``Converted``), one tensor at a time.

    Transform, cast and overflow count run as one jitted XLA program on the host CPU (a tiled transpose, ~3x
    numpy's), never on an accelerator, so converting on a TPU host does not touch device memory."""
    cpu = jax.devices("cpu")[0]
    for s in steps:
        with jax.default_device(cpu):
            x, overflow = _jitted(s.transform, np.dtype(dtype))(source.load(s.key))
            x = np.asarray(x)
        yield Converted(s.path, x, source.nbytes(s.key), int(overflow))


def warn_overflow(counts: dict[str, int], dtype) -> None:
    """Warns (RuntimeWarning) when a conversion turned finite values into inf: how many, and in which tensors."""
    counts = {k: n for k, n in counts.items() if n}
    if not counts:
        return
    top = sorted(counts, key=counts.get, reverse=True)[:5]
    warnings.warn(f"{sum(counts.values()):,} value(s) in {len(counts)} tensor(s) exceed the {np.dtype(dtype).name} "
                  f"range (largest finite {float(jnp.finfo(dtype).max):.6g}) and became inf: "
                  f"{', '.join(f'{k} ({counts[k]:,})' for k in top)}{' ...' if len(counts) > 5 else ''}. "
                  "Convert with --dtype bfloat16 (float32's range) or float32 instead.", RuntimeWarning, stacklevel=3)
