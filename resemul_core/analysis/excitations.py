"""Excitation analysis: what the squeeze-and-excitation gates learn (specification §5).

Public:

* extraction: :func:`extract_excitations` (model + segment store -> :class:`ExcitationSet`),
  :func:`save_excitations`, :func:`load_excitations`, :func:`require_se`, :func:`se_variants`;
* loudness: :func:`segment_rms`, :func:`rms_to_db`, :func:`segment_loudness`;
* analyses, pure functions over arrays: :func:`clip_means`, :func:`tag_means`,
  :func:`std_across_tags`, :func:`std_per_level`, :func:`loudness_regression`,
  :func:`slope_counts`, :func:`notable_channels`, :func:`loudness_summary`,
  :func:`summarize_excitations`;
* the paper's numbers: :data:`PAPER_STD_ACROSS_TAGS`, :data:`PAPER_SLOPE_COUNTS`.

Shape legend: N = segments, K = clips, T = tags, C = channels of one SE block. A *level* is
the 1-based index of the block an SE gate belongs to (1..9 in the paper's model).

Note:
    The poster reports 109 first-block channels with positive and 19 with negative
    regression lines on loudness, while its own scatter plots slope the other way
    (specification §5.2).
    We report what the data says under :data:`SLOPE_CONVENTION`: slope = d excitation /
    d loudness, positive = excitation rises with loudness.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from resemul_core.config import VARIANTS, ModelConfig
from resemul_core.data import audio
from resemul_core.files import atomic_write
from resemul_core.model.inference import run_model
from resemul_core.runtime import select_device

__all__ = [
    "PAPER_STD_ACROSS_TAGS",
    "PAPER_SLOPE_COUNTS",
    "LOUDNESS_MEASURES",
    "DEFAULT_FLOOR_DB",
    "SLOPE_CONVENTION",
    "ExcitationSet",
    "se_variants",
    "require_se",
    "extract_excitations",
    "save_excitations",
    "load_excitations",
    "segment_rms",
    "rms_to_db",
    "segment_loudness",
    "clip_means",
    "tag_means",
    "std_across_tags",
    "std_per_level",
    "loudness_regression",
    "loudness_summary",
    "slope_counts",
    "notable_channels",
    "summarize_excitations",
]

logger = logging.getLogger(__name__)

#: The paper's "standard deviations across tags" per block level of the SE-multi model on
#: the MTAT test set, read off the published plot (specification §5.1; approximate to ~0.002).
PAPER_STD_ACROSS_TAGS: dict[int, float] = {
    1: 0.055,
    2: 0.022,
    3: 0.020,
    4: 0.022,
    5: 0.017,
    6: 0.029,
    7: 0.033,
    8: 0.036,
    9: 0.042,
}

#: The poster's count of first-block channels with positive / negative regression lines of
#: excitation on loudness (specification §5.2). Its own scatter plots suggest the opposite sign.
PAPER_SLOPE_COUNTS: dict[str, int] = {"positive": 109, "negative": 19}

LOUDNESS_MEASURES = ("rms", "db")

#: Floor of the dB loudness: segments quieter than this (including digital silence) read
#: as this value instead of -inf. The data layer's one floor,
#: :data:`resemul_core.data.audio.LOUDNESS_FLOOR_DB` (-80 dBFS), under this module's name.
DEFAULT_FLOOR_DB = audio.LOUDNESS_FLOOR_DB

SLOPE_CONVENTION = (
    "slope = d(excitation) / d(loudness) from a least-squares line over all segments; "
    "positive = the channel's excitation rises with loudness"
)

_FORMAT = "resemul-excitations"
_VERSION = 1


class SegmentSource(Protocol):
    """What :func:`extract_excitations` needs of a segment store (see ``store.SegmentStore``)."""

    tags: Sequence[str]
    clips: pd.DataFrame  # one row per clip, with a ``clip_id`` column
    labels: np.ndarray  # (num_clips, T) uint8

    def split_indices(self, split: str) -> np.ndarray: ...

    def read_clip(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ExcitationSet:
    """The SE gates of one model over one split, per clip and (for some levels) per segment.

    Attributes:
        levels: 1-based block level of each SE block, in block order.
        clip: one ``(K, C_i)`` float32 array per level: the gate averaged over the clip's
            segments (specification §5.1).
        segment: level -> ``(N, C_i)`` float32 per-segment gates, for the levels kept.
        segment_clip: ``(N,)`` int64, the row of ``clip``/``labels`` each segment belongs to.
        segment_rms: ``(N,)`` float32 RMS amplitude of each input segment (full scale = 1).
        clip_ids: ``(K,)`` clip identifiers as strings.
        labels: ``(K, T)`` uint8 binary tag labels.
        tags: the T tag names.
        variant: the model's variant name, e.g. ``"se-multi"``.
        split: the split the clips come from.
    """

    levels: tuple[int, ...]
    clip: tuple[np.ndarray, ...]
    segment: dict[int, np.ndarray]
    segment_clip: np.ndarray
    segment_rms: np.ndarray
    clip_ids: np.ndarray
    labels: np.ndarray
    tags: tuple[str, ...]
    variant: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        k, t = self.labels.shape
        if len(self.clip) != len(self.levels):
            raise ValueError(f"{len(self.clip)} clip arrays for {len(self.levels)} levels")
        for level, arr in zip(self.levels, self.clip, strict=True):
            if arr.ndim != 2 or arr.shape[0] != k:
                raise ValueError(f"level {level}: expected ({k}, C) clip array, found {arr.shape}")
        n = len(self.segment_clip)
        for level, arr in self.segment.items():
            if level not in self.levels or arr.shape != (n, self.channels(level)):
                raise ValueError(
                    f"level {level}: expected ({n}, {self.channels(level)}) segment array, "
                    f"found {arr.shape}"
                )
        if self.segment_rms.shape != (n,) or len(self.clip_ids) != k or len(self.tags) != t:
            raise ValueError("segment_rms, clip_ids and tags do not match segments/labels")

    @property
    def num_clips(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_segments(self) -> int:
        return int(len(self.segment_clip))

    def channels(self, level: int) -> int:
        """Number of channels C of the SE block at ``level``."""
        return int(self.clip[self._position(level)].shape[1])

    def clip_level(self, level: int) -> np.ndarray:
        """``(K, C)`` clip-mean gates of the SE block at ``level``."""
        return self.clip[self._position(level)]

    def segment_level(self, level: int) -> np.ndarray:
        """``(N, C)`` per-segment gates of the SE block at ``level``."""
        if level not in self.segment:
            kept = ", ".join(map(str, sorted(self.segment))) or "none"
            raise KeyError(
                f"per-segment excitations of level {level} were not kept (kept: {kept}); "
                "extract with segment_levels='all'"
            )
        return self.segment[level]

    def tag_means(self, level: int) -> np.ndarray:
        """``(T, C)`` mean clip excitation per tag, see :func:`tag_means`."""
        return tag_means(self.clip_level(level), self.labels)

    def loudness(self, measure: str = "rms", *, floor_db: float = DEFAULT_FLOOR_DB) -> np.ndarray:
        """``(N,)`` per-segment loudness as RMS amplitude or dB, see :func:`rms_to_db`."""
        return _rms_as(self.segment_rms, measure, floor_db=floor_db)

    def _position(self, level: int) -> int:
        try:
            return self.levels.index(level)
        except ValueError:
            raise KeyError(f"no SE block at level {level}; levels: {self.levels}") from None


# --- extraction ---------------------------------------------------------------------------


def se_variants() -> list[str]:
    """Names of the registered variants whose blocks carry SE gates (``se*``, ``rese*``)."""
    return [name for name, variant in VARIANTS.items() if variant.se]


def require_se(config: ModelConfig) -> None:
    """Raise ``ValueError`` unless the configured model has SE blocks.

    The message names the variant and lists the SE-bearing ones.
    """
    if not config.has_se:
        raise ValueError(
            f"variant {config.variant!r} has no squeeze-and-excitation blocks, so there are "
            f"no excitations to analyse; use one of: {', '.join(se_variants())}"
        )


def extract_excitations(
    model: torch.nn.Module,
    store: SegmentSource,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    segment_levels: str | Sequence[int] = "first",
    progress: bool = True,
) -> ExcitationSet:
    """Run every segment of a split through an SE model and collect its SE gates.

    Args:
        model: a :class:`~resemul_core.model.sample_cnn.SampleCNN` of an SE-bearing variant. It
            is moved to ``device`` and run in float32 and eval mode by
            :func:`~resemul_core.model.inference.run_model` (``forward_with_gates``); its
            training flag is restored afterwards.
        store: the segment store (``store.open_store``); segments ``(n_seg, L)`` with ``L`` the
            model's input length.
        split: which split's clips to use (the paper: ``"test"``).
        batch_size: segments per forward pass; batches span clip boundaries.
        device: where to run the model: a ``torch.device`` or a name for
            :func:`~resemul_core.runtime.select_device` (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
        segment_levels: levels whose per-segment gates are kept: ``"first"`` (the first SE
            block, what the loudness analysis needs), ``"all"``, or a list of levels.
        progress: show a tqdm progress bar over clips.

    Returns:
        an :class:`ExcitationSet` with clip means for every level.

    Raises:
        ValueError: the model has no SE blocks, or a clip's segments have the wrong length.

    Note:
        Per-segment gates of all nine paper-size blocks over the MTAT test split take about
        400 MB, so by default only the first block's are kept; clip means (specification §5.1) are
        accumulated on the fly for every level. Clips with no segments are skipped.
    """
    config: ModelConfig = model.config
    require_se(config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    levels = tuple(i + 1 for i, block in enumerate(model.blocks) if block.se is not None)
    keep = _segment_levels(segment_levels, levels)
    indices = np.asarray(store.split_indices(split), dtype=np.int64)
    if len(indices) == 0:
        raise ValueError(f"split {split!r} has no clips")

    device = select_device(str(device))
    model.to(device)
    counts = np.zeros(len(indices), dtype=np.int64)
    rms: list[np.ndarray] = []

    def clips() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for row, index in enumerate(
            tqdm(indices, desc=f"excitations ({split})", unit="clip", disable=not progress)
        ):
            segments = np.asarray(store.read_clip(int(index)), dtype=np.float32)
            if segments.ndim != 2 or segments.shape[1] != config.segment_length:
                raise ValueError(
                    f"clip {int(index)}: expected segments of shape (n, "
                    f"{config.segment_length}), found {segments.shape}"
                )
            counts[row] = len(segments)
            if len(segments):
                rms.append(segment_rms(segments))
                yield segments, np.full(len(segments), row, dtype=np.int64)

    sums: list[np.ndarray] = []  # per level (K, C_i) float64, sized at the first batch
    kept: dict[int, list[np.ndarray]] = {level: [] for level in keep}
    owners: list[np.ndarray] = []
    batches = _rebatch(clips(), batch_size)  # (segments (b, L), owner rows (b,))
    for _, gates, (owner,) in run_model(
        model, batches, device=device, precision="fp32", gates=True
    ):
        for pos, gate in enumerate(gates):
            g = gate.cpu().numpy()  # b, C_i
            if len(sums) < len(gates):
                sums.append(np.zeros((len(indices), g.shape[1])))
            np.add.at(sums[pos], owner, g)
            if levels[pos] in kept:
                kept[levels[pos]].append(g)
        owners.append(owner)

    present = counts > 0
    if not present.any():
        raise ValueError(f"split {split!r} has no segments")
    if not present.all():
        logger.warning("skipped %d clip(s) without segments", int((~present).sum()))
    # Rows of clips without segments are dropped, so segment -> clip rows are renumbered.
    new_row = np.cumsum(present) - 1
    clip_arrays = tuple((s[present] / counts[present, None]).astype(np.float32) for s in sums)
    clips = store.clips.iloc[indices[present]]
    result = ExcitationSet(
        levels=levels,
        clip=clip_arrays,
        segment={level: np.concatenate(parts) for level, parts in kept.items()},
        segment_clip=new_row[np.concatenate(owners)],
        segment_rms=np.concatenate(rms).astype(np.float32),
        clip_ids=clips["clip_id"].astype(str).to_numpy(),
        labels=np.asarray(store.labels)[indices[present]].astype(np.uint8),
        tags=tuple(store.tags),
        variant=config.variant,
        split=split,
    )
    logger.info(
        "extracted %d SE levels for %d clips / %d segments of split %r",
        len(levels),
        result.num_clips,
        result.num_segments,
        split,
    )
    return result


def _rebatch(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup ``(segments (n, L), owner rows (n,))`` chunks into batches of ``batch_size``
    segments (the last one may be smaller); batches span clip boundaries."""
    pending: list[np.ndarray] = []
    pending_owner: list[np.ndarray] = []
    size = 0
    for segments, owner in chunks:
        pending.append(segments)
        pending_owner.append(owner)
        size += len(segments)
        if size >= batch_size:
            batch, owners = np.concatenate(pending), np.concatenate(pending_owner)
            full = size - size % batch_size
            for start in range(0, full, batch_size):
                yield batch[start : start + batch_size], owners[start : start + batch_size]
            pending, pending_owner, size = [batch[full:]], [owners[full:]], size - full
    if size:
        yield np.concatenate(pending), np.concatenate(pending_owner)


def _segment_levels(spec: str | Sequence[int], levels: tuple[int, ...]) -> tuple[int, ...]:
    if spec == "first":
        return levels[:1]
    if spec == "all":
        return levels
    if isinstance(spec, str):
        raise ValueError(f"segment_levels must be 'first', 'all' or a list of levels, got {spec!r}")
    unknown = sorted(set(spec) - set(levels))
    if unknown:
        raise ValueError(f"no SE block at level(s) {unknown}; levels: {list(levels)}")
    return tuple(sorted(set(spec)))


def save_excitations(path: str | os.PathLike, excitations: ExcitationSet) -> Path:
    """Atomically write an :class:`ExcitationSet` as an uncompressed ``.npz`` file.

    Keys: ``clip_level_<k>`` ``(K, C)``, ``segment_level_<k>`` ``(N, C)``, ``levels``,
    ``segment_clip``, ``segment_rms``, ``clip_ids``, ``labels``, ``tags``, ``variant``,
    ``split``, ``format``, ``version``. Readable with ``np.load(allow_pickle=False)``.
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(_FORMAT),
        "version": np.array(_VERSION),
        "levels": np.asarray(excitations.levels, dtype=np.int64),
        "segment_clip": excitations.segment_clip.astype(np.int64),
        "segment_rms": excitations.segment_rms.astype(np.float32),
        "clip_ids": np.asarray(excitations.clip_ids, dtype=str),
        "labels": excitations.labels.astype(np.uint8),
        "tags": np.asarray(excitations.tags, dtype=str),
        "variant": np.array(excitations.variant),
        "split": np.array(excitations.split),
    }
    for level, arr in zip(excitations.levels, excitations.clip, strict=True):
        arrays[f"clip_level_{level}"] = arr.astype(np.float32)
    for level, arr in excitations.segment.items():
        arrays[f"segment_level_{level}"] = arr.astype(np.float32)
    path = Path(path)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)
    return path


def load_excitations(path: str | os.PathLike) -> ExcitationSet:
    """Read a file written by :func:`save_excitations`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an excitation file of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"excitation file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != _FORMAT:
            raise ValueError(f"{path} is not a resemul excitation file")
        if int(data["version"]) != _VERSION:
            raise ValueError(f"{path} has version {int(data['version'])}, expected {_VERSION}")
        levels = tuple(int(v) for v in data["levels"])
        return ExcitationSet(
            levels=levels,
            clip=tuple(data[f"clip_level_{k}"] for k in levels),
            segment={k: data[f"segment_level_{k}"] for k in levels if f"segment_level_{k}" in data},
            segment_clip=data["segment_clip"],
            segment_rms=data["segment_rms"],
            clip_ids=data["clip_ids"],
            labels=data["labels"],
            tags=tuple(str(t) for t in data["tags"]),
            variant=str(data["variant"]),
            split=str(data["split"]),
        )


# --- loudness -----------------------------------------------------------------------------


def segment_rms(segments: np.ndarray) -> np.ndarray:
    """Root-mean-square amplitude of each segment (:func:`resemul_core.data.audio.rms`).

    Args:
        segments: ``(N, L)`` samples in [-1, 1].

    Returns:
        ``(N,)`` float64 RMS amplitude, 0 for silence, 1 for a full-scale square wave.
    """
    if np.ndim(segments) != 2:
        raise ValueError(f"expected segments of shape (N, L), found {np.shape(segments)}")
    return audio.rms(segments, axis=1)


#: RMS amplitude in dBFS with a floor: :func:`resemul_core.data.audio.dbfs` under the name
#: this module has always exported.
rms_to_db = audio.dbfs


def _rms_as(rms: np.ndarray, measure: str, *, floor_db: float) -> np.ndarray:
    if measure == "rms":
        return np.asarray(rms, dtype=np.float64)
    if measure == "db":
        return audio.dbfs(rms, floor_db=floor_db)
    raise ValueError(f"unknown loudness measure {measure!r}; valid: {', '.join(LOUDNESS_MEASURES)}")


def segment_loudness(
    segments: np.ndarray, *, measure: str = "rms", floor_db: float = DEFAULT_FLOOR_DB
) -> np.ndarray:
    """Per-segment loudness of ``(N, L)`` samples: ``"rms"`` amplitude or ``"db"`` (dBFS).

    Note:
        The poster does not define its loudness; its 0-0.5 axis on [-1, 1] audio fits an RMS
        amplitude (specification §5.2), hence the default. No perceptual weighting is applied.
    """
    return _rms_as(segment_rms(segments), measure, floor_db=floor_db)


# --- analyses -----------------------------------------------------------------------------


def clip_means(
    segment_excitations: np.ndarray, segment_clip: np.ndarray, *, num_clips: int | None = None
) -> np.ndarray:
    """Average per-segment excitations over each clip's segments.

    Args:
        segment_excitations: ``(N, C)``.
        segment_clip: ``(N,)`` clip row of each segment, in ``0..K-1``.
        num_clips: K; defaults to ``segment_clip.max() + 1``.

    Returns:
        ``(K, C)`` float64; NaN rows for clips without segments.
    """
    x = np.asarray(segment_excitations, dtype=np.float64)
    rows = np.asarray(segment_clip, dtype=np.int64)
    if x.ndim != 2 or rows.shape != (x.shape[0],):
        raise ValueError(f"expected (N, C) and (N,), found {x.shape} and {rows.shape}")
    k = int(rows.max()) + 1 if num_clips is None else num_clips
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, rows, x)
    counts = np.bincount(rows, minlength=k)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def tag_means(clip_excitations: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean excitation vector over the clips carrying each tag (specification §5.1).

    Args:
        clip_excitations: ``(K, C)`` clip-level excitations of one block.
        labels: ``(K, T)`` binary labels.

    Returns:
        ``(T, C)`` float64; a NaN row for a tag no clip carries.
    """
    x = np.asarray(clip_excitations, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected (K, C) and (K, T), found {x.shape} and {y.shape}")
    counts = y.sum(axis=0)[:, None]  # T, 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (y.T @ x) / counts, np.nan)


def std_across_tags(tag_mean_vectors: np.ndarray) -> float:
    """For each channel the std of the tag means across tags, averaged over channels.

    Args:
        tag_mean_vectors: ``(T, C)`` from :func:`tag_means`; NaN rows (tags without clips)
            are left out.

    Returns:
        the mean over channels of the population standard deviation (ddof = 0, numpy's
        default) across tags.
    """
    m = np.asarray(tag_mean_vectors, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected (T, C) tag means, found {m.shape}")
    m = m[~np.isnan(m).any(axis=1)]
    if len(m) == 0:
        raise ValueError("no tag is carried by any clip")
    return float(m.std(axis=0, ddof=0).mean())


def std_per_level(
    clip_excitations: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    levels: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The paper's "standard deviations across tags" curve: one number per block level.

    Args:
        clip_excitations: one ``(K, C_i)`` array per SE block.
        labels: ``(K, T)`` binary labels.
        levels: the block level of each array; defaults to 1, 2, ...

    Returns:
        DataFrame with columns ``level``, ``channels``, ``std`` and ``paper`` (the value of
        :data:`PAPER_STD_ACROSS_TAGS` when there are nine levels as in the paper's model,
        else NaN).
    """
    levels = list(range(1, len(clip_excitations) + 1)) if levels is None else list(levels)
    if len(levels) != len(clip_excitations):
        raise ValueError(f"{len(levels)} levels for {len(clip_excitations)} arrays")
    compare = len(levels) == len(PAPER_STD_ACROSS_TAGS)
    rows = [
        {
            "level": int(level),
            "channels": int(np.shape(x)[1]),
            "std": std_across_tags(tag_means(x, labels)),
            "paper": PAPER_STD_ACROSS_TAGS.get(int(level), math.nan) if compare else math.nan,
        }
        for level, x in zip(levels, clip_excitations, strict=True)
    ]
    return pd.DataFrame(rows, columns=["level", "channels", "std", "paper"])


def loudness_regression(excitations: np.ndarray, loudness: np.ndarray) -> pd.DataFrame:
    """Per-channel least-squares line of excitation on loudness.

    Args:
        excitations: ``(N, C)`` per-segment excitations of one block.
        loudness: ``(N,)`` per-segment loudness (see :func:`segment_loudness`).

    Returns:
        DataFrame indexed by ``channel`` (0..C-1) with ``slope`` (d excitation / d loudness,
        positive = rises with loudness), ``intercept``, ``r2`` (NaN for a constant channel)
        and ``rmse`` (root mean squared residual).
    """
    y = np.asarray(excitations, dtype=np.float64)
    x = np.asarray(loudness, dtype=np.float64)
    if y.ndim != 2 or x.shape != (y.shape[0],):
        raise ValueError(f"expected (N, C) and (N,), found {y.shape} and {x.shape}")
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("loudness is the same for every segment; no slope can be fitted")
    y_mean = y.mean(axis=0)
    slope = dx @ (y - y_mean) / sxx
    intercept = y_mean - slope * x.mean()
    sse = ((y - intercept - np.outer(x, slope)) ** 2).sum(axis=0)
    syy = ((y - y_mean) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(syy > 0, 1.0 - sse / syy, np.nan)
    table = pd.DataFrame(
        {"slope": slope, "intercept": intercept, "r2": r2, "rmse": np.sqrt(sse / len(x))}
    )
    table.index.name = "channel"
    return table


def slope_counts(slopes: np.ndarray | pd.Series) -> dict[str, int]:
    """How many slopes are ``positive`` (> 0), ``negative`` (< 0) and exactly ``zero``."""
    s = np.asarray(slopes, dtype=np.float64)
    return {
        "positive": int((s > 0).sum()),
        "negative": int((s < 0).sum()),
        "zero": int((s == 0).sum()),
    }


def notable_channels(regression: pd.DataFrame) -> dict[str, int]:
    """The channels the poster singles out, from a :func:`loudness_regression` table.

    Returns:
        ``most_positive`` (largest slope), ``most_negative`` (smallest slope),
        ``most_neutral`` (smallest ``|slope|``) and ``least_error`` (smallest ``rmse``)
        channel numbers; ties go to the lowest channel.
    """
    return {
        "most_positive": int(regression["slope"].idxmax()),
        "most_negative": int(regression["slope"].idxmin()),
        "most_neutral": int(regression["slope"].abs().idxmin()),
        "least_error": int(regression["rmse"].idxmin()),
    }


def loudness_summary(
    segment_excitations: np.ndarray,
    loudness: np.ndarray,
    *,
    measure: str = "rms",
    level: int = 1,
    floor_db: float = DEFAULT_FLOOR_DB,
) -> dict[str, Any]:
    """Excitation vs loudness of one block, fitted once: the numbers the summary reports and
    the lines the scatter figure draws (:func:`resemul_core.analysis.plots.plot_loudness_scatter`).

    Args:
        segment_excitations: ``(N, C)`` per-segment excitations of one block.
        loudness: ``(N,)`` per-segment loudness in ``measure``.
        measure: ``"rms"`` or ``"db"``, recorded with the fits.
        level: the block level, recorded with the fits.
        floor_db: floor the dB loudness was computed with, recorded (``None`` for ``"rms"``).

    Returns:
        ``{"measure", "floor_db", "level", "convention", "channels", "positive", "negative",
        "zero", "average": {"slope", "intercept", "r2", "rmse"}, "notable": {name:
        {"channel", "slope", "intercept", "r2", "rmse"}}}``: :func:`slope_counts` of the
        per-channel :func:`loudness_regression`, the line of the channel average, and the
        :func:`notable_channels` with their lines; JSON-able, NaN becomes ``None``.
    """
    if measure not in LOUDNESS_MEASURES:
        raise ValueError(
            f"unknown loudness measure {measure!r}; valid: {', '.join(LOUDNESS_MEASURES)}"
        )
    first = np.asarray(segment_excitations, dtype=np.float64)
    regression = loudness_regression(first, loudness)
    average = loudness_regression(first.mean(axis=1, keepdims=True), loudness).iloc[0]
    return {
        "measure": measure,
        "floor_db": float(floor_db) if measure == "db" else None,
        "level": int(level),
        "convention": SLOPE_CONVENTION,
        "channels": int(first.shape[1]),
        **slope_counts(regression["slope"]),
        "average": _floats(average),
        "notable": {
            name: {"channel": channel, **_floats(regression.loc[channel])}
            for name, channel in notable_channels(regression).items()
        },
    }


def summarize_excitations(
    excitations: ExcitationSet,
    *,
    loudness: str = "rms",
    floor_db: float = DEFAULT_FLOOR_DB,
) -> dict[str, Any]:
    """The analysis' headline numbers next to the paper's, as a JSON-able dict.

    Args:
        excitations: an :class:`ExcitationSet` whose first level has per-segment gates.
        loudness: ``"rms"`` or ``"db"`` (see :func:`segment_loudness`).
        floor_db: floor of the dB measure.

    Returns:
        ``{"variant", "split", "num_clips", "num_segments", "num_tags",
        "std_across_tags": [{"level", "channels", "std", "paper"}, ...],
        "loudness": :func:`loudness_summary` of the first level,
        "paper": {"std_across_tags": {...}, "slope_counts": {...}}}``; NaN becomes ``None``.
        :func:`resemul_core.analysis.plots.excitation_figures` draws from this dict.
    """
    levels = excitations.levels
    table = std_per_level(excitations.clip, excitations.labels, levels=levels)
    first = excitations.segment_level(levels[0])
    loud = excitations.loudness(loudness, floor_db=floor_db)
    return {
        "variant": excitations.variant,
        "split": excitations.split,
        "num_clips": excitations.num_clips,
        "num_segments": excitations.num_segments,
        "num_tags": len(excitations.tags),
        "std_across_tags": [
            {
                "level": int(row["level"]),
                "channels": int(row["channels"]),
                **_floats(row[["std", "paper"]]),
            }
            for _, row in table.iterrows()
        ],
        "loudness": loudness_summary(
            first, loud, measure=loudness, level=levels[0], floor_db=floor_db
        ),
        "paper": {
            "std_across_tags": {str(k): v for k, v in PAPER_STD_ACROSS_TAGS.items()},
            "slope_counts": dict(PAPER_SLOPE_COUNTS),
        },
    }


def _floats(values: Mapping[str, Any] | pd.Series) -> dict[str, float | None]:
    """Plain floats for JSON, NaN as None."""
    out = {}
    for key, value in dict(values).items():
        v = float(value)
        out[str(key)] = None if math.isnan(v) else v
    return out
