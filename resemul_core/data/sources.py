"""Dataset adapters: MagnaTagATune, the Million Song Dataset, or any table → a list of clips.

Public: :func:`read_mtat`, :func:`read_synth`, :func:`read_table`, :func:`read_source`,
:func:`select_top_tags`, :data:`SOURCES`, :data:`MTAT_KNOWN_BROKEN`, :data:`SYNTH_MARKER`.

The MSD adapter lives in :mod:`resemul_core.data.msd` (:func:`~resemul_core.data.msd.read_msd`,
:data:`~resemul_core.data.msd.MSD_PATH_PATTERNS`), and the split policies the MTAT and MSD
readers share in :mod:`resemul_core.data.metadata`
(:data:`~resemul_core.data.metadata.SPLIT_POLICIES`); those names are importable from here too.

An adapter reads only metadata (no audio) into a :class:`~resemul_core.data.metadata.Source`:
which clips, where their audio is, their split and their 0/1 tag vector. Clips it leaves out
are listed in its ``dropped`` with a reason, and end up in the store manifest. Decoding, the
duration check and the store itself are the job of
:func:`resemul_core.data.prepare.prepare_store`.

The synthetic datasets (:mod:`resemul_core.data.synth`, :mod:`resemul_core.data.synth_release`)
share MTAT's *layout* and are read by the MTAT reader, but they are not MTAT: a folder holding
the generators' parameter file (:data:`SYNTH_MARKER`) is read as dataset ``synth``, and its
store's manifest, ``resemul data info`` and the prepare summary say ``synth``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resemul_core.data.audio import AUDIO_EXTENSIONS
from resemul_core.data.metadata import (
    PAPER_MIN_DURATION,
    Source,
    _check_policy,
    _inside_root,
    _skip,
    binary_matrix,
    drop_missing_audio,
    dropped_records,
    read_delimited,
    require_columns,
)
from resemul_core.data.metadata import SPLIT_POLICIES as SPLIT_POLICIES
from resemul_core.data.msd import MSD_PATH_PATTERNS as MSD_PATH_PATTERNS
from resemul_core.data.msd import read_msd
from resemul_core.data.splits import MTAT_SPLIT_OF_FOLDER, mtat_split
from resemul_core.data.store import SPLITS
from resemul_core.data.tags import MTAT_TOP50_TAGS

# read_msd, MSD_PATH_PATTERNS and SPLIT_POLICIES are imported above under their own names so
# that existing imports from this module keep working; they are left out of __all__ so that the
# API reference documents each once, in its own module.
__all__ = [
    "MTAT_KNOWN_BROKEN",
    "SOURCES",
    "SYNTH_MARKER",
    "read_mtat",
    "read_source",
    "read_synth",
    "read_table",
    "select_top_tags",
]

logger = logging.getLogger(__name__)

#: The file the synthetic generators write next to their ``annotations_final.csv``
#: (:data:`resemul_core.data.synth.PARAMS_FILE`): a folder holding it is dataset ``synth``.
SYNTH_MARKER = "synth.json"

#: MTAT's three zero-byte mp3s (specification §1.1), as ``mp3_path`` values of
#: annotations_final.csv.
MTAT_KNOWN_BROKEN = (
    "6/norine_braun-now_and_zen-08-gently-117-146.mp3",
    "8/jacob_heringman-josquin_des_prez_lute_settings-19-gintzler__pater_noster-204-233.mp3",
    "9/american_baroque-dances_and_suites_of_rameau_and_couperin-25-le_petit_rien_xiveme_ordre"
    "_couperin-88-117.mp3",
)
_MTAT_REAL_ROWS = 25_863
# (train, valid, test) clips after the adapter, and in the finished store, on the real data:
# the store loses the 3 zero-byte files (resemul) or 3 short clips (paper) (specification §1.1).
_MTAT_EXPECTED = {
    "paper": {"source": (15_247, 1_529, 4_332), "store": (15_244, 1_529, 4_332)},
    "resemul": {"source": (15_250, 1_529, 4_332), "store": (15_247, 1_529, 4_332)},
}


def select_top_tags(counts: pd.Series, top_k: int) -> list[str]:
    """The ``top_k`` most frequent tags that occur at all, in ascending order of count.

    Ties are broken by column order (a stable sort), so the result is deterministic.
    """
    ranked = counts[counts > 0].sort_values(kind="stable")
    return list(ranked.index[-top_k:]) if top_k > 0 else []


def read_mtat(
    root: str | os.PathLike,
    *,
    split_policy: str = "paper",
    top_k: int = 50,
    min_duration: float = PAPER_MIN_DURATION,
) -> Source:
    """MagnaTagATune from ``ROOT/annotations_final.csv`` and the mp3 folders ``0``..``f``.

    Args:
        root: folder holding ``annotations_final.csv`` and the folders ``0``..``f``, either
            in ``ROOT/mp3/`` or directly in ``ROOT``. The CSV is tab-separated with a header
            ``clip_id``, one 0/1 column per tag (188 on the real data), ``mp3_path``; fields
            may be wrapped in double quotes.
        split_policy: 'paper' (15,244 / 1,529 / 4,332 clips on the real data: also drops
            the three known zero-byte files and, at prepare time, clips with less than 29.1 s
            of audio) or 'resemul' (the official code: 15,250 / 1,529 / 4,332 before decoding;
            the three zero-byte files then fail to decode → 15,247 train clips).
        top_k: number of tags kept: the most frequent over *all* clips, output in ascending
            order of frequency. Tags that never occur are never selected, so a dataset with
            fewer than ``top_k`` occurring tags yields fewer tags.
        min_duration: seconds of audio a clip needs under the 'paper' policy (29.1; change
            it only for scaled-down test data).

    Split by the first character of ``mp3_path``: ``0``–``b`` train, ``c`` valid, ``d``–``f``
    test (specification §1.1). Clips with none of the selected tags are dropped ('no tag'), as are
    listed clips whose mp3 does not exist ('missing file').

    ``mp3_path`` is relative to the mp3 folders' parent by definition. It is normalised as text
    (``c/../5/x.mp3`` is the clip ``5/x.mp3``, a train clip); one that is absolute or climbs
    out of that folder with ``..`` is dropped ('path outside root') and its file is never
    looked at. Symbolic links inside the folder are followed, wherever they point.

    Each clip is taken once, from its first row: a later row with the same ``clip_id`` is
    dropped ('duplicate clip_id'; a row repeated exactly is one of these), as is a later row
    with another id but the same (normalised) ``mp3_path`` ('duplicate path'); the detail names
    the earlier row. Rows dropped for these reasons do not count towards the tag frequencies.
    A tag column named twice in the header is a ValueError naming the file and the column.

    Note:
        When the selected tags are exactly specification §1.1's 50, their order is taken from
        :data:`~resemul_core.data.tags.MTAT_TOP50_TAGS` (the official code's argsort order), so
        ties in the counts cannot reorder the label columns.
    """
    _check_policy(split_policy)
    root = Path(root)
    file = root / "annotations_final.csv"
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such MTAT folder")
    frame = read_delimited(file, sep="\t")
    require_columns(frame, ["clip_id", "mp3_path"], file)
    tag_names = [c for c in frame.columns if c not in ("clip_id", "mp3_path")]
    matrix = binary_matrix(frame, tag_names, file)
    audio_root = root / "mp3" if (root / "mp3").is_dir() else root

    ids = frame["clip_id"].str.strip().tolist()
    paths: list[str] = []
    splits: list[str] = []
    skipped: list[dict[str, Any]] = []
    first_of_id: dict[str, int] = {}
    first_of_path: dict[str, int] = {}
    for row, (clip_id, written) in enumerate(zip(ids, frame["mp3_path"].str.strip(), strict=True)):
        where = f"row {row + 1} of {file.name}"
        path = _inside_root(written)
        if path is None:
            try:
                split = mtat_split(written)
            except ValueError:
                split = ""
            paths.append(written)
            splits.append(split)
            detail = f"{where}: {written!r} is not inside {audio_root}"
            skipped.append(_skip(clip_id, written, split, "path outside root", detail))
            continue
        try:
            split = mtat_split(path)
        except ValueError as err:
            also = f" (written {written!r})" if path != written else ""
            raise ValueError(f"{file}: row {row + 1}: {err}{also}") from None
        paths.append(path)
        splits.append(split)
        if clip_id in first_of_id:
            first = first_of_id[clip_id]
            detail = f"{where} repeats clip_id {clip_id!r} of row {first + 1}"
            if frame.iloc[row].tolist() == frame.iloc[first].tolist():
                detail += " (the whole row is identical)"
            skipped.append(_skip(clip_id, path, split, "duplicate clip_id", detail))
        elif path in first_of_path:
            first = first_of_path[path]
            detail = (
                f"{where} repeats mp3_path {path!r} of row {first + 1} (clip_id {ids[first]!r})"
            )
            skipped.append(_skip(clip_id, path, split, "duplicate path", detail))
        else:
            first_of_id[clip_id] = first_of_path[path] = row
    taken = np.zeros(len(frame), dtype=bool)
    taken[list(first_of_id.values())] = True

    counts = pd.Series(matrix[taken].sum(axis=0, dtype=np.int64), index=tag_names)
    tags = select_top_tags(counts, top_k)
    if set(tags) == set(MTAT_TOP50_TAGS):
        tags = list(MTAT_TOP50_TAGS)
    labels = matrix[:, [tag_names.index(t) for t in tags]]

    clips = pd.DataFrame({"clip_id": ids, "path": paths, "split": splits}, index=frame.index)
    if not any((audio_root / c).is_dir() for c in MTAT_SPLIT_OF_FOLDER):
        raise FileNotFoundError(f"{root}: no mp3 folders 0..f found in {root / 'mp3'} or {root}")
    no_tag = (labels.sum(axis=1) == 0) & taken
    dropped = skipped + dropped_records(
        clips, no_tag, "no tag", f"none of the {len(tags)} selected tags"
    )
    keep = taken & ~no_tag
    if split_policy == "paper":
        broken = clips["path"].isin(MTAT_KNOWN_BROKEN).to_numpy() & keep
        dropped += dropped_records(
            clips, broken, "known broken", "zero-byte file in MTAT (specification §1.1)"
        )
        keep &= ~broken
    clips, labels = clips.loc[keep].reset_index(drop=True), labels[keep]
    clips, labels, missing = drop_missing_audio(clips, labels, audio_root, "MTAT mp3 folders")
    dropped += missing
    dataset = "synth" if (root / SYNTH_MARKER).is_file() else "mtat"
    source = Source(
        dataset=dataset,
        root=audio_root,
        tags=tags,
        clips=clips,
        labels=labels,
        dropped=dropped,
        min_duration=min_duration if split_policy == "paper" else None,
        options={"root": str(root), "split_policy": split_policy, "top_k": top_k},
    )
    if abs(len(frame) - _MTAT_REAL_ROWS) <= 100:  # the real file, perhaps a variant of it
        expected = _MTAT_EXPECTED[split_policy]
        source.expected_counts = expected["store"]
        if source.split_counts() != expected["source"]:
            logger.warning(
                "%s looks like the real MTAT (%d rows) but gives %s train/valid/test clips,"
                " not the %s expected under the %r policy",
                file,
                len(frame),
                source.split_counts(),
                expected["source"],
                split_policy,
            )
    logger.info(
        "%s: %d tags, clips train/valid/test %s, %d dropped",
        "synthetic (MTAT layout)" if dataset == "synth" else "MTAT",
        len(tags),
        source.split_counts(),
        len(dropped),
    )
    return source


_SPLIT_ALIASES = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}


def _seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[str]:
    """``round(n * f)`` clips per split (test takes the rest) from a seeded permutation."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_train = round(n * fractions[0])
    n_valid = min(round(n * fractions[1]), n - n_train)
    splits = np.empty(n, dtype=object)
    splits[order[:n_train]] = "train"
    splits[order[n_train : n_train + n_valid]] = "valid"
    splits[order[n_train + n_valid :]] = "test"
    return list(splits)


def read_table(
    table: str | os.PathLike,
    *,
    path_column: str = "path",
    id_column: str | None = None,
    split_column: str | None = "split",
    tag_columns: Sequence[str] | None = None,
    tags_column: str | None = None,
    tag_separator: str = ";",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_duration: float | None = None,
    sep: str | None = None,
) -> Source:
    """Any dataset given as a table: one row per clip with its audio path and its tags.

    Args:
        table: a CSV (comma) or TSV (``.tsv``/``.tab``/``.txt``: tab) file with a header.
        path_column: column of audio paths, relative to the table's folder or absolute. Unlike
            MTAT's and MSD's, they may point anywhere (an absolute path, or ``..`` out of the
            table's folder): the table's author chose those files.
        id_column: column of clip ids (default: the path).
        split_column: column of 'train'/'valid'/'test' ('val', 'validation' accepted). If the
            table has no such column, clips are split at random (see ``fractions``).
        tag_columns: 0/1 tag columns. Default: every column that is not the path, id, split
            or tag-list column (unless ``tags_column`` is used).
        tags_column: a column of tag lists such as ``"rock;guitar"`` instead of 0/1 columns
            (default: ``"tags"`` if the table has that column and ``tag_columns`` is unset).
            The tags are all names that occur, sorted alphabetically; empty = no tag.
        tag_separator: separator inside ``tags_column`` entries.
        fractions: train/valid/test fractions of the random split: ``round(n * f)`` clips
            for train and valid from a permutation seeded with ``seed``; test takes the rest.
        seed: seed of the random split.
        min_duration: seconds of audio a clip needs (``None``: at least one segment).
        sep: field separator, overriding the one implied by the file extension.

    Clips whose audio file does not exist are dropped ('missing file'); if none exists,
    FileNotFoundError. A clip id that occurs twice, or a column named twice in the header, is
    a ValueError.
    """
    table = Path(table)
    frame = read_delimited(table, sep=sep)
    require_columns(frame, [path_column] + ([id_column] if id_column else []), table)
    has_split = split_column is not None and split_column in frame.columns
    if tags_column is None and tag_columns is None and "tags" in frame.columns:
        tags_column = "tags"
    if tags_column is not None:
        require_columns(frame, [tags_column], table)
        lists = [
            [t.strip() for t in str(v).split(tag_separator) if t.strip()]
            for v in frame[tags_column]
        ]
        tags = sorted({t for row in lists for t in row})
        labels = np.zeros((len(frame), len(tags)), dtype=np.uint8)
        position = {t: k for k, t in enumerate(tags)}
        for i, row in enumerate(lists):
            labels[i, [position[t] for t in row]] = 1
    else:
        reserved = {path_column, id_column, split_column if has_split else None}
        tags = (
            list(tag_columns)
            if tag_columns is not None
            else [c for c in frame.columns if c not in reserved]
        )
        require_columns(frame, tags, table)
        labels = binary_matrix(frame, tags, table)
    if not tags:
        raise ValueError(f"{table}: no tag columns found (give tag_columns or tags_column)")

    if has_split:
        raw = frame[split_column].str.strip().str.lower()
        bad = ~raw.isin(list(_SPLIT_ALIASES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{table}: row {row + 1}: split {frame[split_column].iat[row]!r} is not one of"
                f" {', '.join(SPLITS)}"
            )
        splits = list(raw.map(_SPLIT_ALIASES))
    else:
        splits = _seeded_split(len(frame), fractions, seed)
    paths = frame[path_column].str.strip()
    clips = pd.DataFrame(
        {
            "clip_id": frame[id_column].str.strip() if id_column else paths,
            "path": paths,
            "split": splits,
        }
    )
    if clips["clip_id"].duplicated().any():
        dup = clips["clip_id"][clips["clip_id"].duplicated()].iat[0]
        raise ValueError(f"{table}: clip id {dup!r} occurs more than once")
    suffixes = clips["path"].map(lambda p: Path(p).suffix.lower())
    if not suffixes.isin(AUDIO_EXTENSIONS).all():
        odd = clips["path"][~suffixes.isin(AUDIO_EXTENSIONS)].iat[0]
        logger.warning(
            "%s: %r is not a %s file; decoding will be tried anyway",
            table,
            odd,
            "/".join(AUDIO_EXTENSIONS),
        )
    clips, labels, dropped = drop_missing_audio(
        clips, labels, table.parent, f"paths of {table.name}"
    )
    source = Source(
        dataset="table",
        root=table.parent,
        tags=tags,
        clips=clips,
        labels=labels,
        dropped=dropped,
        min_duration=min_duration,
        options={
            "table": str(table),
            "split": "column" if has_split else {"fractions": list(fractions), "seed": seed},
        },
    )
    logger.info("table: %d tags, clips train/valid/test %s", len(tags), source.split_counts())
    return source


def read_synth(root: str | os.PathLike, **options: Any) -> Source:
    """:func:`read_mtat` on a synthetic dataset (``resemul data synth``, with or without
    ``--mtat``); a ``FileNotFoundError`` if ``root`` holds no :data:`SYNTH_MARKER`."""
    if not (Path(root) / SYNTH_MARKER).is_file():
        raise FileNotFoundError(
            f"{root}: no {SYNTH_MARKER}, so not a synthetic dataset (resemul data synth writes one)"
        )
    return read_mtat(root, **options)


#: Adapter per ``--dataset`` name.
SOURCES: dict[str, Callable[..., Source]] = {
    "mtat": read_mtat,
    "msd": read_msd,
    "table": read_table,
    "synth": read_synth,
}


def read_source(dataset: str, root: str | os.PathLike, **options: Any) -> Source:
    """Call the adapter named ``dataset`` (a key of :data:`SOURCES`) on ``root``."""
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(SOURCES)}")
    return SOURCES[dataset](root, **options)
