"""One run per run folder: an exclusive OS lock (``flock``) on ``<out_dir>/.run.lock`` for the run's whole life.

The kernel drops a ``flock`` when its holder exits, however it exits (SIGKILL and power loss included),
so a lock never has to be guessed stale from a pid. The file also names the holder (pid, host, start
time, command) for the error a second run prints; the second run opens it read-only and writes nothing.
Under torchrun only rank 0 takes the lock. ``release`` removes the file while still holding the lock
(and, after a run that failed before writing anything, the folder it created), and every held lock is
released by ``release_all`` (``run_cli`` calls it), so in-process runs never leak one.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from utils.run.errors import UserError

LOCK_FILE = ".run.lock"
_held: dict[str, "RunFolderLock"] = {}


def _holder_text(path: str) -> str:
    try:
        with open(path) as f:
            h = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another run (it has not named itself yet)"
    cmd = " ".join(h.get("command") or [])
    return f"pid {h['pid']} on {h.get('host', '?')}, started {h.get('started', '?')}" + (f": {cmd}" if cmd else "")


class RunFolderLock:
    """The exclusive lock of one run folder; ``acquire`` raises ``UserError`` when another process holds it."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.fd: int | None = None
        self.created_folder = False

    def acquire(self) -> "RunFolderLock":
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
            self.created_folder = True
        while True:
            if os.path.exists(self.path):
                fd = os.open(self.path, os.O_RDONLY)  # a second run must not write into the holder's file
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._undo_folder()
                raise UserError(f"run folder '{self.folder}' is in use by {_holder_text(self.path)}; wait for that "
                                "run to end (or stop it) or choose another --out_dir") from None
            try:  # the file may have been removed (and re-created) by its last holder in the meantime
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self._write_holder()
        _held[self.folder] = self
        return self

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]]}
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)  # the locked inode (checked above)
        try:
            os.write(fd, (json.dumps(info) + "\n").encode())
        finally:
            os.close(fd)

    def _undo_folder(self) -> None:
        if self.created_folder:
            try:
                os.rmdir(self.folder)  # only if empty: nothing of ours was written
            except OSError:
                pass
            self.created_folder = False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: no other run can hold this inode
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._undo_folder()
        _held.pop(self.folder, None)


def holder(folder: str) -> str | None:
    """Who holds ``folder``'s lock (``pid N on HOST, started ...``), or None if no live run holds it.

    Tries a shared lock for an instant, read-only: it fails only while a run holds the exclusive one.
    """
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(path)
    finally:
        os.close(fd)  # closing also drops the shared lock
    return None


def lock_run_folder(folder: str) -> RunFolderLock:
    """Take ``folder``'s lock for this process (re-entrant: a folder this process already holds is returned)."""
    held = _held.get(os.path.abspath(folder))
    return held if held is not None else RunFolderLock(folder).acquire()


def release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
