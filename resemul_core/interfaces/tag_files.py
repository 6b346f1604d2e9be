"""Tag many files: folders, a table of results, embeddings to a file, a store's clips.

Public: :func:`find_audio`, :func:`tag_files`, :func:`tag_table`, :func:`embedding_table`,
:func:`write_table`, :class:`TagTable`, :func:`tag_store_clips`.

:func:`tag_files` decodes files in a pool of threads while the model runs on the files before
them (libsndfile and soxr release the interpreter lock, so decoding overlaps with the model's
forward passes). Each file's segments pass through a small bounded queue, so memory stays
bounded whatever the files' lengths. A file that cannot be decoded is reported, with the
reason, and the batch goes on: nothing is lost silently.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from resemul_core.data.audio import AUDIO_EXTENSIONS, AudioDecodeError
from resemul_core.data.store import SegmentStore
from resemul_core.files import atomic_write
from resemul_core.interfaces.tagger import Tagger, TagResult

__all__ = [
    "FileOutcome",
    "TagTable",
    "embedding_table",
    "find_audio",
    "tag_files",
    "tag_store_clips",
    "tag_table",
    "write_table",
]

# Batches of one file waiting for the model: enough to keep the model busy, few enough that
# an hour-long file never sits in memory as a whole.
_QUEUE_BATCHES = 2
_DONE = object()


def find_audio(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The audio files to tag: files named as they are, folders searched recursively.

    Args:
        inputs: files and folders. A folder contributes every file under it whose
            extension is one of :data:`~resemul_core.data.audio.AUDIO_EXTENSIONS` (any case),
            sorted by path; a file named explicitly is taken whatever its extension (a bad one
            is reported when it is decoded).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: a folder holds no audio file.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
            )
            if not files:
                raise ValueError(
                    f"{path} holds no audio file ({', '.join(AUDIO_EXTENSIONS)}, searched "
                    "recursively)"
                )
            found.extend(files)
        elif path.exists() or path.is_symlink():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


@dataclass(frozen=True)
class FileOutcome:
    """One file's outcome: its result, or why it was skipped (``result`` is then None)."""

    path: Path
    result: TagResult | None
    error: str | None = None


