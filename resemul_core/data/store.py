"""The segment store: a dataset decoded once into fixed-size int16 segments on disk.

Public: :func:`open_store`, :class:`SegmentStore`, :func:`verify_store`,
:func:`write_store_from_arrays`, :func:`quantize`, :func:`dequantize`, :data:`STORE_FORMAT`,
:data:`SPLITS`; the checksums and their checks are in :mod:`resemul_core.data.integrity`.

Layout of a store directory ``STORE/``::

    segments.npy   int16 (num_clips, segments_per_clip, segment_length); unused slots are zero
    labels.npy     uint8 (num_clips, num_tags), 0/1
    clips.csv      clip_id, path, split, num_segments, digest   (row i = clip i)
    manifest.json  dataset, parameters, tags, counts, skipped inputs, fingerprint

``manifest.json`` is written last and atomically: a directory without it is an unfinished
store (see :mod:`resemul_core.data.prepare` for the resumable writer) and is refused by
:func:`open_store`.

Integrity: the manifest carries a checksum of itself and of ``clips.csv`` and ``labels.npy``,
all checked by :func:`open_store`, which also checks that ``segments.npy`` has the size its
header promises. The audio itself is covered by each clip's digest in ``clips.csv``:
:func:`verify_store` (``resemul data verify``) reads every clip back, and ``train`` checks the
clips of the splits it reads before its first step. A mismatch raises :class:`StoreCorrupted`
naming the file and the clip. Stores written before these checksums existed are checked
through their fingerprint, which covers the same two files.

Samples are stored as int16: ``q = round(clip(x, -1, 1 - 2**-15) * 32768)`` and read back as
``q / 32768``, so ``|x - q / 32768| <= 2**-16`` for ``x`` in [-1, 1 - 2**-16] and ``<= 2**-15``
for the very top of the range. Half the size of float32 (MTAT: 25 GB instead of 50 GB); the
MTAT mp3s themselves carry far less than 16 bits of precision.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resemul_core._version import __version__
from resemul_core.data.audio import LOUDNESS_FLOOR_DB, dbfs, rms
from resemul_core.data.integrity import (
    CHECKED_FILES,
    StoreCorrupted,
    check_files,
    check_segments_file,
    clip_digest,
    file_sha256,
    manifest_checksum,
    slot_problem,
    store_fingerprint,
)
from resemul_core.files import atomic_write, output_error, pwrite_all, write_json
from resemul_core.workers import available_cpus

__all__ = [
    "STORE_FORMAT",
    "SPLITS",
    "SegmentStore",
    "verify_store",
    "clip_levels_db",
    "dequantize",
    "open_store",
    "quantize",
    "write_store_from_arrays",
]

logger = logging.getLogger(__name__)

STORE_FORMAT = "resemul-segment-store"
STORE_VERSION = 1
#: The splits a store may hold, in this order.
SPLITS = ("train", "valid", "test")
CLIP_COLUMNS = ("clip_id", "path", "split", "num_segments", "digest")

_SCALE = 32768.0


def quantize(waveform: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] → int16 ``round(x * 32768)``, saturating at -32768 and 32767."""
    scaled = np.rint(np.asarray(waveform, dtype=np.float32) * np.float32(_SCALE))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def dequantize(samples: np.ndarray) -> np.ndarray:
    """int16 samples → float32 ``q / 32768`` in [-1, 1)."""
    return np.asarray(samples, dtype=np.float32) * np.float32(1.0 / _SCALE)


def clips_to_csv(clips: pd.DataFrame) -> bytes:
    """The exact bytes of ``clips.csv`` for an index frame (deterministic, ``\\n`` line ends)."""
    buffer = io.StringIO()
    clips.loc[:, list(CLIP_COLUMNS)].to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode()


