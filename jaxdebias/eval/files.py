"""Writing results: one atomic write for every result file, the reader that resumes an answer file, the record
of the setting that produced an output folder, and the lock that keeps one process per answer file.

A result file (metrics, a summary, a curve, a figure, an export) appears whole or not at all: it is written
beside its destination and renamed onto it. The answer file is the exception by design: it grows one line per
answer, flushed, so that a killed run leaves whole lines and a rerun resumes after them (``read_answers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

from jaxdebias import UserError
from jaxdebias._checks import process_alive


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a result file gets the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    for number, line in enumerate(whole.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode())
            done[row["question_id"], row["prompt"]] = row
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: not UTF-8 or not JSON
            raise UserError(f"{path}, line {number}: not an answer line ({e.__class__.__name__}: {e}); remove the "
                            "file or the line to answer those questions again.") from None
    return done


def digest(obj) -> str:
    """sha256 (hex, 16 digits) of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_setting(path, setting: dict, *, compare_without=("data",), record: bool = True) -> None:
    """Records ``setting`` (what produced the results beside it) at ``path`` (with ``record``), or, when a record
    is there, checks that it is the same setting: a resumed run must not mix answers of two settings. Keys in
    ``compare_without`` are recorded but may differ (the data file: an edited question is answered again, question
    by question). Raises UserError naming the first differences and what to do."""
    setting = json.loads(json.dumps(setting, default=str))  # as it reads back
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a setting record ({e}); remove the folder or pass another --out.") from None
        keys = sorted(set(old) | set(setting))
        diff = [k for k in keys if k not in compare_without and old.get(k) != setting.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {setting.get(k)!r} now" for k in diff[:3])
            raise UserError(f"{os.path.dirname(os.path.abspath(path))} holds results of another setting ({shown}). "
                            "Pass a new --out, or --overwrite to replace them.")
        if old == setting:
            return
    if record:
        write_json(path, setting)


@contextlib.contextmanager
def exclusive(path):
    """Holds the lock file ``path`` (it records this process's pid) for the block: a second process that asks
    for it while this one lives gets a UserError; a lock left by a dead process is taken over."""
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and process_alive(pid):
                raise UserError(f"Another process (pid {pid}) is writing to {os.path.dirname(os.path.abspath(path))}; "
                                "wait for it to finish or pass another --out.") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its owner is gone
    else:
        raise UserError(f"Could not take the lock {path}; remove it if no jaxdebias process is running.")
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
