"""The files of an unfinished store: the preallocated segments file, its slots, the journal.

Public: :func:`allocate_segments`, :func:`read_journal`, :func:`compact_slots`,
:func:`damaged_slots`, :func:`npy_header`.

:mod:`resemul_core.data.prepare` decodes clip ``i`` into slot ``i`` of a sparse, preallocated
``segments.npy`` and journals each clip after its slot is on disk; these functions read the
journal back, check slots against their digests, and turn the slotted file into the final
array (holes of skipped clips filled, header rewritten, file truncated). Every write is
checked (:func:`resemul_core.files.pwrite_all`) and an ``OSError`` names the file.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from resemul_core.data.integrity import slot_problem
from resemul_core.files import output_error, pwrite_all, write_text

__all__ = ["allocate_segments", "compact_slots", "damaged_slots", "npy_header", "read_journal"]

logger = logging.getLogger(__name__)


def read_journal(path: Path, num_clips: int) -> dict[int, dict[str, Any]]:
    """Complete journal entries by clip index; a torn last line is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    if torn:
        logger.info("%s: ignoring a torn last line (%d bytes)", path, len(torn))
        with open(path, "r+b") as handle:
            handle.truncate(len(data) - len(torn))
    entries: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        try:
            entry = json.loads(line)
            index = int(entry["i"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: line {number} is corrupt ({err}); delete {path.parent.parent} and"
                " prepare again"
            ) from err
        if not 0 <= index < num_clips:
            raise ValueError(f"{path}: line {number}: clip index {index} out of range")
        entries[index] = entry
    return entries


def npy_header(shape: tuple[int, ...], offset: int) -> bytes:
    """A version-1.0 ``.npy`` header for little-endian int16 ``shape``, exactly ``offset`` bytes."""
    text = f"{{'descr': '<i2', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    padding = offset - 10 - len(text) - 1
    if padding < 0:
        raise ValueError(f"npy header for shape {shape} does not fit in {offset} bytes")
    return (
        b"\x93NUMPY\x01\x00"
        + struct.pack("<H", offset - 10)
        + (text + " " * padding + "\n").encode()
    )


def allocate_segments(path: Path, shape: tuple[int, int, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype="<i2", shape=shape)
        del array  # the file is sparse: unwritten slots read as zeros
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise output_error(err, path) from err


def compact_slots(
    out: Path,
    work: Path,
    entries: dict[int, dict[str, Any]],
    shape: tuple[int, int, int],
    offset: int,
) -> list[int]:
    """Fill the holes of skipped clips with the last kept clips; return the final clip order."""
    kept = sorted(i for i, e in entries.items() if e["status"] == "ok")
    n_kept = len(kept)
    holes = sorted(i for i, e in entries.items() if e["status"] != "ok" and i < n_kept)
    tail = [i for i in kept if i >= n_kept]
    order = list(range(n_kept))
    for hole, source in zip(holes, tail, strict=True):
        order[hole] = source
    slot_bytes = shape[1] * shape[2] * 2
    marker = work / "compacted"
    path = out / "segments.npy"
    if not marker.exists():
        fd = os.open(path, os.O_RDWR)
        try:
            for hole, source in zip(holes, tail, strict=True):
                data = os.pread(fd, slot_bytes, offset + source * slot_bytes)
                if len(data) != slot_bytes:
                    raise ValueError(f"{path}: clip {source}'s slot is cut short; delete {out}")
                pwrite_all(fd, data, offset + hole * slot_bytes, path=path)
            os.fsync(fd)
        except OSError as err:
            raise output_error(err, path) from err
        finally:
            os.close(fd)
        write_text(marker, f"{n_kept}\n")
    fd = os.open(path, os.O_RDWR)
    try:
        pwrite_all(fd, npy_header((n_kept, shape[1], shape[2]), offset), 0, path=path)
        os.ftruncate(fd, offset + n_kept * slot_bytes)
        os.fsync(fd)
    except OSError as err:
        raise output_error(err, path) from err
    finally:
        os.close(fd)
    return order


def damaged_slots(
    path: Path, offset: int, slots: dict[int, dict[str, Any]], shape: tuple[int, int, int]
) -> list[int]:
    """The slots (keys of ``slots``: slot index -> journal entry) whose bytes in ``path`` do
    not hold what the entry says was written: wrong digest or non-zero padding."""
    slot_bytes = shape[1] * shape[2] * 2
    damaged = []
    with open(path, "rb") as handle:
        for slot, entry in sorted(slots.items()):
            handle.seek(offset + slot * slot_bytes)
            data = handle.read(slot_bytes)
            if slot_problem(data, int(entry["n"]), shape[2], entry["digest"]) is not None:
                damaged.append(slot)
    return damaged
