"""One run per run directory: ``RUN_DIR/.lock`` holds the PID of the process training into it.

Two ``capcli pretrain`` into one ``--output`` would interleave their ``metrics.jsonl`` and
overwrite each other's checkpoints, so the second refuses (exit 2) and names the first.

The lock is an advisory ``flock`` on the file (POSIX), which the kernel drops when its holder
dies however it dies: a lock left by ``kill -9`` is stale the moment the process is gone and
the next run takes it over, saying so. The file's text (PID, host, start time) is only for
the message. Where ``fcntl`` is missing (Windows) or the file system has no locks, the file
alone is the lock, and a PID that no longer runs on this host marks it stale.

A process holds a run directory's lock from the moment it prepares the run until it exits
(or calls ``release``); taking it again in the same process is a no-op.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from capcli.errors import RunLocked

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directory → the open, locked file descriptor


def acquire(run_dir: Path) -> None:
    """Take ``run_dir``'s lock for this process.

    Raises:
        RunLocked: another live process holds it; the message names its PID.
    """
    given, run_dir = Path(run_dir), Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = _read(fd)
        if not _lock(fd, path, previous):
            os.close(fd)
            raise RunLocked(f"{given} is in use by another capcli run "
                            f"({_describe(previous)}); wait for it to finish, stop it, or pass --output DIR "
                            f"for a new run (lock file: {path})")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed while we waited for it
            break
        os.close(fd)
    if previous.get("pid") and previous.get("pid") != os.getpid():
        print(f"note: taking over the stale lock of {_describe(previous)}, which is no longer running",
              file=sys.stderr)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    _held[run_dir] = fd


def release(run_dir: Path) -> None:
    """Give the lock back: remove the file while still holding it, then close it."""
    run_dir = Path(run_dir).resolve()
    fd = _held.pop(run_dir, None)
    if fd is None:
        return
    try:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)


def _lock(fd: int, path: Path, previous: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # ENOLCK: a file system without locks (some network mounts): the PID alone decides
            pass
    pid = previous.get("pid")
    return not (isinstance(pid, int) and previous.get("host") == socket.gethostname() and _alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "PID unknown"
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", started {record['since']}" if record.get("since") else ""
    return f"PID {record['pid']}{where}{since}"
