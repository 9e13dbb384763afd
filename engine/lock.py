"""One writer per run directory: an advisory lock file under `out_dir`, taken by every stage that writes.

    <out_dir>/.distill.lock   {"pid", "host", "command", "since"}: who holds it

The lock is a POSIX `flock` on that file, so the kernel drops it the moment its holder dies (a killed
run, a crash, a power cut of the process): a lock left by a dead process is simply free, and the next
run takes it over and says whose it was. A second live invocation is refused at once with one line
naming the holder. The JSON inside is for people; `flock` is the truth. (On NFS, Linux maps `flock`
to byte-range locks, which NFSv4 honours across hosts.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".distill.lock"


class LockError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """`with RunLock(out_dir, command):` holds `out_dir` for this process, or raises LockError."""

    def __init__(self, out_dir: str | Path, command: str):
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self.took_over: dict | None = None  # the previous holder's record, when it died holding the lock
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self.holder()
            who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')!r}, since "
                   f"{holder.get('since')})") if holder else "another process"
            raise LockError(f"{self.path.parent} is in use by {who}. Wait for it to finish, stop it, or use "
                            "another out_dir") from None
        previous = self.holder(fd)
        if previous.get("pid"):  # the lock was free, yet its file names a holder: it died holding it
            self.took_over = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self, fd: int | None = None) -> dict:
        """The record in the lock file ({} when empty or unreadable)."""
        try:
            text = os.pread(fd, 4096, 0).decode() if fd is not None else self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
