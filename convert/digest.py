"""The checkpoint digest: a 64-bit checksum of each parameter's bits and positions, computed where the array
lives (the converter writes it into the marker, ``load`` checks it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CHECKSUM = "jaxdebias-sum64-v1"  # the algorithm of ``checksum``, recorded in the marker beside the digests
_SMALL = 1 << 20  # elements: arrays up to this size are summed and cast on the host (no compilation per shape)


def _mix(h):
    """murmur3's 32-bit finaliser on uint32 arrays (numpy or jax: unsigned arithmetic wraps the same in both)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _sums(bits, index, xp):
    """Two 32-bit lanes over h = bits ^ (index * golden ratio): the sums of mix(h) and of mix(h + sqrt(2)'s bits)."""
    h = bits ^ (index * np.uint32(0x9E3779B9))
    return xp.sum(_mix(h), dtype=xp.uint32), xp.sum(_mix(h + np.uint32(0x6A09E667)), dtype=xp.uint32)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@jax.jit
def _device_sums(x):
    bits = lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1  # row-major flat index mod 2**32, with no reshape of x
    for axis in reversed(range(x.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.stack(_sums(bits, index, jnp))


def lanes(x):
    """``checksum``'s two sums: numpy uint32[2] for small or host arrays, or a device array not yet waited for."""
    if x.size <= _SMALL and (isinstance(x, np.ndarray) or x.is_fully_addressable):
        x = np.asarray(x).reshape(-1)  # 1-d: numpy's 0-d arithmetic would warn on the (intended) wrap-around
        return np.array(_sums(x.view(_UINT[x.dtype.itemsize]).astype(np.uint32), np.arange(x.size, dtype=np.uint32),
                              np))
    if isinstance(x, np.ndarray):  # a large host array (the converter's): summed by XLA on the host CPU
        x = jax.device_put(x, jax.devices("cpu")[0])
    return _device_sums(x)


def cast(x, dtype):
    """A device array cast to ``dtype`` in place of it (same sharding); small ones on the host, like ``lanes``."""
    if x.size <= _SMALL and x.is_fully_addressable:
        return jax.device_put(np.asarray(x).astype(dtype), x.sharding)
    return x.astype(dtype)


def hexdigest(lanes) -> str:
    return "".join(f"{int(v):08x}" for v in np.asarray(lanes))


def checksum(x) -> str:
    """A 64-bit digest (16 hex digits) of an array's bits and their positions, computed where the array lives.

    Each element's bit pattern, xor-ed with its flat index times an odd constant, goes through murmur3's finaliser
    (two lanes with different offsets), and the results are summed modulo 2**32. A sum is associative, so a sharded
    array gives the same digest as a host copy, and large arrays are summed on their device(s) without a transfer.
    One changed element always changes the digest (the mix is a bijection); more changes escape with probability
    ~2**-64. It detects corruption, not tampering: it is not a cryptographic hash. Arrays of up to 2**20 elements
    are summed on the host with numpy (no compilation per shape); both paths give identical digests.
    """
    return hexdigest(lanes(x))
