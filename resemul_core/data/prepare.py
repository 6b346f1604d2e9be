"""Decode a dataset into a segment store: parallel, interruptible at any moment, resumable.

Public: :func:`prepare_store`, :func:`store_summary`.

How a run survives SIGKILL and resumes to a byte-identical store:

1. ``STORE/.prepare/plan.json`` fixes the work: parameters, clips, labels, dropped clips. It
   is written atomically after ``STORE/segments.npy``, preallocated (sparse) with one
   ``(segments_per_clip, segment_length)`` slot per planned clip. A rerun with a different
   plan is refused rather than mixed in.
2. Workers decode clip ``i`` and write its slot with ``pwrite`` + ``fdatasync``; only then does
   the parent append clip ``i``'s line to ``STORE/.prepare/journal.jsonl`` (ok + segment
   count + digest, or skip + reason). A torn last line is ignored and cut off on resume;
   clips without a journal line are redone, overwriting whatever their slot held.
3. Skipped clips leave holes; the last kept clips are copied into them (sources lie beyond
   the final length and are never overwritten, so the copy can be redone after a crash; a
   marker file records that it is complete), the ``.npy`` header is rewritten with the final
   shape and the file truncated. Then ``clips.csv``, ``labels.npy`` and, last,
   ``manifest.json`` (see :mod:`resemul_core.data.store`).

4. Before the manifest is written every slot is read back against its digest (a slot a
   failing disk lost is decoded again, once), so a store never calls itself complete over
   data it does not hold. The slot file's helpers are in :mod:`resemul_core.data.slots`.

Everything written depends only on the plan and the audio, never on timing or worker count.
Writes are checked (a full disk stops the run naming the output file, and the same call
resumes), ``STORE/.lock`` keeps a second process out (:mod:`resemul_core.locks`), workers die
with their parent (:mod:`resemul_core.workers`), and ``--out`` must be new, empty or a store
this module wrote: files it did not write are never replaced.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from resemul_core.data.audio import (
    CLIP_DURATION,
    SAMPLE_RATE,
    SEGMENT_LENGTH,
    SEGMENTS_PER_CLIP,
    AudioDecodeError,
    load_audio,
    segment_waveform,
)
from resemul_core.data.integrity import clip_digest
from resemul_core.data.metadata import Source
from resemul_core.data.slots import (
    allocate_segments,
    compact_slots,
    damaged_slots,
    read_journal,
)
from resemul_core.data.store import (
    SPLITS,
    STORE_FORMAT,
    SegmentStore,
    finish_store,
    open_store,
    quantize,
)
from resemul_core.files import atomic_write, output_error, pwrite_all, write_json
from resemul_core.locks import LOCK_FILE, directory_lock
from resemul_core.workers import exit_with_parent

__all__ = ["prepare_store", "store_summary"]

logger = logging.getLogger(__name__)

WORK_DIR = ".prepare"
#: Clips submitted to each worker process ahead of the results: enough to keep workers busy,
#: few enough that the parent's memory does not grow with the number of clips.
IN_FLIGHT_PER_WORKER = 8
_STORE_FILES = ("manifest.json", "clips.csv", "labels.npy", "segments.npy")


def _plan(source: Source, params: dict[str, Any]) -> dict[str, Any]:
    """Everything the store's content depends on, as plain JSON values."""
    plan = {
        "dataset": source.dataset,
        "root": str(Path(source.root).resolve()),
        "options": source.options,
        "params": params,
        "tags": list(source.tags),
        "clips": source.clips.loc[:, ["clip_id", "path", "split"]].values.tolist(),
        "labels": ["".join(map(str, row)) for row in source.labels.astype(int).tolist()],
        "dropped": source.dropped,
    }
    return json.loads(json.dumps(plan))


