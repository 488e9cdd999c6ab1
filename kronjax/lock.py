"""One trainer per workdir: an advisory lock on WORKDIR/.lock that names its holder.

Two trainers on one workdir wrote every step twice into metrics.jsonl, crashed in orbax or
hung for 300 s. `fcntl.flock` is released by the kernel when its holder dies, however it dies,
so a lock can never be left held by a dead process; the file keeps the holder's pid and host
for the refusal message, and a file still naming a holder when the lock is free is the trace
of a trainer that did not exit cleanly (kill -9, a crash): it is taken over with a warning.
Where the filesystem has no flock (some network filesystems), the pid in the file decides:
a live process on this host holds it; one on another host or a dead one does not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from kronjax.errors import UserError

__all__ = ["LOCK_FILE", "WorkdirBusyError", "WorkdirLock"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirBusyError(UserError):
    """Another live trainer holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/.lock until the block exits (or the process
    dies); raises WorkdirBusyError naming the holder's pid and host if another trainer has it."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> dict[str, object]:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._busy(self._holder()) from None
            locked = False  # no flock here: the pid in the file decides
        holder = self._holder()
        if holder:
            pid, host = int(holder.get("pid", -1)), holder.get("host")
            if not locked and host == socket.gethostname() and pid != os.getpid() and _alive(pid):
                os.close(fd)
                raise self._busy(holder)
            log.warning("%s names pid %s on %s, which no longer holds it (killed or crashed): "
                        "taking the workdir over", self.path, pid, host)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _busy(self, holder: dict[str, object]) -> WorkdirBusyError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
               if holder else "another process")
        return WorkdirBusyError(f"{self.path.parent} is in use by another trainer ({who}); "
                                "wait for it to finish, stop it, or use another --workdir")

    def release(self) -> None:
        """Empty the file (a clean exit leaves no holder named), then unlock. The file stays:
        unlinking it would let a waiter lock an inode a newcomer no longer sees."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
