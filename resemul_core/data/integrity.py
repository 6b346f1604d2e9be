"""What makes a segment store trustworthy: digests, checksums and the checks that use them.

Public: :class:`StoreCorrupted`, :func:`clip_digest`, :func:`slot_problem`,
:func:`store_fingerprint`, :func:`manifest_checksum`, :func:`file_sha256`,
:func:`check_files`, :func:`check_segments_file`, :data:`CHECKED_FILES`.

Three layers, from cheap to complete (:mod:`resemul_core.data.store` applies them):

- ``manifest.json`` carries a sha256 of its own content (:func:`manifest_checksum`) and of
  ``clips.csv`` and ``labels.npy`` (:data:`CHECKED_FILES`); stores written before these
  existed are checked against their fingerprint, which covers the same two files.
- ``segments.npy`` must have numpy's canonical header for the manifest's shape and exactly
  the size that shape needs (:func:`check_segments_file`).
- each clip's slot must hash to the blake2b digest in ``clips.csv`` and its unused segment
  slots must be zero (:func:`slot_problem`); reading every clip is the expensive part, done
  by ``resemul data verify``, before ``prepare`` calls a store complete, and for the clips
  ``train`` and ``evaluate`` read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKED_FILES",
    "StoreCorrupted",
    "check_files",
    "check_segments_file",
    "clip_digest",
    "file_sha256",
    "manifest_checksum",
    "slot_problem",
    "store_fingerprint",
]

#: Files whose sha256 the manifest records (``manifest["files"]``).
CHECKED_FILES = ("clips.csv", "labels.npy")


class StoreCorrupted(ValueError):
    """A store file does not hold what was written; the message names the file (and clip)."""


def clip_digest(segments: np.ndarray) -> str:
    """Content hash (blake2b-128 hex) of one clip's stored int16 segments ``(n_seg, L)``."""
    return hashlib.blake2b(
        np.ascontiguousarray(segments, dtype="<i2").tobytes(), digest_size=16
    ).hexdigest()


def store_fingerprint(
    *,
    dataset: str,
    params: dict[str, Any],
    tags: Sequence[str],
    clips_csv: bytes,
    labels: np.ndarray,
) -> str:
    """sha256 over what defines a store's content: dataset, parameters, tags, index, labels.

    The index (``clips.csv``) holds each clip's segment digest, so the audio is covered too.
    The source location and the library version are left out: moving the data or upgrading
    the library does not change the fingerprint of identical content.
    """
    head = json.dumps({"dataset": dataset, "params": params, "tags": list(tags)}, sort_keys=True)
    digest = hashlib.sha256(head.encode())
    digest.update(clips_csv)
    digest.update(str(labels.shape).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def slot_problem(data: bytes, num_segments: int, segment_length: int, digest: str) -> str | None:
    """Why one clip's slot (its raw little-endian int16 bytes) is not what was written, or
    ``None``: the first ``num_segments`` segments must hash to ``digest`` (:func:`clip_digest`)
    and the unused slots must be zero."""
    filled = num_segments * segment_length * 2
    if len(data) < filled:
        return f"{len(data)} bytes where {filled} were written"
    if hashlib.blake2b(data[:filled], digest_size=16).hexdigest() != digest:
        return "its audio does not match its digest"
    padding = data[filled:]
    if padding.count(0) != len(padding):
        return "its unused segment slots are not zero"
    return None


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own checksum entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """``clips.csv`` and ``labels.npy`` against their checksums in the manifest (or, for a
    store written before those existed, against the fingerprint that covers both)."""
    for name in CHECKED_FILES:
        if not (path / name).is_file():
            raise StoreCorrupted(f"{path / name} is missing: the store is incomplete or damaged")
    recorded = manifest.get("files")
    if isinstance(recorded, dict):
        for name in CHECKED_FILES:
            if file_sha256(path / name) != recorded.get(name):
                raise StoreCorrupted(
                    f"{path / name} does not match its checksum in manifest.json: the file was "
                    f"changed or damaged after prepare; prepare the store again"
                )
        return
    try:
        labels = np.load(path / "labels.npy", allow_pickle=False)
        fingerprint = store_fingerprint(
            dataset=manifest["dataset"],
            params=manifest["params"],
            tags=manifest["tags"],
            clips_csv=(path / "clips.csv").read_bytes(),
            labels=labels,
        )
    except (OSError, ValueError) as err:
        raise StoreCorrupted(f"{path / 'labels.npy'} cannot be read: {err}") from err
    if fingerprint != manifest["fingerprint"]:
        raise StoreCorrupted(
            f"{path}: clips.csv or labels.npy does not match the fingerprint in manifest.json: "
            f"a file was changed or damaged after prepare; prepare the store again"
        )


def check_segments_file(file: Path, expected: tuple[int, int, int]) -> None:
    """``segments.npy`` must exist with numpy's header for int16 ``expected`` and the size
    that shape needs (a cut-off file would otherwise pass until a memory map of it fails)."""
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
            handle.seek(0)
            header = handle.read(offset)
        size = os.stat(file).st_size
    except FileNotFoundError:
        raise StoreCorrupted(f"{file} is missing: the store is incomplete") from None
    except Exception as err:  # numpy's header parser fails with several exception types
        raise StoreCorrupted(f"{file}: not a readable .npy file ({err})") from err
    if tuple(shape) != expected or dtype != np.dtype("<i2") or fortran:
        raise StoreCorrupted(
            f"{file}: expected int16 {expected} as manifest.json says, found {dtype} {shape}"
        )
    # numpy writes one canonical header per shape; another one that parses the same
    # (a flipped '<' to '=', a space to a form feed) is damage too
    canonical = io.BytesIO()
    write_header = (
        np.lib.format.write_array_header_1_0
        if version == (1, 0)
        else np.lib.format.write_array_header_2_0
    )
    write_header(canonical, {"descr": "<i2", "fortran_order": False, "shape": expected})
    if header != canonical.getvalue():
        raise StoreCorrupted(f"{file}: its .npy header is damaged ({header[10:80]!r})")
    needed = offset + int(np.prod(expected)) * 2
    if size != needed:
        raise StoreCorrupted(
            f"{file} is {size:,} bytes, but its {expected} int16 segments need {needed:,}: the "
            f"file was cut short or damaged; prepare the store again"
        )