def _plan_digest(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


# --- worker side: decode one clip and write its slot -------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(segments_path: str, offset: int, params: dict[str, Any]) -> None:
    _WORKER.update(
        fd=os.open(segments_path, os.O_WRONLY), path=segments_path, offset=offset, params=params
    )


def _init_pool_worker(parent: int, *args: Any) -> None:
    exit_with_parent(parent)  # a SIGKILLed parent must not leave its workers behind
    _init_worker(*args)


def _process_clip(index: int, path: str) -> dict[str, Any]:
    """Decode clip ``index`` into its slot; the journal entry describing the outcome."""
    p = _WORKER["params"]
    rate, length, per_clip = p["sample_rate"], p["segment_length"], p["segments_per_clip"]
    try:
        if os.path.getsize(path) == 0:
            return {"i": index, "status": "skip", "reason": "empty", "detail": "0-byte file"}
    except FileNotFoundError:
        return {"i": index, "status": "skip", "reason": "missing file", "detail": path}
    needed = p["min_duration"] or 0.0
    try:
        waveform = load_audio(path, sample_rate=rate, duration=max(p["clip_duration"], needed))
    except AudioDecodeError as err:
        return {"i": index, "status": "skip", "reason": "undecodable", "detail": str(err)}
    seconds = len(waveform) / rate
    if len(waveform) < math.floor(needed * rate):
        detail = f"{seconds:.3f} s of audio, {needed} s required"
        return {"i": index, "status": "skip", "reason": "too short", "detail": detail}
    waveform = waveform[: round(p["clip_duration"] * rate)]
    segments = segment_waveform(waveform, segment_length=length, max_segments=per_clip)
    if len(segments) == 0:
        detail = f"{seconds:.3f} s of audio, shorter than one {length}-sample segment"
        return {"i": index, "status": "skip", "reason": "too short", "detail": detail}
    slot = np.zeros((per_clip, length), dtype="<i2")
    slot[: len(segments)] = quantize(segments)
    path = _WORKER["path"]
    pwrite_all(_WORKER["fd"], slot.tobytes(), _WORKER["offset"] + index * slot.nbytes, path=path)
    try:
        os.fdatasync(_WORKER["fd"])
    except OSError as err:
        raise output_error(err, path) from err
    digest = clip_digest(slot[: len(segments)])
    return {"i": index, "status": "ok", "n": len(segments), "digest": digest}


def _process_task(task: tuple[int, str]) -> dict[str, Any]:
    try:
        return _process_clip(*task)
    except OSError as err:
        if err.filename == _WORKER["path"]:  # the output failed (disk full, ...), not the clip
            raise OSError(err.errno, err.strerror, err.filename) from None
        raise RuntimeError(f"{task[1]}: {type(err).__name__}: {err}") from err
    except Exception as err:  # an unexpected failure must stop the run and name the clip
        raise RuntimeError(f"{task[1]}: {type(err).__name__}: {err}") from err


# --- parent side --------------------------------------------------------------------------


def _run(
    tasks: list[tuple[int, str]],
    *,
    journal: Path,
    segments_path: Path,
    offset: int,
    params: dict[str, Any],
    workers: int,
    progress: bool,
) -> None:
    bar = tqdm(total=len(tasks), unit="clip", desc="prepare", disable=not progress, smoothing=0.05)
    with open(journal, "ab") as log, bar:

        def record(entry: dict[str, Any]) -> None:
            try:
                log.write(json.dumps(entry).encode() + b"\n")
                log.flush()
            except OSError as err:
                raise output_error(err, journal) from err
            bar.update(1)

        if workers <= 1:
            _init_worker(str(segments_path), offset, params)
            try:
                for task in tasks:
                    record(_process_task(task))
            finally:
                os.close(_WORKER.pop("fd"))
            return
        pool = ProcessPoolExecutor(
            max_workers=workers,
            initializer=_init_pool_worker,
            initargs=(os.getpid(), str(segments_path), offset, params),
        )
        # A bounded window of submitted clips, refilled as clips finish: the parent holds
        # O(workers) futures, not one per clip (hundreds of thousands for the MSD).
        todo = iter(tasks)
        try:
            pending = {
                pool.submit(_process_task, task)
                for task in itertools.islice(todo, workers * IN_FLIGHT_PER_WORKER)
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record(future.result())
                pending |= {
                    pool.submit(_process_task, task) for task in itertools.islice(todo, len(done))
                }
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _redo_damaged(
    out: Path,
    plan: dict[str, Any],
    journal: Path,
    entries: dict[int, dict[str, Any]],
    shape: tuple[int, int, int],
    offset: int,
    params: dict[str, Any],
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """Check every decoded slot against its journal digest; decode damaged ones once more."""
    path = out / "segments.npy"
    ok = {i: e for i, e in entries.items() if e["status"] == "ok"}
    damaged = damaged_slots(path, offset, ok, shape)
    if not damaged:
        return entries
    logger.warning(
        "%s: %d clip slot(s) do not hold what was written (a short write?); decoding them again",
        path,
        len(damaged),
    )
    keep = b"".join(
        json.dumps(e).encode() + b"\n" for i, e in sorted(entries.items()) if i not in damaged
    )
    with atomic_write(journal) as handle:
        handle.write(keep)
    root = Path(plan["root"])
    tasks = [(i, str(root / plan["clips"][i][1])) for i in damaged]
    _run(
        tasks,
        journal=journal,
        segments_path=path,
        offset=offset,
        params=params,
        workers=1,
        progress=progress,
    )
    entries = read_journal(journal, len(plan["clips"]))
    again = damaged_slots(path, offset, {i: entries[i] for i in damaged}, shape)
    if again:
        raise ValueError(
            f"{path}: clip {plan['clips'][again[0]][0]} does not read back as written even after"
            f" writing it again ({len(again)} clip(s)); the disk or filesystem is failing"
        )
    return entries


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything ``prepare`` did not write.

    Ours: a complete store (a ``manifest.json`` of the store format) or an unfinished one (a
    ``.prepare`` folder). Anything else in a non-empty directory is the user's, and neither
    a prepare nor ``--overwrite`` may replace it (a table dataset's own ``clips.csv``, say).
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; give a store directory")
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if not names or (out / WORK_DIR).is_dir():
        return
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            ours = json.loads(manifest.read_text()).get("format") == STORE_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours:
            return
        raise ValueError(
            f"{manifest} is not the manifest of a segment store (damaged, or a file of yours): "
            f"prepare never replaces files it did not write; choose another --out, or delete "
            f"{out} yourself if it is a damaged store"
        )
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ValueError(
        f"--out {out} is not empty and holds no segment store ({shown}); prepare writes "
        f"{', '.join(_STORE_FILES)} there and never replaces files it did not write"
        f"{' (not even with --overwrite)' if overwrite else ''}: give a new or empty directory"
    )


def prepare_store(
    source: Source,
    out: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    segment_length: int = SEGMENT_LENGTH,
    segments_per_clip: int = SEGMENTS_PER_CLIP,
    clip_duration: float = CLIP_DURATION,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> SegmentStore:
    """Decode every clip of ``source`` into a segment store at ``out``; resume if unfinished.

    Args:
        source: clips from an adapter (:mod:`resemul_core.data.sources`).
        out: store directory.
        sample_rate: Hz (22,050 in the paper).
        segment_length: samples per segment (59,049).
        segments_per_clip: slots per clip (10); a clip fills ``min(floor(audio / L), S)``.
        clip_duration: seconds decoded from the start of each clip (29).
        workers: processes decoding in parallel (default: all CPU cores; 1: in-process).
        progress: show a tqdm bar (clips/s).
        overwrite: replace a complete store or an unfinished one with a different plan.

    Returns:
        The opened store. Clips that cannot be used are skipped and recorded in the manifest
        with their reason: 'missing file', 'empty', 'undecodable', 'too short' (less than
        ``source.min_duration`` seconds of audio, or less than one segment).

    Raises:
        ValueError: ``out`` holds a different complete or unfinished store (and not
            ``overwrite``), or files that are not a store's (even with ``overwrite``), or no
            clip could be decoded, or the written data does not read back as written.
        DirectoryBusy: another process is preparing into ``out``.
        OSError: writing failed (disk full, read-only, ...); the error names the output
            file. Everything finished so far is kept: the same call resumes.

    The store directory is locked while this runs (:mod:`resemul_core.locks`). Before the
    manifest is written, every clip's slot is read back and checked against the digest of
    what was written (a slot that a failing disk lost is decoded again, once).
    """
    sizes = {
        "sample_rate": sample_rate,
        "segment_length": segment_length,
        "segments_per_clip": segments_per_clip,
        "clip_duration": clip_duration,
    }
    for name, value in sizes.items():
        if not math.isfinite(value) or value <= 0:  # nan passes `value <= 0` alone
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if len(source.clips) == 0:
        raise ValueError(f"{source.dataset}: no clips to prepare ({len(source.dropped)} dropped)")
    out = Path(out)
    _check_output(out, overwrite)
    with directory_lock(out, "data prepare"):
        _check_output(out, overwrite)  # as it is now that we own it
        return _prepare_locked(source, out, sizes, workers, progress, overwrite)


def _prepare_locked(
    source: Source,
    out: Path,
    sizes: dict[str, Any],
    workers: int | None,
    progress: bool,
    overwrite: bool,
) -> SegmentStore:
    segments_per_clip, segment_length = sizes["segments_per_clip"], sizes["segment_length"]
    work = out / WORK_DIR
    params = {**sizes, "min_duration": source.min_duration}
    plan = _plan(source, params)
    digest = _plan_digest(plan)
    if overwrite:
        for name in _STORE_FILES:  # manifest first: the store is invalid from here on
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    if (out / "manifest.json").exists():
        store = open_store(out)
        if store.manifest.get("source", {}).get("plan_sha256") == digest:
            logger.info("%s is already complete", out)
            shutil.rmtree(work, ignore_errors=True)
            return store
        raise ValueError(
            f"{out} already holds a store prepared from other data or parameters;"
            " use overwrite=True (--overwrite) to replace it"
        )

    num = len(plan["clips"])
    shape = (num, segments_per_clip, segment_length)
    plan_file, journal = work / "plan.json", work / "journal.jsonl"
    if plan_file.exists():
        if json.loads(plan_file.read_text()) != plan:
            raise ValueError(
                f"{out} holds an unfinished prepare of other data or parameters;"
                " use overwrite=True (--overwrite) to discard it"
            )
        entries = read_journal(journal, num)
        logger.info("resuming %s: %d of %d clips already done", out, len(entries), num)
    else:
        work.mkdir(parents=True, exist_ok=True)
        journal.unlink(missing_ok=True)
        (work / "compacted").unlink(missing_ok=True)
        allocate_segments(out / "segments.npy", shape)
        write_json(plan_file, plan)
        entries = {}
    offset = int(np.load(out / "segments.npy", mmap_mode="r").offset)

    root = Path(plan["root"])
    tasks = [(i, str(root / row[1])) for i, row in enumerate(plan["clips"]) if i not in entries]
    if tasks and (work / "compacted").exists():
        raise ValueError(f"{work}: compaction marker present but clips unfinished; delete {out}")
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    if tasks:
        logger.info("decoding %d clips with %d worker(s)", len(tasks), n_workers)
        _run(
            tasks,
            journal=journal,
            segments_path=out / "segments.npy",
            offset=offset,
            params=params,
            workers=n_workers,
            progress=progress,
        )
        entries = read_journal(journal, num)
    missing = [i for i in range(num) if i not in entries]
    if missing:  # cannot happen unless the journal was edited by hand
        raise ValueError(f"{journal}: {len(missing)} clips have no entry after decoding")
    if not any(e["status"] == "ok" for e in entries.values()):
        reasons = sorted({e["reason"] for e in entries.values()})
        raise ValueError(f"no clip of {source.dataset} could be decoded (reasons: {reasons})")

    # Read every slot back before the store may call itself complete: a write that the disk
    # lost is decoded again; compaction's copies are checked after it.
    compacted = (work / "compacted").exists()
    if not compacted:
        entries = _redo_damaged(out, plan, journal, entries, shape, offset, params, progress)
    order = compact_slots(out, work, entries, shape, offset)
    final = {slot: entries[i] for slot, i in enumerate(order)}
    damaged = damaged_slots(
        out / "segments.npy",
        offset,
        final if compacted else {s: e for s, e in final.items() if order[s] != s},
        (len(order), segments_per_clip, segment_length),
    )
    if damaged:
        raise ValueError(
            f"{out / 'segments.npy'}: {len(damaged)} clip(s) do not read back as written (first:"
            f" clip {plan['clips'][order[damaged[0]]][0]}); the disk is failing or the file was"
            f" changed; prepare again with --overwrite"
        )
    rows = [plan["clips"][i] for i in order]
    clips = pd.DataFrame(rows, columns=["clip_id", "path", "split"])
    clips["num_segments"] = [int(entries[i]["n"]) for i in order]
    clips["digest"] = [entries[i]["digest"] for i in order]
    labels = np.array([[int(c) for c in plan["labels"][i]] for i in order], dtype=np.uint8)
    labels = labels.reshape(len(order), len(plan["tags"]))
    skipped = list(plan["dropped"]) + [
        {
            "clip_id": plan["clips"][i][0],
            "path": plan["clips"][i][1],
            "split": plan["clips"][i][2],
            "reason": entries[i]["reason"],
            "detail": entries[i]["detail"],
        }
        for i in sorted(entries)
        if entries[i]["status"] != "ok"
    ]
    store = finish_store(
        out,
        dataset=plan["dataset"],
        params=params,
        tags=plan["tags"],
        clips=clips,
        labels=labels,
        skipped=skipped,
        source={**plan["options"], "root": plan["root"], "plan_sha256": digest},
    )
    shutil.rmtree(work, ignore_errors=True)
    counts = tuple(int((clips["split"] == s).sum()) for s in SPLITS)
    if source.expected_counts is not None and counts != tuple(source.expected_counts):
        logger.warning(
            "%s: train/valid/test clips %s differ from the %s expected on the real %s data",
            out,
            counts,
            tuple(source.expected_counts),
            source.dataset,
        )
    return store


def _disk_bytes(paths: Iterable[Path]) -> int:
    """Bytes actually allocated on disk (sparse files count only written blocks)."""
    return sum(p.stat().st_blocks * 512 for p in paths if p.is_file())


def store_summary(store: SegmentStore) -> dict[str, Any]:
    """Plain-value summary of a store for ``resemul data info``.

    Returns:
        A dict with keys ``path``, ``dataset``, ``params``, ``tags``, ``splits`` (a list of
        ``{"split", "clips", "segments"}`` dicts), ``skips`` (``{reason: count}``),
        ``size_bytes``, ``fingerprint`` and ``library_version``.
    """
    counts = store.manifest.get("counts") or {}
    return {
        "path": str(store.path),
        "dataset": store.manifest["dataset"],
        "params": store.manifest["params"],
        "tags": store.tags,
        "splits": [{"split": s, **counts.get(s, {"clips": 0, "segments": 0})} for s in SPLITS],
        "skips": dict(store.manifest.get("skip_counts", {})),
        "size_bytes": _disk_bytes(store.path.iterdir()),
        "fingerprint": store.fingerprint,
        "library_version": store.manifest.get("library_version"),
    }
