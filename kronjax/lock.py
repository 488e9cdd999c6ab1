"""One trainer per workdir: a lock on WORKDIR/.lock that names its holder.

Two trainers on one workdir wrote every step twice into metrics.jsonl, crashed in orbax or
hung for 300 s. `fcntl.flock` is released by the kernel when its holder dies, however it dies,
so a lock can never be left held by a dead process; the file keeps the holder's pid and host
for the refusal message, and a file still naming a holder when the lock is free is the trace
of a trainer that did not exit cleanly (kill -9, a crash): it is taken over with a warning.
Where the filesystem has no flock (some network filesystems), the pid in the file decides:
a live process on this host holds it; one on another host or a dead one does not.

A bucket has no flock: there the lock is an object created only if absent (Cloud Storage's
ifGenerationMatch=0), holding host, pid and a heartbeat time the holder rewrites every
HEARTBEAT_S seconds (only while the object is still its own generation). A lock whose
heartbeat is older than STALE_S, or that names a dead process on this very host (a rerun after
kill -9), belongs to a trainer that died without releasing it: taken over with a warning. A
holder that finds its lock taken over stops at the next step (`check`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from kronjax import storage
from kronjax.errors import UserError, os_reason
from kronjax.workdir import LOCK, Workdir

__all__ = ["HEARTBEAT_S", "LOCK_FILE", "STALE_S", "BucketLock", "WorkdirBusyError",
           "WorkdirLock", "WorkdirLostError", "workdir_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = LOCK
HEARTBEAT_S = 15.0   # a bucket lock's holder rewrites its heartbeat this often
STALE_S = 120.0      # a bucket lock whose heartbeat is older is taken over (8 beats missed)


class WorkdirBusyError(UserError):
    """Another live trainer holds the workdir."""


class WorkdirLostError(UserError):
    """Another trainer took this trainer's bucket lock over (its heartbeat looked stale)."""


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

    def check(self) -> None:
        """Nothing to check: the kernel holds an flock until its holder exits."""

    def _holder(self) -> dict[str, object]:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        workdir = self.path.parent
        if workdir.exists() and not workdir.is_dir():
            raise UserError(f"--workdir {workdir} is a file, not a directory: give a directory "
                            "(a new one for a new run)")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, but it must be kronjax's lock file: "
                            "remove it (rmdir) if no trainer uses this workdir")
        try:
            self._acquire()
        except OSError as e:  # a full disk, a read-only or foreign workdir: said in one line
            raise UserError(f"cannot write the lock file {self.path}: "
                            f"{os_reason(e)}; free space or fix the "
                            "permissions of the workdir, or use another --workdir") from e

    def _acquire(self) -> None:
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # never keep the flock of a lock that could not be written
            raise
        self._fd = fd

    def _busy(self, holder: dict[str, object]) -> WorkdirBusyError:
        return _busy(self.path.parent, holder)

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


def _busy(workdir: Any, holder: dict[str, object], extra: str = "") -> WorkdirBusyError:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}{extra}"
           if holder else "another process")
    return WorkdirBusyError(f"{workdir} is in use by another trainer ({who}); "
                            "wait for it to finish, stop it, or use another --workdir")


class BucketLock:
    """`with BucketLock(gs_workdir):` holds WORKDIR/.lock, an object created only if absent,
    with a heartbeat; raises WorkdirBusyError naming the holder if a live trainer has it."""

    def __init__(self, workdir: Any, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S) -> None:
        self.workdir = workdir
        self.path = workdir / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._token = uuid.uuid4().hex
        self._since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def _payload(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": self._since,
                           "heartbeat": time.time(), "token": self._token}).encode()

    def acquire(self) -> None:
        try:
            self._generation = storage.create_object(self.path, self._payload())
        except FileExistsError:
            self._generation = self._take_over()
        self._thread = threading.Thread(target=self._beat, name="kronjax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _take_over(self) -> int:
        """The lock exists: refuse if its heartbeat is fresh, else replace it (only that
        generation of it: of two trainers taking over at once, one wins)."""
        found = storage.read_object(self.path)
        if found is None:  # released meanwhile
            return storage.create_object(self.path, self._payload())
        data, generation = found
        try:
            holder = json.loads(data)
            age = time.time() - float(holder["heartbeat"])
            dead_here = holder["host"] == socket.gethostname() and not _alive(int(holder["pid"]))
        except (ValueError, KeyError, TypeError):
            holder, age, dead_here = {}, float("inf"), False  # not kronjax's: unreadable = stale
        if age <= self.stale_s and not dead_here:
            raise _busy(self.workdir, holder,
                        f", heartbeat {age:.0f} s ago; a lock is taken over once its heartbeat "
                        f"is over {self.stale_s:.0f} s old")
        why = ("is no longer running on this host" if dead_here else
               f"has not renewed it for {'ever' if age == float('inf') else f'{age:.0f} s'} "
               f"(over {self.stale_s:.0f} s)")
        log.warning("%s names pid %s on %s, which %s (killed or crashed): taking the workdir "
                    "over", self.path, holder.get("pid"), holder.get("host"), why)
        if not storage.delete_object(self.path, generation):
            raise _busy(self.workdir, holder, " (another trainer took it over just now)")
        try:
            return storage.create_object(self.path, self._payload())
        except FileExistsError:
            raise _busy(self.workdir, {}, "") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.beat():
            pass

    def beat(self) -> bool:
        """Renew the heartbeat if the lock object is still this trainer's generation; returns
        False once it is not (another trainer took it over: `check` then raises)."""
        try:
            assert self._generation is not None
            self._generation = storage.replace_object(self.path, self._payload(),
                                                      self._generation)
        except (FileExistsError, FileNotFoundError):
            found = storage.read_object(self.path)
            try:
                holder = json.loads(found[0]) if found else {}
            except ValueError:
                holder = {}
            self._lost = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
                          else "nobody: the lock object was deleted")
            return False
        except Exception as e:  # noqa: BLE001 - a network blip: try again next beat
            log.warning("could not renew the lock heartbeat in %s: %s", self.path, e)
        return True

    def check(self) -> None:
        """Raise WorkdirLostError if another trainer took the lock over (this one stops)."""
        if self._lost is not None:
            raise WorkdirLostError(
                f"{self.workdir}: another trainer ({self._lost}) took this run's lock over "
                f"after missing heartbeats for over {self.stale_s:.0f} s; stopping without "
                "saving so as not to overwrite its checkpoints")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object, if it is still this trainer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._generation is not None and self._lost is None:
            storage.delete_object(self.path, self._generation)
        self._generation = None

    def __enter__(self) -> BucketLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def workdir_lock(workdir: Workdir) -> WorkdirLock | BucketLock:
    """The lock for a workdir: an flock on local disk, a heartbeat object in a bucket."""
    return BucketLock(workdir.root) if workdir.is_remote else WorkdirLock(workdir.root)
