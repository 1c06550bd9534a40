"""The working directory: one training run at a time (a lock), early I/O checks, and its
small files (config.json, run.json, metrics.jsonl) replaced whole, never half-written.

The lock is `WORKDIR/train.lock`, held with `fcntl.flock` for the life of the run and
holding `{"host", "pid", "started"}` for the message a second run prints. The kernel
drops a flock when its process dies however it dies (SIGKILL, OOM), so a lock file
left by a dead run is simply taken over; a running holder makes `train` fail at once.
flock works on local disks (and NFSv4, where Linux maps it to a byte-range lock); it
means nothing on object stores (gs://), where no lock is taken: there the scheduler
must start one run per working directory (docs/training.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import tempfile
import time

from etils import epath

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


class WorkdirBusyError(RuntimeError):
    """Another training run holds the working directory."""


class WorkdirError(OSError):
    """The working directory cannot be created or written."""


def is_local(path: epath.PathLike) -> bool:
    return "://" not in str(path)


def ensure_writable_dir(path: epath.Path, what: str) -> None:
    """Create `path` if needed and prove it takes a write, or raise WorkdirError naming it."""
    if path.exists() and not path.is_dir():
        raise WorkdirError(errno.ENOTDIR, f"{what} {path} exists and is not a directory; "
                           "pass a directory (or a new path) instead")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if is_local(path):
            _probe(path)
    except WorkdirError:
        raise
    except OSError as e:
        raise WorkdirError(e.errno or errno.EIO,
                           f"{what} {path} is not writable ({e.strerror or e}); fix its "
                           "permissions, mount or free space, or use another directory") from e


def write_whole(path: epath.Path, text: str) -> None:
    """Write `text` to `path` whole: a run killed mid-write keeps the old file (or none),
    never half of one.  Locally a private temporary file is renamed over it."""
    if not is_local(path):  # an object store writes an object whole or not at all
        path.write_text(text)
        return
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, str(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _probe(directory: epath.Path) -> None:
    """Write, fsync and remove a small file: a read-only or full disk fails here, at once."""
    probe = os.path.join(str(directory), f".write_probe.{os.getpid()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


class WorkdirLock:
    """Exclusive flock on WORKDIR/train.lock; `acquire` fails at once if it is held."""

    def __init__(self, workdir: epath.Path):
        self.path = os.path.join(str(workdir), LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another training run (host "
                f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}, started "
                f"{holder.get('started', '?')}; lock {self.path}). Wait for it to finish, "
                "stop it, or use another --workdir") from None
        except OSError as e:  # a filesystem without flock: say so, run unprotected
            log.warning("could not lock %s (%s); make sure no other run uses this workdir",
                        self.path, e.strerror)
            os.close(fd)
            return
        stale = _read_holder(fd)
        if stale:
            log.info("took over the lock left by a run that is no longer running (host %s, "
                     "PID %s)", stale.get("host"), stale.get("pid"))
        info = dict(host=socket.gethostname(), pid=os.getpid(),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the file (a clean release leaves no holder) and drop the lock.

        The file stays: unlinking it would let a waiter lock a deleted inode while a
        third run creates a new file and locks that one too.
        """
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
