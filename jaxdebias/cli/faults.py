"""The machine's faults on the command line: which exit code and one-line message a disk, memory or interrupt
fault gets (``main`` turns a ``UserError`` into exit 2 itself; anything else is a bug and keeps its traceback)."""

from __future__ import annotations

import errno

import jax

# Exit codes: 2 a user error (a UserError, or a flag argparse refuses); the machine's faults have their own, after
# what is whole is kept (eval's answer file grows one flushed line per answer): 74 (EX_IOERR) the disk is full,
# read-only or refuses a file, 75 (EX_TEMPFAIL) out of memory, 130 interrupted (Ctrl-C). Anything else is a bug
# and keeps its traceback.
EXIT_USER, EXIT_IO, EXIT_MEMORY, EXIT_INTERRUPTED = 2, 74, 75, 130
DISK_FAULTS = {errno.ENOSPC: ("no space left on the device", "free some space"),
               errno.EDQUOT: ("the disk quota is exceeded", "free some space"),
               errno.EFBIG: ("a file grew past the file-size limit", "raise the limit (ulimit -f)"),
               errno.EROFS: ("the file system is read-only", "pass a writable --out"),
               errno.EACCES: ("permission denied", "check the permissions"),
               errno.EPERM: ("operation not permitted", "check the permissions")}
KEPT = {"eval": "the answers written so far are kept: rerun the same command to resume",
        "eval-grid": "the answers written so far are kept: rerun the same command to resume",
        "grade-mmvet": "the grades written so far are kept: rerun the same command to resume"}


def _memory_advice(args) -> str:
    flags = [f for f, attr in (("--batch 1", "batch"), ("a smaller --max-new-tokens", "max_new_tokens"))
             if hasattr(args, attr)]
    return f"try {' or '.join(flags)}" if flags else "close other programs or use a machine with more memory"


def fault(command: str, args, e: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for a fault of the machine during ``command`` (``args``: its parsed flags,
    for advice), None for anything else."""
    kept = KEPT.get(command, "rerun the command")
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"interrupted; {kept}."
    if isinstance(e, OSError) and e.errno in DISK_FAULTS:
        what, advice = DISK_FAULTS[e.errno]
        where = f" ({e.filename})" if e.filename else ""
        return EXIT_IO, f"error: {what}{where}: {advice} or pass another --out; {kept}."
    xla_oom = isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)
    if isinstance(e, MemoryError) or xla_oom:
        detail = str(e).strip().splitlines()[0][:160] if xla_oom else "host memory"
        return EXIT_MEMORY, f"error: out of memory ({detail}): {_memory_advice(args)}; {kept}."
    return None
