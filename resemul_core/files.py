"""Checked, atomic file writes: a reader never sees a half-written file, even after SIGKILL.

Public: :func:`atomic_write`, :func:`write_json`, :func:`write_text`, :func:`pwrite_all`,
:func:`output_error`, :func:`current_umask`.

Every writer goes to a temporary file in the destination's directory, is flushed and
fsync'ed, then renamed over the destination (``os.replace`` is atomic on POSIX) and the
directory is fsync'ed, so that the rename itself survives a power cut. The file gets the mode
an ordinary ``open`` would give it (``0o666`` less the umask), so a shared group can read
stores and runs. A failed write (disk full, read-only filesystem, file too large) raises an
``OSError`` whose ``filename`` is the destination, never the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "current_umask",
    "output_error",
    "pwrite_all",
    "write_json",
    "write_text",
]


def current_umask() -> int:
    """The process's umask, read without changing it (Linux: ``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def output_error(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` as an ``OSError`` of the same errno that names ``path`` (the file being written)."""
    if err.errno is None:
        return OSError(errno.EIO, str(err), str(path))
    return OSError(err.errno, os.strerror(err.errno), str(path))


def pwrite_all(fd: int, data: bytes, offset: int, *, path: str | os.PathLike) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``, or raise.

    ``os.pwrite`` may write fewer bytes than asked (a full disk, a file-size limit, a signal);
    the rest is retried, and a write that makes no progress is an ``OSError(ENOSPC)``.

    Raises:
        OSError: naming ``path``, with the errno of the failure.
    """
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            written = os.pwrite(fd, view[done:], offset + done)
        except OSError as err:
            raise output_error(err, path) from err
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        done += written


#: What a filesystem that cannot sync directories answers: nothing to do there.
_NO_DIRECTORY_SYNC = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES, errno.EISDIR}


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIRECTORY_SYNC:  # EIO, ENOSPC: the rename may not be durable
            raise output_error(err, path) from err
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` keeps its old content. An
    ``OSError`` of the writing (ENOSPC, EROFS, EFBIG, ...) is raised naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(err, path) from err
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename in (None, tmp):
            raise output_error(err, path) from err
        raise
    _fsync_directory(path.parent)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented UTF-8 JSON."""
    with atomic_write(path, mode="w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8)."""
    with atomic_write(path, mode="w") as handle:
        handle.write(text)
