"""Outputs that are complete or absent: written under a temporary name beside the target, renamed when complete.

A file or folder ``DIR/NAME`` is written as ``DIR/.NAME.partial-PID-XXXX`` (same file system, so the
rename is atomic), fsynced, then renamed to ``NAME``. A crash or kill midway leaves the previous
``NAME`` as it was (or none) and a hidden partial, which the next write of ``NAME`` removes once the
process that wrote it (``PID``) is gone; a write still under way in another process is left alone.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

PARTIAL = ".partial-"


def _partial_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}{PARTIAL}"


def _own_prefix(path: str) -> str:
    return f"{_partial_prefix(path)}{os.getpid()}-"


def _writer_alive(name: str, prefix: str) -> bool:
    """Whether the process that named the partial ``name`` still runs (names without a process id: no)."""
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, running
        pass
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """Flush a file's or folder's entry to disk (a folder: the names in it, so that a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(path: str) -> None:
    """Remove what writes of ``path`` killed midway left beside it (partials of writers still running stay)."""
    parent, prefix = os.path.dirname(os.path.abspath(path)), _partial_prefix(path)
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(prefix) and not _writer_alive(name, prefix):
            stale = os.path.join(parent, name)
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)


def write_file(path: str, write: Callable[[str], object]) -> str:
    """Call ``write(temporary path)`` and rename its file to ``path`` once it returns; returns ``path``.

    The temporary name keeps ``path``'s suffix (matplotlib picks the format from it). If ``write``
    raises, or the process dies, ``path`` is the previous file or absent, never a partial one.

    Raises:
        ValueError: ``path`` is an existing folder.
    """
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give a file name.")
    parent = os.path.dirname(os.path.abspath(path))
    remove_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=_own_prefix(path), suffix=os.path.splitext(path)[1], dir=parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the result is an ordinary file
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(parent)
    return path


def write_text(path: str, text: str) -> str:
    """``write_file`` for a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return write_file(path, write)


@contextlib.contextmanager
def folder(path: str) -> Iterator[str]:
    """Yield an empty temporary folder beside ``path``; when the block ends without error it becomes ``path``.

    An existing ``path`` folder is replaced only then (moved aside, the new one renamed in, the old one
    removed), so a kill leaves the previous complete folder, or no folder; never a partial one. On an
    error the temporary folder is removed and ``path`` is left as it was.

    Raises:
        ValueError: ``path`` is an existing file.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is an existing file, not a folder; give a folder path.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_partials(path)
    staging = tempfile.mkdtemp(prefix=_own_prefix(path), dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private; the result is an ordinary folder
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                fsync_path(os.path.join(root, name))
        fsync_path(staging)
        _replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(parent)


def _replace_folder(staging: str, path: str) -> None:
    try:
        os.replace(staging, path)  # no `path`, or an empty one
        return
    except OSError:
        if not os.path.isdir(path):
            raise
    # A folder cannot replace a non-empty one in one rename: move the old one aside under a partial
    # name (a kill right here leaves no `path`, and the next write removes the old one).
    old = tempfile.mkdtemp(prefix=_own_prefix(path), dir=os.path.dirname(os.path.abspath(path)))
    os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
