"""One writer per folder: an exclusive `flock` on a file in it, held for the writer's life.

A training run's rank 0 holds `<out_dir>/run.lock`, a reproduction chain `<run>/reproduce.lock`.
The holder writes who it is (host, pid, start time, Slurm job) into the file, so a second
process is refused with one line naming the holder, before it writes anything. The kernel ends a
flock with the last open descriptor of its holder, so the lock of a killed process is free at
once (its record stays in the file until the next holder overwrites it, where a holder that
ends normally empties it); on NFS the client
emulates flock with POSIX locks, which the server releases when the client's lease ends.
A requeued Slurm job finds its own earlier run's record there: it waits for that lock (a
bounded poll) instead of refusing, in case the lock outlives the process on a network filesystem.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ddpm_dist.utils.logs import log

SAME_JOB_WAIT_S = 120.0  # a requeued job waits this long for its earlier run's lock
_held: set[int] = set()  # descriptors of the locks this process holds


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


def _close_in_child() -> None:
    """A forked child (a loader worker) must not keep the lock alive after its parent died."""
    for fd in list(_held):
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            _held.discard(self.fd)
            os.ftruncate(self.fd, 0)  # a record left in the file means a holder that was killed
            os.close(self.fd)  # closing the last descriptor ends the flock
            self.fd = None


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}{job})"


def _read_record(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_folder(folder: str | Path, name: str, what: str) -> FolderLock:
    """Take `folder/name` for this process, or raise FolderBusyError naming the holder. `what`
    says what the folder is for in that message ("run folder")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        locked = _lock_or_wait(fd)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning(f"{path}: this filesystem has no file locks ({e.strerror}); nothing stops a second "
                    f"process from writing to {folder}")
        return FolderLock(path, None)
    if not locked:
        holder = _describe(_read_record(fd))
        os.close(fd)
        raise FolderBusyError(f"{folder} is in use by {holder}, which holds {path}: wait for it to end "
                              f"or stop it; two writers would overwrite each other's {what}")
    previous = _read_record(fd)
    if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
        log.info(f"took over {path} from {_describe(previous)}, which no longer holds it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_record()).encode(), 0)
    os.fsync(fd)
    _held.add(fd)
    return FolderLock(path, fd)


def _lock_or_wait(fd: int) -> bool:
    """The lock now; for a requeued Slurm job whose earlier run still holds it, within SAME_JOB_WAIT_S."""
    if _try_lock(fd):
        return True
    job = os.environ.get("SLURM_JOB_ID")
    if not job or _read_record(fd).get("slurm_job") != job:
        return False
    deadline = time.monotonic() + SAME_JOB_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if _try_lock(fd):
            return True
    return False
