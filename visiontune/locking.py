"""One writer per output directory: an exclusive lock held for the whole life of a run.

Two `train` processes given the same `--out` used to both succeed and leave a folder mixing the
two runs. Every command that writes a directory now holds `DIR/.visiontune.lock` while it works.

The lock is a POSIX record lock (`fcntl.lockf`) on that file, chosen over the `filelock` package:
the kernel releases it when its process exits, however it exits (crash, kill -9), so a lock left
by a dead process is never stale and needs no PID guessing; and `filelock` truncates the file
before it tries to lock, which would wipe the holder's details that the refused process names in
its message. Not `flock`: forked DataLoader workers inherit a flock and kept the directory locked
after their parent had finished or failed; a record lock belongs to the process alone. The file
is removed on release (and the directory too when this process created it and wrote nothing
else); a process that locked a file just removed checks the path still names it, and else locks
afresh, so two processes never hold "the" lock on different files. Locks are re-entrant within
a process (`train --lr auto` runs lr-find in the run directory it holds).
Where `fcntl` does not exist (Windows) directories are not locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visiontune.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)
LOCK_NAME = ".visiontune.lock"
_held: dict[str, list[int]] = {}  # resolved directory -> [fd, depth], for re-entrant use


class DirectoryInUseError(UserError):
    """Another live process holds the directory's lock."""


@contextmanager
def locked_dir(directory: str | os.PathLike, create: bool = True) -> Iterator[Path]:
    """Hold `directory`'s lock (creating the directory when `create`) until the block ends.

    A missing directory with `create=False` is yielded unlocked, for the caller to report.
    """
    directory = Path(directory).expanduser()
    created = create and not directory.exists()
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None or not directory.is_dir():
        yield directory
        return
    key = str(directory.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield directory
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(directory / LOCK_NAME)
    _held[key] = [fd, 1]
    try:
        yield directory
    finally:
        del _held[key]
        (directory / LOCK_NAME).unlink(missing_ok=True)  # before the release: see the module doc
        os.close(fd)  # releases the lock
        if created and not any(directory.iterdir()):  # a run that wrote nothing leaves nothing
            directory.rmdir()


def is_only_lock(directory: Path) -> bool:
    """True for an empty directory or one holding just the lock file."""
    return all(p.name == LOCK_NAME for p in directory.iterdir())


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryInUseError(
                f"{path.parent} is in use by another visiontune process ({holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        except OSError as exc:  # a file system without locks: run unlocked rather than not at all
            log.warning("cannot lock %s (%s); another process could write there too", path, exc.strerror)
            break
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the file was removed while we waited for it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder()).encode())
    return fd


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200]}


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "details unreadable"
