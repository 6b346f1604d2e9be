"""How the ``resemul`` command line reports a failure: one line, exit status 2 (130 when
interrupted), and a traceback only on request or for a bug.

Public: :data:`TRACEBACK_ENV`.

The rest serves :mod:`resemul_core.interfaces.cli`, which builds its parser with
``_Parser`` and ``_EPILOG`` and, in ``main``, turns an exception into a line with
``_error_message`` (``None`` for a bug, which is re-raised), names the failed command with
``_command_name`` and says what running it again will do with ``_rerun_advice``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

__all__ = ["TRACEBACK_ENV"]

#: Set to 1 to print the traceback of an expected error too (as does --verbose).
TRACEBACK_ENV = "RESEMUL_TRACEBACK"

_EPILOG = (
    "Errors are reported in one line naming the file or argument and the reason, with exit "
    "status 2 (130 when interrupted). For debugging, -v or the environment variable "
    f"{TRACEBACK_ENV}=1 also prints the traceback."
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: what is wrong and where to look."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _command_name(args: argparse.Namespace) -> str:
    """``train``, ``data prepare``, ...: the words of the command that failed."""
    action = getattr(args, "data_command", None)
    return f"{args.command} {action}" if action else args.command


def _rerun_advice(args: argparse.Namespace) -> str:
    """What running the same command again will do, after a failure or an interruption."""
    command = _command_name(args)
    if command == "data prepare":
        return "run the same command again to resume"
    if command != "train":
        return "run the same command again"
    from resemul_core.training.run_dir import LAST_CHECKPOINT, RUN_CONFIG, RUN_LOG

    out = Path(args.out)
    last = out / LAST_CHECKPOINT
    if last.is_file():
        again = "run it again without --overwrite" if args.overwrite else "run the same command"
        return f"{again} to resume from {last}"
    if not args.overwrite and any((out / name).exists() for name in (RUN_CONFIG, RUN_LOG)):
        return "run the same command with --overwrite to start over (no checkpoint was written)"
    return "run the same command again"


def _os_error_hint(err: OSError, args: argparse.Namespace) -> str:
    """A short way out of the OSErrors a user can fix: a full, read-only or size-limited disk."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        full = "full" if err.errno == errno.ENOSPC else "over its disk quota"
        return f" (the output's filesystem is {full}; free space, then {_rerun_advice(args)})"
    if err.errno == errno.EROFS:
        return " (the output's filesystem is mounted read-only; write the output elsewhere)"
    if err.errno == errno.EFBIG:
        return (
            " (the file grew larger than the filesystem or the file-size limit, ulimit -f, "
            "allows; write it elsewhere or raise the limit)"
        )
    return ""


def _os_error_message(err: OSError, args: argparse.Namespace) -> str:
    """``FILE: reason`` when the error names a file, else the reason, and a hint if any."""
    reason = err.strerror or str(err)
    if err.filename is not None:
        where = os.fsdecode(err.filename)
        if err.filename2 is not None:
            where += f" -> {os.fsdecode(err.filename2)}"
        reason = f"{where}: {reason}"
    return reason + _os_error_hint(err, args)


def _error_message(err: Exception, args: argparse.Namespace) -> str | None:
    """The one-line report of an error the user can cause, or None for a bug (a traceback).

    Expected are invalid values and files (``ValueError``, which includes unusable
    checkpoints, Keras files and audio), anything the operating system refuses (``OSError``:
    missing or existing files, permissions, a full or read-only disk) and a diverged run.
    """
    if isinstance(err, OSError):
        message = _os_error_message(err, args)
    elif isinstance(err, ValueError) or _is_training_diverged(err):
        message = str(err)
    else:
        return None
    return " ".join(message.split()) or type(err).__name__  # one line


def _is_training_diverged(err: Exception) -> bool:
    # the class is looked up, not imported: if its module was never loaded, it was not raised
    state = sys.modules.get("resemul_core.training.state")
    return state is not None and isinstance(err, state.TrainingDiverged)


def _print_traceback(args: argparse.Namespace) -> None:
    if args.verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exc()
