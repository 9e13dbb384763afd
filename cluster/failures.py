"""Failures of the environment, as one line each: what happened, what was kept, how to continue.

`describe(err)` walks an exception's chain (Ray wraps a task's error in RayTaskError, Ray Train a
worker's in WorkerGroupError) down to the fault a person can act on: a full disk, memory, a file that
vanished, a directory that cannot be written, Ray failing to start. Anything else is a bug and keeps
its traceback. The CLI prints the line and, unless `--verbose`, nothing else.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator

# A worker's error that reached the driver only as text (an actor that died in its constructor).
_MISSING = (re.compile(r"No such file or directory: '([^']+)'"),
            re.compile(r"no file named (\S+?)\.? found in directory (\S+?)\.?(?:\s|$)"))  # transformers' wording


class RayStartError(RuntimeError):
    """Ray could not start (or join the configured cluster)."""


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception behind it: `cause`, `__cause__`, `__context__`, Ray Train's
    per-worker failures and controller failure."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
        todo += list((getattr(e, "worker_failures", None) or {}).values())


def _oom(e: BaseException) -> bool:
    try:
        from ray.exceptions import OutOfMemoryError
    except ImportError:  # pragma: no cover - ray is a dependency of cluster/
        OutOfMemoryError = MemoryError  # noqa: N806
    text = str(e)
    return isinstance(e, (MemoryError, OutOfMemoryError)) or "OutOfMemoryError" in type(e).__name__ or (
        "killed" in text and "memory" in text.lower())


def describe(err: BaseException) -> str | None:
    """One line for a fault of the environment, or None when `err` is not one (a bug: keep the traceback)."""
    chain = list(causes(err))
    for e in chain:
        if isinstance(e, RayStartError):
            return f"Ray failed to start: {e}"
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" writing {e.filename}" if e.filename else ""
            return f"disk full{where} (No space left on device). Free space (or point out_dir elsewhere)"
    for e in chain:
        if _oom(e):
            return ("out of memory in a teacher replica or a student worker. Lower extract.batch_size or "
                    "student.batch_size, or give Ray more memory")
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write {e.filename or 'a file'} ({e.strerror}). Point out_dir at a folder you can write"
    for e in chain:
        found = e.filename if isinstance(e, FileNotFoundError) else None
        for pattern in () if found else _MISSING:
            m = pattern.search(str(e))
            if m:
                found = m.group(1) if m.lastindex == 1 else f"{m.group(2).rstrip('/')}/{m.group(1)}"
                break
        if found:
            return (f"{found} vanished mid-run (No such file or directory). Restore it (the model and data "
                    "must stay in place while a run reads them)")
    return None
