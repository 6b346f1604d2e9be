"""The Million Song Dataset adapter: Choi et al.'s Last.fm top-50 split → a list of clips.

Public: :func:`read_msd`, :data:`MSD_PATH_PATTERNS`.

Like the other adapters (:mod:`resemul_core.data.sources`, which also offers this one as
dataset ``msd`` through :func:`~resemul_core.data.sources.read_source`), it reads only
metadata (no audio) into a :class:`~resemul_core.data.metadata.Source`: which tracks, where
their audio preview is, their split and their 0/1 tag vector. Tracks it leaves out are listed
in its ``dropped`` with a reason, and end up in the store manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resemul_core.data.metadata import (
    PAPER_MIN_DURATION,
    Source,
    _check_policy,
    _inside_root,
    _skip,
    dropped_records,
)
from resemul_core.data.store import SPLITS
from resemul_core.data.tags import MSD_TOP50_TAGS

__all__ = ["MSD_PATH_PATTERNS", "read_msd"]

logger = logging.getLogger(__name__)

#: Where :func:`read_msd` looks for a track's audio under ``audio_dir``, in order. Fields:
#: ``{msd_id}`` (e.g. TRAAAAK128F9318786) and ``{stem}``: the 7digital path of Choi's
#: ``*_x_filename.txt`` without its ``.npy`` (e.g. ``3/6/36122424``).
MSD_PATH_PATTERNS = (
    "{stem}.clip.mp3",
    "{stem}.mp3",
    "{msd_id}.mp3",
    "{msd_id[2]}/{msd_id[3]}/{msd_id[4]}/{msd_id}.mp3",
)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_msd(
    root: str | os.PathLike,
    *,
    audio_dir: str | os.PathLike | None = None,
    split_policy: str = "paper",
    path_patterns: Sequence[str] = MSD_PATH_PATTERNS,
    min_duration: float = PAPER_MIN_DURATION,
) -> Source:
    """The Million Song Dataset's Last.fm top-50 split of Choi et al. (specification §1.2).

    Args:
        root: folder with Choi's split files (github keunwoochoi/MSD_split_for_tagging), per
            split ``S`` in train, valid, test: ``S_x_msd_id.txt`` (one MSD track id a line),
            ``S_y.npy`` (``(n, 50)`` 0/1, columns in the order of
            :data:`~resemul_core.data.tags.MSD_TOP50_TAGS`) and, optionally, ``S_x_filename.txt``
            (7digital paths such as ``3/6/36122424.npy``, same line order).
        audio_dir: folder of the audio previews (default ``ROOT/audio``).
        split_policy: 'paper' drops clips with less than 29.1 s of audio at prepare time
            (Lee et al.'s filter); 'resemul' keeps every clip with at least one segment.
        path_patterns: where a track's audio is looked for under ``audio_dir``, first match
            wins; see :data:`MSD_PATH_PATTERNS` for the fields. Patterns using ``{stem}`` are
            tried only when the ``S_x_filename.txt`` files exist.
        min_duration: seconds of audio a clip needs under the 'paper' policy (29.1).

    Tracks without audio are dropped ('missing file', with the paths searched); if no track
    has audio at all, FileNotFoundError lists the patterns searched.

    The paths searched come from the split files, so they are checked like MTAT's: a track
    whose id or 7digital path makes a pattern absolute or climb out of ``audio_dir`` with
    ``..`` is dropped ('path outside root') without looking at any file for it (symbolic links
    inside ``audio_dir`` are followed). Each track is taken once: a track id listed again, in
    the same or another split, is dropped ('duplicate clip_id'), and so is a track whose audio
    file is already another, earlier track's ('duplicate path'); the detail names the earlier
    track.

    Note:
        Lee et al. split Choi's training list into 201,680 train / 11,774 valid clips by a
        file that is not public; this adapter keeps Choi's own train/valid lists (201,680 /
        12,634 / 28,540 before the duration filter), so valid and train differ slightly from
        the paper's.
    """
    _check_policy(split_policy)
    root = Path(root)
    audio_root = Path(audio_dir) if audio_dir is not None else root / "audio"
    if not audio_root.is_dir():
        raise FileNotFoundError(f"{audio_root}: no such MSD audio folder")
    rows: list[pd.DataFrame] = []
    matrices: list[np.ndarray] = []
    for split in SPLITS:
        ids = _read_lines(root / f"{split}_x_msd_id.txt")
        y_file = root / f"{split}_y.npy"
        if not y_file.is_file():
            raise FileNotFoundError(f"{y_file}: no such file")
        y = np.load(y_file)
        if y.shape != (len(ids), len(MSD_TOP50_TAGS)):
            raise ValueError(
                f"{y_file}: expected shape ({len(ids)}, {len(MSD_TOP50_TAGS)}) to match"
                f" {split}_x_msd_id.txt, found {y.shape}"
            )
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{y_file}: labels must be 0/1")
        name_file = root / f"{split}_x_filename.txt"
        stems = [""] * len(ids)
        if name_file.is_file():
            stems = [s.removesuffix(".npy") for s in _read_lines(name_file)]
            if len(stems) != len(ids):
                raise ValueError(
                    f"{name_file}: {len(stems)} lines but {split}_x_msd_id.txt has {len(ids)}"
                )
        listed = [f"track {k + 1} of {split}_x_msd_id.txt" for k in range(len(ids))]
        rows.append(pd.DataFrame({"clip_id": ids, "stem": stems, "split": split, "at": listed}))
        matrices.append(y.astype(np.uint8))
    frame = pd.concat(rows, ignore_index=True)
    labels = np.concatenate(matrices)

    patterns = [p for p in path_patterns if "{stem}" not in p or (frame["stem"] != "").all()]
    if not patterns:
        raise ValueError(f"no usable path pattern among {list(path_patterns)}")
    skipped: list[dict[str, Any]] = []
    first_of_id: dict[str, int] = {}
    found = [""] * len(frame)
    searched = np.zeros(len(frame), dtype=bool)
    for row, (msd_id, stem, split, at) in enumerate(frame.itertuples(index=False, name=None)):
        if msd_id in first_of_id:
            detail = f"{at} repeats {frame['at'].iat[first_of_id[msd_id]]}"
            skipped.append(_skip(msd_id, "", split, "duplicate clip_id", detail))
            continue
        first_of_id[msd_id] = row
        try:
            candidates = [p.format(msd_id=msd_id, stem=stem) for p in patterns]
        except IndexError:  # an id too short for a pattern's {msd_id[4]}: not an MSD id
            detail = f"{at}: {msd_id!r} is not a Million Song Dataset track id"
            skipped.append(_skip(msd_id, "", split, "malformed id", detail))
            continue
        inside = [_inside_root(c) for c in candidates]
        if None in inside:
            outside = candidates[inside.index(None)]
            detail = f"{outside!r} is not inside {audio_root}"
            skipped.append(_skip(msd_id, outside, split, "path outside root", detail))
            continue
        searched[row] = True
        found[row] = next((c for c in inside if c and (audio_root / c).is_file()), "")
    frame["path"] = found
    exists = (frame["path"] != "").to_numpy().copy()
    if not exists.any():
        raise FileNotFoundError(
            f"no MSD audio found under {audio_root}; searched patterns {patterns}"
        )
    dropped = skipped + dropped_records(
        frame,
        searched & ~exists,
        "missing file",
        f"no file under {audio_root} matching {patterns}",
    )
    first_of_path: dict[str, int] = {}
    for row in np.flatnonzero(exists):
        path = frame["path"].iat[row]
        if path in first_of_path:
            first = first_of_path[path]
            detail = (
                f"{path!r} is already the audio of {frame['clip_id'].iat[first]}"
                f" ({frame['at'].iat[first]})"
            )
            msd_id, split = frame["clip_id"].iat[row], frame["split"].iat[row]
            dropped.append(_skip(msd_id, path, split, "duplicate path", detail))
            exists[row] = False
        else:
            first_of_path[path] = row
    clips = frame.loc[exists, ["clip_id", "path", "split"]].reset_index(drop=True)
    source = Source(
        dataset="msd",
        root=audio_root,
        tags=list(MSD_TOP50_TAGS),
        clips=clips,
        labels=labels[exists],
        dropped=dropped,
        min_duration=min_duration if split_policy == "paper" else None,
        options={
            "root": str(root),
            "audio_dir": str(audio_root),
            "split_policy": split_policy,
            "path_patterns": list(patterns),
        },
    )
    logger.info("MSD: clips train/valid/test %s, %d dropped", source.split_counts(), len(dropped))
    return source