class SegmentStore:
    """Read access to a complete store directory (use :func:`open_store`).

    Attributes:
        path: the store directory.
        manifest: the parsed ``manifest.json``.
        tags: tag names, the label columns in order.
        sample_rate: Hz of the stored audio.
        segment_length: samples per segment ``L``.
        segments_per_clip: slots per clip ``S`` (clips may fill fewer, see ``num_segments``).
        fingerprint: sha256 of the content (:func:`store_fingerprint`).
        clips: one row per clip, row ``i`` = clip index ``i``; columns ``clip_id`` (str),
            ``path`` (str, relative to the source root), ``split`` ('train'/'valid'/'test'),
            ``num_segments`` (int), ``digest`` (str).
        labels: ``(num_clips, num_tags)`` uint8.
        segments: ``(num_clips, S, L)`` int16 memmap, opened lazily in each process so that
            DataLoader workers forked after first use do not share a file mapping.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        params = manifest["params"]
        self.tags: list[str] = list(manifest["tags"])
        self.sample_rate = int(params["sample_rate"])
        self.segment_length = int(params["segment_length"])
        self.segments_per_clip = int(params["segments_per_clip"])
        self.fingerprint: str = manifest["fingerprint"]
        self.clips = pd.read_csv(
            self.path / "clips.csv",
            dtype={
                "clip_id": str,
                "path": str,
                "split": str,
                "num_segments": np.int64,
                "digest": str,
            },
            keep_default_na=False,
        )
        self.labels: np.ndarray = np.load(self.path / "labels.npy")
        self._segments: np.ndarray | None = None
        self._segments_pid: int | None = None
        self._verified: set[int] = set()
        n = int(manifest["num_clips"])
        if len(self.clips) != n or self.labels.shape != (n, len(self.tags)):
            raise ValueError(
                f"{self.path}: inconsistent store: manifest says {n} clips × {len(self.tags)} tags,"
                f" clips.csv has {len(self.clips)} rows, labels.npy has shape {self.labels.shape}"
            )

    @property
    def num_clips(self) -> int:
        return len(self.clips)

    def verify_clips(self, indices: Sequence[int] | None = None, *, progress: bool = False) -> int:
        """Read clips back and check them against their digests (all clips by default).

        Clips checked once by this object are not read again. Hashing runs in up to 8
        threads (hashlib releases the GIL): about 0.9 GB/s per core, so MTAT's 25 GB take
        half a minute on one core (``bench/verify_speed.py``).

        Returns:
            The number of clips read.

        Raises:
            StoreCorrupted: naming ``segments.npy`` and the first clip that differs.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        todo = [int(i) for i in (range(self.num_clips) if indices is None else indices)]
        todo = [i for i in todo if i not in self._verified]
        segments = self.segments
        digests = self.clips["digest"].to_numpy()

        def problem(i: int) -> str | None:
            return slot_problem(
                segments[i].tobytes(), self.num_segments(i), self.segment_length, str(digests[i])
            )

        threads = min(8, available_cpus())
        bar = tqdm(total=len(todo), desc="verify", unit="clip", disable=not progress, leave=False)
        with ThreadPoolExecutor(threads) as pool, bar:
            for i, found in zip(todo, pool.map(problem, todo), strict=True):
                if found is not None:
                    raise StoreCorrupted(
                        f"{self.path / 'segments.npy'}: clip {i} ({self.clips['clip_id'].iat[i]})"
                        f" is damaged: {found}; the store no longer holds what was prepared: "
                        f"prepare it again (resemul data prepare ... --overwrite)"
                    )
                self._verified.add(i)
                bar.update(1)
        return len(todo)

    @property
    def num_tags(self) -> int:
        return len(self.tags)

    @property
    def segments(self) -> np.ndarray:
        if self._segments is None or self._segments_pid != os.getpid():
            array = np.load(self.path / "segments.npy", mmap_mode="r")
            expected = (self.num_clips, self.segments_per_clip, self.segment_length)
            if array.shape != expected or array.dtype != np.int16:
                raise ValueError(
                    f"{self.path / 'segments.npy'}: expected int16 {expected},"
                    f" found {array.dtype} {array.shape}"
                )
            self._segments, self._segments_pid = array, os.getpid()
        return self._segments

    def __getstate__(self) -> dict[str, Any]:
        # A memmap must not travel to another process (spawned DataLoader workers): reopen there.
        state = dict(self.__dict__)
        state["_segments"] = state["_segments_pid"] = None
        return state

    def __repr__(self) -> str:
        counts = self.clips["split"].value_counts()
        parts = ", ".join(f"{s}={counts.get(s, 0)}" for s in SPLITS)
        return f"SegmentStore({str(self.path)!r}, {self.manifest['dataset']}, clips: {parts})"

    def split_indices(self, split: str) -> np.ndarray:
        """Clip indices of ``split`` in ascending order, ``(n,)`` int64."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return np.flatnonzero(self.clips["split"].to_numpy() == split).astype(np.int64)

    def num_segments(self, i: int) -> int:
        """Number of filled segment slots of clip ``i``."""
        return int(self.clips["num_segments"].iat[i])

    def read_clip(self, i: int) -> np.ndarray:
        """All stored segments of clip ``i``: ``(num_segments_i, L)`` float32 in [-1, 1)."""
        return dequantize(self.segments[i, : self.num_segments(i)])

    def audio_path(self, i: int) -> Path:
        """The audio file clip ``i`` was prepared from (where it was at prepare time)."""
        root = Path(self.manifest.get("source", {}).get("root", "."))
        return root / str(self.clips["path"].iat[i])

    def read_segment(self, i: int, j: int) -> np.ndarray:
        """Segment ``j`` of clip ``i``: ``(L,)`` float32 in [-1, 1)."""
        n = self.num_segments(i)
        if not 0 <= j < n:
            raise IndexError(f"clip {i} has {n} segments, asked for segment {j}")
        return dequantize(self.segments[i, j])


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and check ``STORE/manifest.json``; ValueError naming the file if unusable."""
    file = path / "manifest.json"
    if not file.is_file():
        raise ValueError(
            f"{path}: not a complete segment store (no manifest.json); an interrupted"
            " 'resemul data prepare' resumes when run again with the same arguments"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorrupted(f"{file}: malformed manifest: {err}") from err
    # Stores of this version carry both; one without the other is a damaged key.
    if isinstance(manifest, dict) and ("manifest_sha256" in manifest or "files" in manifest):
        if manifest.get("manifest_sha256") != manifest_checksum(manifest):
            raise StoreCorrupted(
                f"{file} does not match its own checksum: it was edited or damaged after "
                f"prepare; prepare the store again"
            )
    required = ("format", "dataset", "params", "tags", "num_clips", "fingerprint")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ValueError(f"{file}: malformed manifest: missing {', '.join(missing)}")
    if manifest["format"] != STORE_FORMAT:
        raise ValueError(f"{file}: not a segment store manifest (format {manifest['format']!r})")
    params = manifest["params"]
    for key in ("sample_rate", "segment_length", "segments_per_clip"):
        if not isinstance(params, dict) or key not in params:
            raise ValueError(f"{file}: malformed manifest: params lack {key!r}")
    return manifest


def open_store(path: str | os.PathLike) -> SegmentStore:
    """Open a complete store directory for reading.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``manifest.json`` is missing (unfinished store), malformed, or the files
            disagree with it; the message names the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a segment store directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such segment store directory")
    manifest = read_manifest(path)
    check_files(path, manifest)
    store = SegmentStore(path, manifest)
    check_segments_file(
        path / "segments.npy", (store.num_clips, store.segments_per_clip, store.segment_length)
    )
    return store


def verify_store(path: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
    """Check a whole store against its checksums: manifest, index, labels and every clip.

    Returns:
        ``{"path", "clips", "segments", "fingerprint"}`` of the verified store.

    Raises:
        StoreCorrupted: the first damage found, naming the file (and clip).
        ValueError / FileNotFoundError: not a (complete) store.
    """
    store = open_store(path)
    store.verify_clips(progress=progress)
    return {
        "path": str(store.path),
        "clips": store.num_clips,
        "segments": int(store.clips["num_segments"].sum()),
        "fingerprint": store.fingerprint,
    }


def split_counts(clips: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{split: {"clips": n, "segments": m}}`` for every split in :data:`SPLITS`."""
    return {
        s: {
            "clips": int((clips["split"] == s).sum()),
            "segments": int(clips.loc[clips["split"] == s, "num_segments"].sum()),
        }
        for s in SPLITS
    }


def finish_store(
    out: Path,
    *,
    dataset: str,
    params: dict[str, Any],
    tags: Sequence[str],
    clips: pd.DataFrame,
    labels: np.ndarray,
    skipped: Sequence[dict[str, Any]] = (),
    source: dict[str, Any] | None = None,
) -> SegmentStore:
    """Write ``clips.csv``, ``labels.npy``, then ``manifest.json`` next to ``segments.npy``."""
    csv_bytes = clips_to_csv(clips)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    with atomic_write(out / "clips.csv") as handle:
        handle.write(csv_bytes)
    with atomic_write(out / "labels.npy") as handle:
        np.save(handle, labels)
    reasons: dict[str, int] = {}
    for item in skipped:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "dataset": dataset,
        "library_version": __version__,
        "params": params,
        "source": source or {},
        "tags": list(tags),
        "num_clips": len(clips),
        "counts": split_counts(clips),
        "fingerprint": store_fingerprint(
            dataset=dataset, params=params, tags=tags, clips_csv=csv_bytes, labels=labels
        ),
        "skip_counts": reasons,
        "skipped": list(skipped),
        "files": {name: file_sha256(out / name) for name in CHECKED_FILES},
    }
    manifest["manifest_sha256"] = manifest_checksum(json.loads(json.dumps(manifest)))
    write_json(out / "manifest.json", manifest)
    logger.info(
        "store %s complete: %d clips, fingerprint %s", out, len(clips), manifest["fingerprint"][:12]
    )
    return open_store(out)


