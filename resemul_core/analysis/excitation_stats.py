"""The excitation analysis' statistics: pure functions over arrays (specification §5).

Public:

* loudness: :func:`segment_rms`, :func:`rms_to_db`, :func:`rms_loudness`,
  :func:`segment_loudness`, :data:`LOUDNESS_MEASURES`, :data:`DEFAULT_FLOOR_DB`;
* analyses: :func:`clip_means`, :func:`tag_means`, :func:`std_across_tags`,
  :func:`std_per_level`, :func:`loudness_regression`, :func:`slope_counts`,
  :func:`notable_channels`, :func:`loudness_summary`, :func:`summarize_excitations`,
  :data:`SLOPE_CONVENTION`;
* the paper's numbers: :data:`PAPER_STD_ACROSS_TAGS`, :data:`PAPER_SLOPE_COUNTS`.

The gates these functions take are extracted by :mod:`resemul_core.analysis.excitations`;
apart from :func:`summarize_excitations`, which reads an
:class:`~resemul_core.analysis.excitations.ExcitationSet`, every function takes and returns
numpy arrays or pandas tables.

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

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from resemul_core.analysis import statistics
from resemul_core.data import audio

if TYPE_CHECKING:
    from resemul_core.analysis.excitations import ExcitationSet

__all__ = [
    "PAPER_STD_ACROSS_TAGS",
    "PAPER_SLOPE_COUNTS",
    "LOUDNESS_MEASURES",
    "DEFAULT_FLOOR_DB",
    "SLOPE_CONVENTION",
    "segment_rms",
    "rms_to_db",
    "rms_loudness",
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
#: the excitation analysis has always exported.
rms_to_db = audio.dbfs


def rms_loudness(
    rms: np.ndarray, measure: str = "rms", *, floor_db: float = DEFAULT_FLOOR_DB
) -> np.ndarray:
    """Loudness from RMS amplitudes: the amplitude itself (``"rms"``) or dBFS (``"db"``)."""
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
    return rms_loudness(segment_rms(segments), measure, floor_db=floor_db)


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
    num_resamples: int = statistics.DEFAULT_RESAMPLES,
) -> dict[str, Any]:
    """The analysis' headline numbers next to the paper's, as a JSON-able dict.

    Args:
        excitations: an :class:`~resemul_core.analysis.excitations.ExcitationSet` whose first
            level has per-segment gates.
        loudness: ``"rms"`` or ``"db"`` (see :func:`segment_loudness`).
        floor_db: floor of the dB measure.
        num_resamples: bootstrap resamples of the test clips for the intervals
            (:func:`~resemul_core.analysis.statistics.std_profile_intervals`).

    Returns:
        ``{"variant", "split", "num_clips", "num_segments", "num_tags",
        "std_across_tags": [{"level", "channels", "std", "paper", "low", "high"}, ...],
        "shape": {"middle_levels", "first_minus_middle", "last_minus_middle"} or None,
        "gates": [{"level", "mean", "p05", "p95", "channel_min", "channel_max",
        "mean_abs_from_half"}, ...], "loudness": {...}, "paper": {"std_across_tags": {...},
        "slope_counts": {...}}}``; NaN becomes ``None``. ``low``/``high`` and ``shape`` are
        the clip-bootstrap intervals of
        :func:`~resemul_core.analysis.statistics.std_profile_intervals` (``shape`` is
        ``None`` below three levels), ``gates`` is
        :func:`~resemul_core.analysis.statistics.gate_spread` per level and ``loudness`` is
        :func:`loudness_summary` of the first level.
        :func:`resemul_core.analysis.plots.excitation_figures` draws from this dict.
    """
    levels = excitations.levels
    table = std_per_level(excitations.clip, excitations.labels, levels=levels)
    first = excitations.segment_level(levels[0])
    loud = excitations.loudness(loudness, floor_db=floor_db)
    shape = (
        statistics.std_profile_intervals(
            excitations.clip, excitations.labels, levels, num_resamples=num_resamples
        )
        if len(levels) >= 3
        else None
    )
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
                **(
                    {
                        "low": shape["levels"][int(row["level"])].low,
                        "high": shape["levels"][int(row["level"])].high,
                    }
                    if shape
                    else {}
                ),
            }
            for _, row in table.iterrows()
        ],
        "shape": None
        if shape is None
        else {
            "middle_levels": shape["middle"],
            "first_minus_middle": shape["first_minus_middle"].to_dict(),
            "last_minus_middle": shape["last_minus_middle"].to_dict(),
        },
        "gates": [
            {"level": int(lv), **statistics.gate_spread(x)}
            for lv, x in zip(levels, excitations.clip, strict=True)
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
