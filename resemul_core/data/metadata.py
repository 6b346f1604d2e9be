"""A dataset's metadata before decoding: the :class:`Source` record and the checks that read it.

Public: :class:`Source`, :func:`read_delimited`, :func:`require_columns`, :func:`binary_matrix`,
:func:`dropped_records`, :func:`drop_missing_audio`, :data:`SPLIT_POLICIES`.

Every adapter (:mod:`resemul_core.data.sources`, :mod:`resemul_core.data.msd`) returns a
:class:`Source`: which clips, where their audio is, their split and their 0/1 tag vector, and
the clips it left out with a reason. The functions here are the checks the adapters share:
reading a CSV/TSV as strings, required columns, 0/1 tag columns, and dropping clips whose audio
file does not exist; each error names the file and the first offending column or row. The MTAT
and MSD readers also share the split policies and the check that a path from a metadata file
stays inside the dataset's folder; they live here, not in :mod:`~resemul_core.data.sources`,
because that module imports :mod:`~resemul_core.data.msd` (for its ``read_source``), so the MSD
module could not import them from there without an import cycle.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resemul_core.data.store import SPLITS

__all__ = [
    "SPLIT_POLICIES",
    "Source",
    "binary_matrix",
    "drop_missing_audio",
    "dropped_records",
    "read_delimited",
    "require_columns",
]


#: ``paper``: Lee et al.'s split (specification §1.1/§1.2): also drop clips with less than 29.1 s of
#: audio and MTAT's three known zero-byte files. ``resemul``: the official code's split.
SPLIT_POLICIES = ("paper", "resemul")
#: Seconds of audio a clip needs under the ``paper`` policy (poster: "29.1 s each").
PAPER_MIN_DURATION = 29.1


@dataclass
class Source:
    """A dataset's clips before decoding.

    Attributes:
        dataset: 'mtat', 'synth' (a synthetic dataset in MTAT's layout), 'msd' or 'table'.
        root: folder the clip paths are relative to.
        tags: tag names, the label columns in order.
        clips: one row per clip: ``clip_id`` (str), ``path`` (str, relative to ``root``;
            only a table dataset's may be absolute or lead out of ``root``),
            ``split`` ('train'/'valid'/'test').
        labels: ``(num_clips, num_tags)`` uint8 0/1.
        dropped: clips left out, each ``{"clip_id", "path", "split", "reason", "detail"}``.
        min_duration: seconds of decoded audio a clip needs (``None``: one segment suffices);
            shorter clips are skipped at prepare time with reason 'too short'.
        options: the adapter's arguments, recorded in the store manifest.
        expected_counts: (train, valid, test) clip counts the finished store should have on
            the real dataset (a warning is logged when it does not), or ``None``.
    """

    dataset: str
    root: Path
    tags: list[str]
    clips: pd.DataFrame
    labels: np.ndarray
    dropped: list[dict[str, Any]] = field(default_factory=list)
    min_duration: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    expected_counts: tuple[int, int, int] | None = None

    def split_counts(self) -> tuple[int, int, int]:
        """(train, valid, test) clip counts."""
        counts = self.clips["split"].value_counts()
        return tuple(int(counts.get(s, 0)) for s in SPLITS)  # type: ignore[return-value]


def read_delimited(path: Path, *, sep: str | None = None) -> pd.DataFrame:
    """A CSV/TSV as strings (``"NA"`` stays a string); quoted and unquoted fields both work.

    Column names are stripped of surrounding spaces. A name that occurs twice in the header
    (after stripping) is a ValueError naming the file, the column and both positions: pandas
    would silently rename the second ``piano`` to ``piano.1``, which an adapter would then
    take for another tag. Unnamed (empty) columns are exempt; pandas names them itself.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    options: dict[str, Any] = {"sep": sep, "dtype": str, "keep_default_na": False, "quotechar": '"'}
    try:
        frame = pd.read_csv(path, **options)
        # the header as written: read_csv renames repeated names (piano, piano.1)
        header = pd.read_csv(path, header=None, nrows=1, **options)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        kind = "TSV" if sep == "\t" else "CSV"
        raise ValueError(f"{path}: cannot parse as a {kind}: {err}") from err
    first: dict[str, int] = {}
    for position, name in enumerate(str(c).strip() for c in header.iloc[0]):
        if name and name in first:
            raise ValueError(
                f"{path}: column {name!r} occurs more than once in the header"
                f" (columns {first[name] + 1} and {position + 1})"
            )
        first.setdefault(name, position)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def require_columns(frame: pd.DataFrame, columns: Sequence[str], file: Path) -> None:
    """ValueError naming ``file``, the missing columns and the ones found, unless ``frame``
    has every column of ``columns``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{file}: missing column(s) {', '.join(map(repr, missing))};"
            f" found {', '.join(map(repr, frame.columns[:12]))}"
            + (" ..." if len(frame.columns) > 12 else "")
        )


def binary_matrix(frame: pd.DataFrame, columns: Sequence[str], file: Path) -> np.ndarray:
    """The 0/1 tag columns as uint8 ``(rows, len(columns))``; ValueError naming a bad column."""
    out = np.zeros((len(frame), len(columns)), dtype=np.uint8)
    for k, column in enumerate(columns):
        values = frame[column].astype(str).str.strip()
        bad = ~values.isin(("0", "1"))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{file}: tag column {column!r} must hold 0 or 1; row {row + 1} holds"
                f" {values.iat[row]!r}"
            )
        out[:, k] = (values == "1").to_numpy()
    return out


def dropped_records(
    frame: pd.DataFrame, mask: np.ndarray, reason: str, detail: str
) -> list[dict[str, Any]]:
    """The :attr:`Source.dropped` records of the clips of ``frame`` where ``mask`` is True."""
    rows = frame.loc[mask, ["clip_id", "path", "split"]]
    return [
        {"clip_id": c, "path": p, "split": s, "reason": reason, "detail": detail}
        for c, p, s in rows.itertuples(index=False)
    ]


def drop_missing_audio(
    clips: pd.DataFrame, labels: np.ndarray, root: Path, described: str
) -> tuple[pd.DataFrame, np.ndarray, list[dict[str, Any]]]:
    """Drop clips whose audio file does not exist; error if none exists at all."""
    exists = np.array([(root / p).is_file() for p in clips["path"]], dtype=bool)
    if len(clips) and not exists.any():
        example = root / clips["path"].iat[0]
        raise FileNotFoundError(
            f"none of the {len(clips)} audio files was found under {root} ({described});"
            f" e.g. {example}"
        )
    dropped = dropped_records(clips, ~exists, "missing file", f"no file under {root}")
    return clips.loc[exists].reset_index(drop=True), labels[exists], dropped


def _check_policy(policy: str) -> None:
    if policy not in SPLIT_POLICIES:
        raise ValueError(
            f"unknown split policy {policy!r}; valid policies: {', '.join(SPLIT_POLICIES)}"
        )


def _inside_root(path: str) -> str | None:
    """``path`` with ``.``, ``..`` and doubled slashes resolved as text, or ``None`` if that
    is absolute or leaves the folder it is relative to.

    The check reads the path as written and touches no file: a symbolic link *inside* the
    folder is followed wherever it points, since whoever assembled the dataset put it there.
    """
    norm = posixpath.normpath(path) if path else path
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        return None
    return norm


def _skip(clip_id: str, path: str, split: str, reason: str, detail: str) -> dict[str, Any]:
    """One :attr:`~resemul_core.data.metadata.Source.dropped` record."""
    return {"clip_id": clip_id, "path": path, "split": split, "reason": reason, "detail": detail}