def _decode_into(
    tagger: Tagger, path: Path, box: queue.Queue, options: dict, stop: threading.Event
) -> None:
    """Producer: put the file's batches, then ``(_DONE, plan outcome or exception)``, into
    ``box``; give up as soon as ``stop`` is set (the consumer has gone)."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        batches, plan = tagger.segment_batches(path, **options)
        for batch in batches:
            if not put(batch):
                return
        put((_DONE, plan()))
    except BaseException as err:  # handed to the consumer: a skip, or raised there if a bug
        put((_DONE, err))


def tag_files(
    tagger: Tagger,
    paths: Sequence[str | os.PathLike],
    *,
    segments: str | None = None,
    num_segments: int | None = None,
    embeddings: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> Iterator[FileOutcome]:
    """Tag files in order, decoding up to ``workers`` files ahead in threads.

    Args:
        tagger: the :class:`~resemul_core.interfaces.tagger.Tagger`.
        paths: audio files (see :func:`find_audio` for folders).
        segments, num_segments: the segment choice (default: the tagger's).
        embeddings: also compute embeddings.
        workers: decoding threads (>= 1); each holds at most a few batches of one file.
        progress: a tqdm bar over the files (on stderr).

    Yields:
        One :class:`FileOutcome` per path, in the order given: a file that is missing or
        cannot be decoded has ``result=None`` and the reason in ``error`` (one sentence naming
        the file), and the others are still tagged.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    paths = [Path(p) for p in paths]
    options = {"segments": segments, "num_segments": num_segments}
    mode = segments or tagger.segments
    boxes: dict[int, queue.Queue] = {}
    stop = threading.Event()
    with ThreadPoolExecutor(workers, thread_name_prefix="resemul-decode") as pool:

        def submit(k: int) -> None:
            if k < len(paths):
                boxes[k] = queue.Queue(maxsize=_QUEUE_BATCHES)
                pool.submit(_decode_into, tagger, paths[k], boxes[k], options, stop)

        for k in range(workers):  # as many files in flight as threads: none waits for a slot
            submit(k)
        try:
            for k, path in enumerate(
                tqdm(paths, desc="tagging", unit="file", disable=not progress)
            ):
                box = boxes.pop(k)
                outcome: list = []

                def batches(box: queue.Queue = box, outcome: list = outcome) -> Iterator:
                    while True:
                        item = box.get()
                        if isinstance(item, tuple) and item and item[0] is _DONE:
                            if isinstance(item[1], BaseException):
                                raise item[1]
                            outcome.append(item[1])
                            return
                        yield item

                try:
                    result = tagger.result_from_batches(
                        str(path),
                        batches(),
                        lambda o=outcome: o[0],
                        mode=mode,
                        embeddings=embeddings,
                    )
                    error = None
                except (AudioDecodeError, OSError) as err:
                    result, error = None, _sentence(err, path)
                submit(k + workers)
                yield FileOutcome(path, result, error)
        finally:
            stop.set()  # producers of files never consumed give up within 0.1 s


def _sentence(err: BaseException, path: Path) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.strerror and str(path) not in text:
        text = f"{path}: {err.strerror}"
    return text


def tag_table(outcomes: Iterable[FileOutcome], *, top_k: int = 5) -> pd.DataFrame:
    """One row per file: ``file``, ``status`` ("ok" or "skipped"), ``reason``, ``duration``
    (s), ``segments``, ``mode``, ``top_tags`` ("tag (p); ...") and one probability column per
    tag (empty for skipped files, which are kept, so that none goes missing silently)."""
    rows = []
    for item in outcomes:
        row: dict = {"file": str(item.path), "status": "ok", "reason": ""}
        if item.result is None:
            rows.append({**row, "status": "skipped", "reason": item.error})
            continue
        result = item.result
        row.update(
            duration=round(result.duration, 3),
            segments=len(result.starts),
            mode=result.mode,
            top_tags="; ".join(f"{t} ({p:.3f})" for t, p in result.top(top_k)),
        )
        if result.note:
            row["reason"] = result.note
        row.update(zip(result.tags, result.clip_probabilities.tolist(), strict=True))
        rows.append(row)
    return pd.DataFrame(rows)


def embedding_table(outcomes: Iterable[FileOutcome], *, per: str = "file") -> pd.DataFrame:
    """Embeddings as a table: one row per file (``per="file"``, the mean over its segments)
    or per segment (``per="segment"``, with its ``segment`` number and ``time`` in seconds),
    columns ``e0 ... e{F-1}`` float32. Files without a result are left out (report them from
    the outcomes)."""
    if per not in ("file", "segment"):
        raise ValueError(f"per must be 'file' or 'segment', got {per!r}")
    frames = []
    for item in outcomes:
        if item.result is None:
            continue
        result = item.result
        vectors = result.embedding()[None] if per == "file" else result.embeddings
        frame = pd.DataFrame(vectors, columns=[f"e{i}" for i in range(vectors.shape[1])])
        frame.insert(0, "file", str(item.path))
        if per == "segment":
            frame.insert(1, "segment", np.arange(len(vectors)))
            frame.insert(2, "time", result.starts)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically by the file's extension: ``.csv``, ``.parquet`` (pyarrow) or
    ``.npy`` (the float columns only, as a ``(rows, columns)`` float32 array, with the other
    columns beside it in ``NAME.index.csv``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with atomic_write(path, mode="w") as handle:
            frame.to_csv(handle, index=False)
    elif suffix == ".parquet":
        with atomic_write(path) as handle:
            frame.to_parquet(handle, index=False)
    elif suffix == ".npy":
        values = [c for c in frame.columns if str(c).startswith("e") and str(c)[1:].isdigit()]
        with atomic_write(path) as handle:
            np.save(handle, frame[values].to_numpy(np.float32))
        index = path.with_name(path.stem + ".index.csv")
        with atomic_write(index, mode="w") as handle:
            frame.drop(columns=values).to_csv(handle, index=False)
    else:
        raise ValueError(f"{path}: write a .csv, .parquet or .npy file")
    return path


# pandas display options under which no cell and no column is left out
_IN_FULL = ("display.max_colwidth", None, "display.max_columns", None, "display.width", 0)


class TagTable(pd.DataFrame):
    """A DataFrame that displays every cell in full: no column is cut short with "...".

    pandas shortens text cells to ``display.max_colwidth`` (50 characters) when it shows a
    frame; a list of five tags with their probabilities is longer. This frame shows them whole
    (in HTML the cells wrap at the page width); everything else is a plain DataFrame.
    """

    @property
    def _constructor(self):
        return TagTable

    def _repr_html_(self) -> str | None:
        with pd.option_context(*_IN_FULL):
            return super()._repr_html_()

    def __repr__(self) -> str:
        with pd.option_context(*_IN_FULL):
            return super().__repr__()


def tag_store_clips(
    tagger: Tagger, store: SegmentStore, indices: Sequence[int], *, top_k: int = 5
) -> TagTable:
    """Tag the original audio files of some clips of a store, beside their true tags.

    The files are decoded again (the path any user's audio takes), not read from the store,
    and cut as the store cut them ("first" mode: the test protocol).

    Returns:
        A :class:`TagTable` (a DataFrame that shows its cells in full) with columns
        ``clip_id``, ``file``, ``predicted`` (the ``top_k`` tags as "tag (probability)", most
        probable first) and ``true`` (the clip's labelled tags).
    """
    rows = []
    for i in indices:
        path = store.audio_path(int(i))
        predicted = tagger.tag(path, top_k=top_k, segments="first")
        rows.append(
            {
                "clip_id": store.clips["clip_id"].iat[int(i)],
                "file": path.name,
                "predicted": ", ".join(f"{tag} ({p:.2f})" for tag, p in predicted),
                "true": ", ".join(
                    t for t, on in zip(store.tags, store.labels[int(i)], strict=True) if on
                ),
            }
        )
    return TagTable(rows, columns=["clip_id", "file", "predicted", "true"])
