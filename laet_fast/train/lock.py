"""One run per run folder: an exclusive ``flock`` on ``RUN/.lock``, held while a run writes there.

The kernel drops a ``flock`` when its process ends, however it ends, so the lock file a killed run leaves
behind never blocks the next run or ``--resume``: only a live process holds the lock. The file records the
holder's PID, for the message that refuses a second run, and is removed when the run ends, so that a run
folder holds no trace of a lock once nothing runs there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock; the message names its PID when it is known."""


class RunLock:
    """The lock of run folder ``out``: ``acquire()`` creates ``out`` when missing and takes the lock, or raises
    ``RunLocked`` at once when another process holds it; ``release()`` removes the lock file and releases the
    lock, and removes a folder ``acquire()`` created when the run wrote nothing into it (a refusal after the
    lock was taken leaves no empty run folder behind).
    """

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_FILE)
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Create the folder when missing and take its lock; ``RunLocked`` when another process holds it."""
        self._created = not os.path.isdir(self.out)
        while True:
            os.makedirs(self.out, exist_ok=True)  # again after a holder that created it removed it (see release)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_pid(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):  # not "held by another": a real failure
                    raise
                who = f"process {holder}" if holder else "another process"
                raise RunLocked(f"--out {self.out} is in use: {who} is running there (lock {self.path}); wait "
                                f"for it to end, or choose another --out folder.") from None
            # The holder before us may have removed the file after we opened it (see release): a lock on a
            # removed file guards nothing, so take the lock again on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (and the folder, when created here and left empty), then release the lock."""
        if self._fd is None:
            return
        # The file goes before the lock is released: a process that opened it meanwhile finds, once it holds the
        # lock, that the path no longer names its file, and starts again (see acquire).
        with contextlib.suppress(FileNotFoundError):  # removed with its folder while the run went on
            os.remove(self.path)
        if self._created:
            try:
                os.rmdir(self.out)
            except OSError:  # not empty: the run wrote there
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote in the lock file; None while it has not written it yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
