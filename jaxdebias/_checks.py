"""Input checks that speak to the user.

Checks on shapes and static arguments run at trace time, so they cost nothing inside jit. Checks on values
(NaN scores) run eagerly when the values are concrete, and through ``checkify.debug_check`` when traced, so a
user who wraps their function in ``jax.experimental.checkify.checkify`` gets the same error under jit.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


class UserError(Exception):
    """Bad input from the user: the ``jaxdebias`` command prints the message and exits with code 2."""


def is_concrete(x) -> bool:
    """True when ``x`` holds real values (not a tracer inside jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_rank(name: str, x, rank: int | tuple[int, ...], spelled: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if jnp.ndim(x) not in ranks:
        raise ValueError(
            f"{name} must have rank {' or '.join(map(str, ranks))} ({spelled}), got shape {jnp.shape(x)}."
        )


def check_same_shape(name_a: str, a, name_b: str, b, *, axes: slice = slice(None)) -> None:
    sa, sb = tuple(jnp.shape(a))[axes], tuple(jnp.shape(b))[axes]
    if sa != sb:
        raise ValueError(f"{name_a} and {name_b} must agree in shape, got {jnp.shape(a)} and {jnp.shape(b)}.")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (it decides a shape, so it is static), got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return int(value)


def check_fraction(name: str, value, *, low_open: bool = False) -> None:
    """Checks 0 <= value <= 1 when the value is concrete (a traced value is left to the caller)."""
    if not is_concrete(value):
        return
    v = np.asarray(value)
    bad = (v <= 0) if low_open else (v < 0)
    if np.any(bad | (v > 1)) or np.any(np.isnan(v)):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def check_no_nan(name: str, x, where=None) -> None:
    """Refuses NaN in ``x`` (only at positions where ``where`` is True, when given)."""
    bad = jnp.isnan(x) if where is None else (jnp.isnan(x) & where)
    message = (
        f"{name} contains NaN; NaN cannot be ranked. Check the attention that produced it "
        "(e.g. a fully masked softmax row) and replace or mask those positions."
    )
    if is_concrete(x) and (where is None or is_concrete(where)):
        if bool(jnp.any(bad)):
            count = int(jnp.sum(bad))
            raise ValueError(f"{message} ({count} NaN values.)")
    else:
        checkify.debug_check(~jnp.any(bad), message)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (signal 0 checks without sending; EPERM means it runs as another
    user): tells a stale lock or partial folder from a live one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True
