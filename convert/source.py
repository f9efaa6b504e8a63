"""A generic, streaming, strict loader: source tensors -> our parameter paths, one tensor at a time.

Safetensors files are read through their header and a read-only ``np.memmap``: opening a 10 GB shard costs
nothing, and a tensor is only paged in when it is converted (bf16 via ml_dtypes, no torch). Every check names
what is wrong: the key, the layout assumed, the shapes, the file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np

from jaxdebias.convert import tables

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class TensorRef:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self) -> np.ndarray:
        if self.dtype not in _DTYPES:
            raise ConversionError(f"{self.file}: tensor dtype {self.dtype} is not supported.")
        mm = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.start, shape=(self.nbytes,))
        return mm.view(_DTYPES[self.dtype]).reshape(self.shape)


def read_safetensors_header(path: str) -> dict[str, TensorRef]:
    """Key -> TensorRef for one safetensors file, checking that every tensor lies inside the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not a valid safetensors file (truncated or corrupt: {e}). "
                              "Download it again.") from None
    base = 8 + n
    refs = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if base + end > size:
            raise ConversionError(f"{path} is truncated: tensor {key!r} ends at byte {base + end} but the file has "
                                  f"{size} bytes. Download it again.")
        refs[key] = TensorRef(path, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
    return refs


def _torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path} is a PyTorch .bin checkpoint, which needs torch to read. Install torch "
                              "(pip install torch) or convert the checkpoint to safetensors first.") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def list_weight_files(src: str | os.PathLike | list) -> list[str]:
    """The weight files of a checkpoint directory (index-driven when sharded) or an explicit list of files."""
    if isinstance(src, (list, tuple)):
        files = [os.fspath(f) for f in src]
        for f in files:
            if not os.path.isfile(f):
                raise ConversionError(f"Weight file {f} does not exist.")
        return files
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ConversionError(f"{src} is not a checkpoint directory (expected config.json and *.safetensors).")
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(src, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
            if missing:
                raise ConversionError(f"{index_name} in {src} lists shard(s) that are missing: {', '.join(missing)}. "
                                      "The download is incomplete; fetch the missing files.")
            return [os.path.join(src, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(src, single)):
            return [os.path.join(src, single)]
    found = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(src, f) for f in found]
    raise ConversionError(f"No weights in {src}: expected model.safetensors, a sharded model.safetensors.index.json "
                          "or pytorch_model.bin.")


class Source:
    """All tensors of one or more checkpoints, by key, loaded lazily."""

    def __init__(self, files: list[str]):
        self.refs: dict[str, TensorRef | np.ndarray] = {}
        for f in files:
            part = _torch_bin(f) if f.endswith(".bin") else read_safetensors_header(f)
            for k, v in part.items():
                if k in self.refs:
                    raise ConversionError(f"Tensor {k!r} appears in two files (second: {f}).")
                self.refs[k] = v

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self.refs[key].shape)

    def nbytes(self, key) -> int:
        r = self.refs[key]
        return r.nbytes if isinstance(r, TensorRef) else r.nbytes

    def load(self, key) -> np.ndarray:
        r = self.refs[key]
        return r.load() if isinstance(r, TensorRef) else r


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
         unused: Callable[[tuple], bool] = lambda p: False) -> list[Step]:
    """Matches every source tensor to exactly one target parameter, or raises ConversionError.

    Args:
      target: our parameter path -> expected shape (from ``nnx.eval_shape``).
      unused: paths the port deliberately drops (e.g. CLIP layers past the feature layer, a tied LM head).
    """
    if layout not in tables.LAYOUTS:
        raise ConversionError(f"Unknown layout {layout!r}; expected one of {', '.join(tables.LAYOUTS)}.")
    steps, unknown, seen = [], [], {}
    for key in sorted(source.refs):
        canon = _canonical(key, layout)
        rule = None if canon is None else next(
            ((p, t, tr) for p, t, tr in tables.CANONICAL if re.fullmatch(p, canon)), None)
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
    for s in steps:  # shapes, checked before any data is read
        found = source.shape(s.key)
        if s.transform is tables.transpose:
            found = found[::-1]
        elif s.transform is tables.conv_to_hwio:
            found = (found[2], found[3], found[1], found[0]) if len(found) == 4 else found
        if tuple(found) != tuple(target[s.path]):
            raise ConversionError(f"Tensor {s.key!r} has shape {source.shape(s.key)}; parameter "
                                  f"{'.'.join(map(str, s.path))} expects {tuple(target[s.path])} (after "
                                  f"{'transposing' if s.transform else 'no transform'}). The config does not match "
                                  "the weights.")
    return steps


@functools.lru_cache(maxsize=None)
def _jitted(transform, dtype):
    return jax.jit(lambda x: (x if transform is None else transform(x)).astype(dtype))


def stream(source: Source, steps: list[Step], dtype) -> Iterator[tuple[tuple, np.ndarray, int]]:
    """Yields (path, host array in our layout cast to dtype, source bytes) one tensor at a time.

    Transform and cast run as one jitted XLA program on the host CPU (a tiled transpose, ~3x numpy's), never on
    an accelerator, so converting on a TPU host does not touch device memory."""
    cpu = jax.devices("cpu")[0]
    for s in steps:
        with jax.default_device(cpu):
            x = np.asarray(_jitted(s.transform, np.dtype(dtype))(source.load(s.key)))
        yield s.path, x, source.nbytes(s.key)
