"""Checkpoint files on disk, read without trusting them: safetensors headers checked entry by entry before a
byte of data is read (``check_header``: dtype, shape, offsets inside the file and consistent with both, no
overlaps), index files checked, pickles (``.bin``) refused and never unpickled, and a ``Source`` that pages a
tensor in (a read-only ``np.memmap``) only when it is converted.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a converted weight may be stored as
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class TensorRef:
    file: str
    dtype: str  # a safetensors dtype name (checked by check_header)
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def load(self) -> np.ndarray:
        mm = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.start, shape=(self.nbytes,))
        return mm.view(_DTYPES[self.dtype]).reshape(self.shape)


def require_dir(path: str, kind: str, holds: str) -> None:
    """Raises ConversionError unless ``path`` is a directory, saying whether nothing is there or a file is."""
    if os.path.isdir(path):
        return
    state = "it is a file, not a directory" if os.path.exists(path) else "nothing exists at that path"
    raise ConversionError(f"{path} is not {kind}: {state}. Expected a directory holding {holds}.")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_header(header, data_size: int, path: str, base: int = 0) -> dict[str, TensorRef]:
    """Key -> TensorRef for a parsed safetensors header, every entry checked before a byte of data is read.

    Each entry must be an object with a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets``
    [start, end] with 0 <= start <= end <= data_size and end - start = prod(shape) x itemsize; entries must not
    overlap. ``__metadata__`` is skipped. Raises ConversionError naming the file and the tensor otherwise.

    Args:
      header: the parsed JSON header (anything: a hostile file may hold a list, a string ...).
      data_size: bytes after the header (the data section).
      base: the data section's offset in the file (8 + header length), added to the TensorRefs' offsets.
    """
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is not a valid safetensors file (its header is a JSON "
                              f"{type(header).__name__}, expected an object of tensor name -> "
                              "{dtype, shape, data_offsets}). Download it again.")

    def bad(key, what):
        return ConversionError(f"{path}: tensor {key!r} {what}. The file is corrupt or not a safetensors file; "
                               "download it again.")

    refs = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise bad(key, f"is described by a JSON {type(meta).__name__}, not an object of dtype, shape and "
                           "data_offsets")
        lacking = [f for f in ("dtype", "shape", "data_offsets") if f not in meta]
        if lacking:
            raise bad(key, f"has no {' and no '.join(lacking)} in the header")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(key, f"has dtype {dtype!r}, expected one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise bad(key, f"has shape {shape!r}, expected a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) and
                                                                         not isinstance(o, bool) for o in offsets):
            raise bad(key, f"has data_offsets {offsets!r}, expected [start, end] (two integers)")
        start, end = offsets
        if not 0 <= start <= end:
            raise bad(key, f"has data_offsets [{start}, {end}], expected 0 <= start <= end")
        if end > data_size:
            raise ConversionError(f"{path} is truncated: tensor {key!r} ends at byte {base + end} but the file has "
                                  f"{base + data_size} bytes. Download it again.")
        need = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - start != need:
            raise bad(key, f"has data_offsets [{start}, {end}] ({end - start} bytes), but dtype {dtype} and shape "
                           f"{tuple(shape)} take {need} bytes")
        refs[key] = TensorRef(path, dtype, tuple(shape), base + start, base + end)
    previous = None
    for key, ref in sorted(((k, r) for k, r in refs.items() if r.nbytes), key=lambda kv: kv[1].start):
        if previous is not None and ref.start < previous[1].end:
            raise bad(key, f"overlaps tensor {previous[0]!r} (its bytes start at {ref.start - base}, before the "
                           f"other's end at {previous[1].end - base})")
        previous = key, ref
    return refs


def read_safetensors_header(path: str) -> dict[str, TensorRef]:
    """Key -> TensorRef for one safetensors file, every header entry checked (``check_header``); reads the header
    only."""
    size = os.path.getsize(path)

    def invalid(why):
        return ConversionError(f"{path} is not a valid safetensors file ({why}). Download it again.")

    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConversionError(f"Cannot read {path}: {e.strerror}.") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise invalid(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            if head.startswith((b"PK\x03\x04", b"\x80")):  # a zip (torch.save) or a raw pickle
                raise pickle_refusal(path)
            raise invalid(f"its header length field says {n} bytes, but the file has {size - 8} bytes after it"
                          if 8 + n > size else f"header length {n} is outside 1..{MAX_HEADER}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise invalid(f"its header is not JSON: {e}") from None
    return check_header(header, size - 8 - n, path, base=8 + n)


def pickle_refusal(path: str) -> ConversionError:
    """The error for a PyTorch pickle checkpoint, which is never unpickled."""
    return ConversionError(
        f"{path} is a PyTorch pickle checkpoint; jaxdebias never unpickles weights (loading a pickle can run "
        "arbitrary code). Convert it to safetensors first, once, in an environment you trust; that step needs torch "
        "to read. Install torch and transformers, then run in Python: `from transformers import "
        "AutoModelForImageTextToText as M; M.from_pretrained(SRC).save_pretrained(OUT, safe_serialization=True)` "
        "(AutoModelForCausalLM for a text model), and convert OUT.")


def _read_index(path: str) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` names, checked."""
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read())
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}). Download it again.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = (f"a JSON {type(index).__name__}" if not isinstance(index, dict) else
                 "no \"weight_map\"" if "weight_map" not in index else
                 f"a \"weight_map\" that is {'empty' if weight_map == {} else 'a JSON ' + type(weight_map).__name__}")
        raise ConversionError(f"{path} holds {found}; expected an object whose \"weight_map\" maps tensor names to "
                              "shard file names. Download it again.")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.isabs(shard) or ".." in shard.split("/") or not shard:
            raise ConversionError(f"{path} maps tensor {key!r} to {shard!r}; expected the name of a shard file in "
                                  "the same directory. Download the index again.")
    return sorted(set(weight_map.values()))


def list_weight_files(src: str | os.PathLike | list) -> list[str]:
    """The weight files of a checkpoint directory (index-driven when sharded) or an explicit list of files."""
    if isinstance(src, (list, tuple)):
        files = [os.fspath(f) for f in src]
        for f in files:
            if not os.path.isfile(f):
                raise ConversionError(f"Weight file {f} does not exist." if not os.path.exists(f) else
                                      f"{f} is a directory, not a weight file; pass the directory alone, or its "
                                      "*.safetensors files.")
        return files
    src = os.fspath(src)
    require_dir(src, "a checkpoint directory", "config.json and *.safetensors")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(src, index_name)
        if os.path.exists(index):
            if index_name.startswith("pytorch_model"):
                raise pickle_refusal(index)
            shards = _read_index(index)
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
            if f.endswith(PICKLE_SUFFIXES):
                raise pickle_refusal(f)
            for k, v in read_safetensors_header(f).items():
                if k in self.refs:
                    raise ConversionError(f"Tensor {k!r} appears in two files (second: {f}).")
                self.refs[k] = v

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self.refs[key].shape)

    def nbytes(self, key) -> int:
        return self.refs[key].nbytes

    def dtype(self, key) -> str:
        """The safetensors dtype name (F32, BF16, ...) of a tensor."""
        r = self.refs[key]
        return r.dtype if isinstance(r, TensorRef) else _NAMES.get(np.dtype(r.dtype), str(r.dtype))

    def load(self, key) -> np.ndarray:
        r = self.refs[key]
        return r.load() if isinstance(r, TensorRef) else r