def write_store_from_arrays(
    out: str | os.PathLike,
    *,
    waveforms: Sequence[np.ndarray],
    labels: np.ndarray,
    splits: Sequence[str],
    tags: Sequence[str],
    clip_ids: Sequence[str] | None = None,
    sample_rate: int = 22_050,
    dataset: str = "arrays",
) -> SegmentStore:
    """Write a store from in-memory segments (tests, toy data); same format as a prepared store.

    Args:
        out: store directory (created; an existing store there is replaced).
        waveforms: per clip, ``(n_seg_i, L)`` float32 segments in [-1, 1]; all with the same
            ``L``. ``segments_per_clip`` becomes ``max(n_seg_i)``. Read clip by clip (twice:
            shapes first), so a sequence that makes its clips on demand keeps memory at one
            clip's worth.
        labels: ``(num_clips, num_tags)`` 0/1.
        splits: per clip, one of 'train', 'valid', 'test'.
        tags: ``num_tags`` tag names.
        clip_ids: per clip id (default ``"0"``, ``"1"``, ...).
        sample_rate: Hz, recorded in the manifest.
        dataset: name recorded in the manifest.
    """
    out = Path(out)
    n = len(waveforms)
    labels = np.asarray(labels)
    if n == 0:
        raise ValueError("write_store_from_arrays needs at least one clip")
    if labels.shape != (n, len(tags)):
        raise ValueError(f"labels: expected shape ({n}, {len(tags)}), found {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    if len(splits) != n or (clip_ids is not None and len(clip_ids) != n):
        raise ValueError(f"{n} waveforms but {len(splits)} splits / clip_ids of another length")
    bad = sorted({s for s in splits if s not in SPLITS})
    if bad:
        raise ValueError(f"unknown split(s) {bad}; valid splits: {', '.join(SPLITS)}")
    shapes = [np.shape(w) for w in waveforms]
    if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) != 1:
        raise ValueError(f"waveforms must all be (n_seg, L) with one L, found {shapes}")
    length = shapes[0][1]
    per_clip = max(s[0] for s in shapes)
    ids = [str(c) for c in clip_ids] if clip_ids is not None else [str(i) for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    # Quantised clip by clip into a sparse temporary file, then renamed into place: memory
    # holds one clip at a time, never a second copy of every waveform (the same bytes as
    # np.save of the whole array; unwritten slots read as 0). Slots are written with checked
    # pwrites, not through a memory map, whose writes to a full disk end the process (SIGBUS).
    tmp = out / ".segments.npy.tmp"
    target = out / "segments.npy"
    digests = []
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype="<i2", shape=(n, per_clip, length))
        offset, slot_bytes = header.offset, per_clip * length * 2
        del header
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for i, w in enumerate(waveforms):
                q = quantize(w)
                pwrite_all(fd, q.astype("<i2").tobytes(), offset + i * slot_bytes, path=target)
                digests.append(clip_digest(q))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise output_error(err, target) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    clips = pd.DataFrame(
        {
            "clip_id": ids,
            "path": ids,
            "split": list(splits),
            "num_segments": [s[0] for s in shapes],
            "digest": digests,
        }
    )
    params = {"sample_rate": sample_rate, "segment_length": length, "segments_per_clip": per_clip}
    return finish_store(out, dataset=dataset, params=params, tags=tags, clips=clips, labels=labels)


def clip_levels_db(store: SegmentStore, *, floor_db: float = LOUDNESS_FLOOR_DB) -> pd.DataFrame:
    """Loudness of every stored clip: RMS level over its stored segments, in dBFS.

    The measure is :func:`~resemul_core.data.audio.rms` over all of the clip's stored samples,
    then :func:`~resemul_core.data.audio.dbfs`: the same as the excitation analysis' per-segment
    loudness, with the same floor; a clip without segments reads as ``floor_db``.

    Returns:
        Columns ``clip_id``, ``split``, ``rms_db`` and, where the store has them, the 0/1
        ``loud`` and ``quiet`` tags.
    """
    levels = []
    for i in range(store.num_clips):
        samples = store.read_clip(i)
        levels.append(
            float(dbfs(rms(samples, axis=None) if samples.size else 0.0, floor_db=floor_db))
        )
    frame = store.clips[["clip_id", "split"]].copy()
    frame["rms_db"] = levels
    for tag in ("loud", "quiet"):
        if tag in store.tags:
            frame[tag] = store.labels[:, store.tags.index(tag)]
    return frame
