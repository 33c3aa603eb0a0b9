"""One run at a time per run directory.

``<output>/.lock`` holds an exclusive ``flock`` for as long as a run works in the directory, and
records the holder's pid, host and start time. The kernel drops the ``flock`` when the holder dies,
so a lock file left by a killed run is stale by construction: the next run finds it unlocked, says
so, and takes it over. A second live run finds it locked and stops with one line naming the holder.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Callable

from surgery.core.errors import SurgeryError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None


class RunLock:
    """Context manager: hold ``directory/.lock`` or raise :class:`SurgeryError`."""

    def __init__(self, directory: Path, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.log = log or (lambda message: None)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        if fcntl is None:
            return
        for _ in range(10):  # the file may be replaced between open and flock; then try again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise SurgeryError(f"{self.path.parent}: cannot create its lock file: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise SurgeryError(f"{self.path.parent}: another run is using this directory ({holder}); "
                                   "wait for it to finish or choose another --output") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file that a finishing run had just removed
        else:
            raise SurgeryError(f"{self.path.parent}: could not take the run lock")
        previous = _read(fd)
        if previous.get("pid"):
            self.log(f"taking over a stale lock left by {_describe(previous)}")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass  # the directory was removed with the lock in it (a failed first run)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "a run that has not yet written its pid"
    return f"pid {record['pid']} on {record.get('host', '?')}, started {record.get('started', '?')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
