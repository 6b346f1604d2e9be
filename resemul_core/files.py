"""Atomic file writes: a reader never sees a half-written file, even after SIGKILL.

Public: :func:`atomic_write`, :func:`write_json`, :func:`write_text`.

Every writer goes to a temporary file in the destination's directory, is flushed and
fsync'ed, then renamed over the destination (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented UTF-8 JSON."""
    with atomic_write(path, mode="w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8)."""
    with atomic_write(path, mode="w") as handle:
        handle.write(text)
