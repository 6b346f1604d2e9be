"""One writer per output directory: an advisory lock file naming its owner.

Public: :func:`directory_lock`, :class:`DirectoryBusy`, :data:`LOCK_FILE`.

``data prepare`` holds its store's lock and ``train`` its run directory's for as long as they
write, so that a second process aimed at the same directory stops at once with a sentence
naming the owner, instead of interleaving its files with the first one's.

The lock is ``fcntl.flock`` on ``DIR/.lock``, which also holds the owner's pid, host, command
and start time for the error message. The kernel drops a ``flock`` when its process dies, so a
lock left by a killed process is stale by construction: the next writer takes it over (and
logs whose it was). The file itself stays (deleting a locked file races with a second opener);
its content is cleared on release. ``flock`` is reliable on local filesystems; on network
filesystems it depends on the server (NFSv4 maps it to byte-range locks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from resemul_core.files import output_error

__all__ = ["LOCK_FILE", "DirectoryBusy", "directory_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"

#: Descriptors of the locks this process holds. A forked child (a decoding worker, a
#: DataLoader worker) inherits them, and a ``flock`` lives as long as any copy is open: an
#: orphaned child would keep a dead parent's directory locked. Children close their copies.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # the parent's copy keeps the lock; this one must not outlive it
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class DirectoryBusy(OSError):
    """Another live process holds the directory's lock; the message names it.

    An ``OSError`` (without errno or filename: the message says it all), so that every front
    door that reports failed file operations in one line reports this one too.
    """


def _owner(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    since = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"({owner.get('command', '?')}, since {when})"
    )


def _acquire(fd: int, directory: Path, path: Path, purpose: str) -> None:
    """``flock`` ``fd`` or raise :class:`DirectoryBusy` naming the holder. A holder that has
    locked but not yet written its name, or has just released and cleared it, leaves the file
    empty for a moment: try again briefly before calling it busy."""
    owner: dict = {}
    for _ in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            owner = _owner(fd)
            if owner:
                break
            time.sleep(0.05)
    raise DirectoryBusy(
        f"{directory} is in use by {_describe(owner)}, which holds its lock {path}; wait for "
        f"it to finish or stop it, then run {purpose} again"
    )


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold ``directory``'s lock (creating the directory) while the block runs.

    Args:
        directory: the store or run directory.
        purpose: what the holder does, for the other process's error ("data prepare").

    Raises:
        DirectoryBusy: a live process holds it; the message names the directory, that
            process (pid, host, command, start time) and the lock file.
        OSError: the directory or lock file cannot be created (naming it).
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    created = not directory.exists()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, directory) from err
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise output_error(err, path) from err
    try:
        _acquire(fd, directory, path, purpose)
        stale = _owner(fd)
        if stale:
            logger.warning(
                "%s: taking over the lock of %s, which is no longer running",
                directory,
                _describe(stale),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": purpose,
            "argv": sys.argv[:8],
            "started": round(time.time(), 3),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        _HELD.add(fd)
        try:
            yield directory
        finally:
            _HELD.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released cleanly: nothing stale for the next writer
                if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                    path.unlink()  # a refused command leaves no directory behind
                    directory.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
