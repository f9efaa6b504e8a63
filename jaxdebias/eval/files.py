"""Writing results: one atomic write for every result file, and the reader that resumes an answer file.

A result file (metrics, a summary, a curve, a figure, an export) appears whole or not at all: it is written
beside its destination and renamed onto it. The answer file is the exception by design: it grows one line per
answer, flushed, so that a killed run leaves whole lines and a rerun resumes after them (``read_answers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from jaxdebias import UserError


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """A file written beside ``path`` and renamed onto it when the block ends without error (else removed):
    readers never see a half-written file. ``mode`` is "w" or "wb"; ``kwargs`` go to ``open``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}.")
    folder, name = os.path.split(os.path.abspath(path))
    descriptor, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent: int | None = 1) -> str:
    """``obj`` as JSON at ``path``, atomically. Returns ``path``."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)
    return str(path)


def write_text(path, text: str, **kwargs) -> str:
    """``text`` at ``path``, atomically. Returns ``path``."""
    with atomic_open(path, **kwargs) as f:
        f.write(text)
    return str(path)


def read_answers(path) -> dict:
    """Answers already written (to resume), by (question_id, prompt): some benchmarks (MME) ask several questions
    under one question_id. A torn last line, as a kill during a write leaves it, is cut from the file; every
    complete line must be JSON."""
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]  # complete lines only
    if len(whole) != len(data):
        with open(path, "wb") as f:
            f.write(whole)
    for number, line in enumerate(whole.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done[row["question_id"], row["prompt"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}, line {number}: not an answer line ({e.__class__.__name__}: {e}); remove the "
                            "file or the line to answer those questions again.") from None
    return done
