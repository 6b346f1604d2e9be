"""Worker processes that never outlive the process that started them.

Public: :func:`exit_with_parent`, :func:`available_cpus`.

A ``ProcessPoolExecutor`` worker whose parent is SIGKILLed stays alive, blocked on its task
pipe, holding its memory and open files (a deleted ``segments.npy``, a directory lock) for
as long as nobody notices. Every pool of this library runs :func:`exit_with_parent` in its
workers' initializer: a daemon thread that ends the worker once it has been re-parented.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["available_cpus", "exit_with_parent"]

#: How often a worker looks at its parent, seconds: the longest an orphan lives.
POLL_SECONDS = 0.5


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _watch(parent: int, poll_seconds: float) -> None:
    while True:
        time.sleep(poll_seconds)
        if os.getppid() != parent:  # re-parented to init or a subreaper: the parent died
            os._exit(1)  # no cleanup: the parent's resume redoes whatever was unfinished


def exit_with_parent(parent: int | None = None, *, poll_seconds: float = POLL_SECONDS) -> None:
    """End this process within ``poll_seconds`` of its parent's death (call it in a worker).

    Args:
        parent: the pid to outlive no longer; default ``os.getppid()`` now. A pool's
            initializer should pass the pid of the process that built the pool, read there,
            so that a parent that died before the worker started is caught too.
    """
    parent = os.getppid() if parent is None else parent
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(
        target=_watch, args=(parent, poll_seconds), name="exit-with-parent", daemon=True
    ).start()
