"""Uncertainty of the book's numbers: bootstrap intervals over test clips, spread over seeds.

Public: :class:`Interval`, :func:`bootstrap_weights`, :func:`weighted_roc_auc`,
:func:`weighted_average_precision`, :func:`macro_scores`, :func:`score_interval`,
:func:`paired_difference`, :func:`seed_interval`, :func:`weighted_std_across_tags`,
:func:`middle_levels`, :func:`std_profile_intervals`, :func:`gate_spread`, :data:`METRICS`.

Pure functions over numpy arrays. The test protocol is the paper's (specification §3); the
intervals are this project's addition, explained in the book's evaluation chapter. Shape
legend: K = clips, T = tags, S = seeds (training runs of one variant that differ only in their
seed), R = bootstrap resamples, C = channels.

**Resampling by weights.** A bootstrap resample draws K clips with replacement; a clip drawn
``w`` times counts ``w`` times. Every statistic here is computed on the *original* clips with
those counts as weights, which gives exactly the number the duplicated data would give (a
duplicate carries its clip's score and label, so it can only tie with itself), and lets all
resamples share one sort of the scores. :func:`weighted_roc_auc` with unit weights is
scikit-learn's ``roc_auc_score``; with integer weights, ``roc_auc_score`` of the resample.

**Two sources of uncertainty.** A *clip interval* (:func:`score_interval`,
:func:`paired_difference`) says how much a score would move on another test set of the same
size from the same distribution, the trained models held fixed. A *seed interval*
(:func:`seed_interval`) says how much it moves when the model is trained again from another
seed, the test set held fixed. With several seeds, clip intervals are computed for the mean
over seeds (each resample scores every seed's model on the same clips). Neither covers the
other; the paper publishes neither.

**Paired differences.** Two variants scored on the same resample of the same clips: the
clip-to-clip variation they share cancels, so the interval of the difference is much narrower
than the two separate intervals suggest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = [
    "METRICS",
    "Interval",
    "bootstrap_weights",
    "gate_spread",
    "macro_scores",
    "middle_levels",
    "paired_difference",
    "score_interval",
    "seed_interval",
    "std_profile_intervals",
    "weighted_average_precision",
    "weighted_roc_auc",
    "weighted_std_across_tags",
]

#: The clip-level metrics, by the names the result tables use.
METRICS = ("roc_auc", "pr_auc")

#: Default number of bootstrap resamples: the 2.5 % and 97.5 % percentiles of 2,000 draws
#: move by about 0.1 of the interval's half-width from one set of draws to the next.
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and a two-sided interval around it.

    Attributes:
        estimate: the statistic on all data (all clips, mean over seeds).
        low, high: the interval's ends (NaN when it cannot be computed, e.g. one seed).
        level: the coverage it is meant to have, e.g. 0.95.
        source: what was resampled: ``"clips"`` (bootstrap) or ``"seeds"`` (t over seeds).
    """

    estimate: float
    low: float
    high: float
    level: float
    source: str

    @property
    def sign(self) -> int:
        """+1 if the whole interval is above 0, -1 if below, 0 if it holds 0 (or is NaN)."""
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0

    def to_dict(self) -> dict[str, float | str | None]:
        """JSON-ready, NaN as ``None``."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.estimate:.4f}"
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_weights(
    num_items: int, num_resamples: int = DEFAULT_RESAMPLES, *, seed: int = 0
) -> np.ndarray:
    """How often each item is drawn in each bootstrap resample.

    Returns:
        ``(R, num_items)`` int64 counts; every row sums to ``num_items``. The same ``seed``
        gives the same draws, so two variants scored with the same weights are paired.
    """
    if num_items < 1 or num_resamples < 1:
        raise ValueError(
            f"need at least one item and one resample, got {num_items} and {num_resamples}"
        )
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_items, np.full(num_items, 1.0 / num_items), size=num_resamples)


def _groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted 1-D array."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def _check(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(y_score, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if y.ndim != 2 or s.shape != y.shape:
        raise ValueError(
            f"expected y_true and y_score of one shape (K, T), found {y.shape} and {s.shape}"
        )
    if w.shape[1] != y.shape[0]:
        raise ValueError(f"weights of shape {w.shape} do not fit {y.shape[0]} clips")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0/1 labels")
    if not np.isfinite(s).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y, s, w


def weighted_roc_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC of every tag under every set of clip weights.

    The area is the weighted share of (positive, negative) clip pairs that the score orders
    correctly, ties counting one half (the Mann-Whitney statistic).

    Args:
        y_true: ``(K, T)`` 0/1 labels.
        y_score: ``(K, T)`` scores.
        weights: ``(R, K)`` non-negative clip weights (e.g. :func:`bootstrap_weights`), or
            ``(K,)`` for one set.

    Returns:
        ``(R, T)`` float64; NaN where a tag has no positive or no negative weight.
    """
    y, s, w = _check(y_true, y_score, weights)
    out = np.full((w.shape[0], y.shape[1]), np.nan)
    for t in range(y.shape[1]):
        order = np.argsort(s[:, t], kind="stable")
        starts = _groups(s[order, t])
        wp = np.add.reduceat(w[:, order] * y[order, t], starts, axis=1)  # R, G
        wn = np.add.reduceat(w[:, order] * (1.0 - y[order, t]), starts, axis=1)
        below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
        pos, neg = wp.sum(axis=1), wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, t] = np.where(
                (pos > 0) & (neg > 0), (wp * (below + 0.5 * wn)).sum(axis=1) / (pos * neg), np.nan
            )
    return out


def weighted_average_precision(
    y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Average precision (PR-AUC, the step-wise sum) of every tag under every set of weights.

    Thresholds run over the distinct scores from the highest down; at each, the recall gained
    is weighted by the precision reached (tied clips enter together), as in scikit-learn's
    ``average_precision_score``.

    Args:
        as :func:`weighted_roc_auc`.

    Returns:
        ``(R, T)`` float64; NaN where a tag has no positive or no negative weight (such a tag
        is left out of the macro means, as in :func:`~resemul_core.analysis.evaluate.tag_metrics`).
    """
    y, s, w = _check(y_true, y_score, weights)
    out = np.full((w.shape[0], y.shape[1]), np.nan)
    for t in range(y.shape[1]):
        order = np.argsort(-s[:, t], kind="stable")
        starts = _groups(s[order, t])
        wp = np.add.reduceat(w[:, order] * y[order, t], starts, axis=1)
        wn = np.add.reduceat(w[:, order] * (1.0 - y[order, t]), starts, axis=1)
        tp, fp = np.cumsum(wp, axis=1), np.cumsum(wn, axis=1)
        pos, neg = tp[:, -1], fp[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp > 0, tp / (tp + fp), 0.0)
            out[:, t] = np.where((pos > 0) & (neg > 0), (wp * precision).sum(axis=1) / pos, np.nan)
    return out


_PER_TAG = {"roc_auc": weighted_roc_auc, "pr_auc": weighted_average_precision}


def macro_scores(
    y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray, metric: str = "roc_auc"
) -> np.ndarray:
    """Macro (tag-averaged) metric under every set of weights, averaged over seeds.

    Args:
        y_true: ``(K, T)`` labels.
        y_score: ``(K, T)``, or ``(S, K, T)`` for S models scored on the same clips.
        weights: ``(R, K)`` clip weights.
        metric: ``"roc_auc"`` or ``"pr_auc"``.

    Returns:
        ``(R,)``: for each resample, the mean over seeds of the mean over the tags that have
        a positive and a negative clip in it.
    """
    if metric not in _PER_TAG:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    scores = np.asarray(y_score, dtype=np.float64)
    scores = scores[None] if scores.ndim == 2 else scores
    per_seed = [np.nanmean(_PER_TAG[metric](y_true, s, weights), axis=1) for s in scores]
    return np.mean(per_seed, axis=0)


def _percentiles(
    estimate: float, draws: np.ndarray, level: float, source: str, *, basic: bool = False
) -> Interval:
    """The bootstrap interval from the draws: percentile, or ``basic`` (reflected around the
    estimate, ``2 * estimate - q``), which corrects a statistic whose resampled values are
    shifted away from it (the std across tags grows when clips are duplicated)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    draws = draws[np.isfinite(draws)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail]) if draws.size else (math.nan, math.nan)
    if basic:
        low, high = 2 * estimate - high, 2 * estimate - low
    return Interval(float(estimate), float(low), float(high), level, source)


def _bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    num_items: int,
    num_resamples: int,
    level: float,
    seed: int,
) -> Interval:
    """Percentile interval of ``statistic`` (clip weights ``(R, K)`` -> ``(R,)``) over
    bootstrap resamples, its estimate on all clips (unit weights)."""
    estimate = statistic(np.ones((1, num_items)))[0]
    draws = statistic(bootstrap_weights(num_items, num_resamples, seed=seed))
    return _percentiles(estimate, draws, level, "clips")


def score_interval(
    y_true: np.ndarray,
    y_score: np.ndarray,
    metric: str = "roc_auc",
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of a macro score over resampled test clips.

    Args:
        y_true: ``(K, T)`` labels.
        y_score: ``(K, T)`` or ``(S, K, T)`` (then the score is the mean over the S models).
        metric: ``"roc_auc"`` or ``"pr_auc"``.
        num_resamples: bootstrap resamples.
        level: coverage of the interval.
        seed: seed of the resampling; the same seed draws the same clips for every variant.

    Returns:
        :class:`Interval` with ``source="clips"``; the estimate is the score on all clips.
    """
    y = np.asarray(y_true)
    return _bootstrap(
        lambda w: macro_scores(y, y_score, w, metric), y.shape[0], num_resamples, level, seed
    )


def paired_difference(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    metric: str = "roc_auc",
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Paired bootstrap interval of ``metric(a) - metric(b)`` on the same test clips.

    Args:
        y_true: ``(K, T)`` labels.
        score_a, score_b: ``(K, T)`` or ``(S, K, T)`` scores of two variants on those clips
            (each the mean over its seeds).

    Returns:
        :class:`Interval` of the difference, ``source="clips"``.
    """
    y = np.asarray(y_true)

    def difference(weights: np.ndarray) -> np.ndarray:
        return macro_scores(y, score_a, weights, metric) - macro_scores(y, score_b, weights, metric)

    return _bootstrap(difference, y.shape[0], num_resamples, level, seed)


def seed_interval(values: Sequence[float] | np.ndarray, *, level: float = 0.95) -> Interval:
    """Student-t interval of the mean of per-seed values (e.g. one score per training seed).

    Returns:
        :class:`Interval` with ``source="seeds"``; ``low``/``high`` NaN for fewer than two
        values (one run says nothing about the next).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"expected a non-empty 1-D array of per-seed values, found shape {x.shape}"
        )
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, level, "seeds")
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, level, "seeds")


def weighted_std_across_tags(
    clip_excitations: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """The "std across tags" of one block under every set of clip weights.

    For each tag the weighted mean excitation vector over the clips carrying it; for each
    channel the population std of those means across tags; the mean over channels
    (:func:`~resemul_core.analysis.excitation_stats.std_across_tags` with unit weights).

    Args:
        clip_excitations: ``(K, C)`` clip-level excitations.
        labels: ``(K, T)`` 0/1 labels.
        weights: ``(R, K)`` clip weights.

    Returns:
        ``(R,)``; tags without weight in a resample are left out of it.
    """
    x = np.asarray(clip_excitations, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or w.shape[1] != x.shape[0]:
        raise ValueError(
            f"expected (K, C), (K, T) and (R, K), found {x.shape}, {y.shape} and {w.shape}"
        )
    counts = w @ y  # R, T
    sums = np.einsum("rk,kt,kc->rtc", w, y, x, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, :, None]  # R, T, C; NaN for tags without weight
    return np.nanmean(np.nanstd(means, axis=1), axis=1)


def middle_levels(levels: Sequence[int]) -> list[int]:
    """The central half of the SE levels, the paper's "middle of the network" (levels 3-7
    of 9): the first and last quarter are left out, and always the first and last level."""
    levels = list(levels)
    if len(levels) < 3:
        raise ValueError(f"need at least 3 SE levels to have a middle, found {len(levels)}")
    cut = max(1, len(levels) // 4)
    return levels[cut : len(levels) - cut]


def std_profile_intervals(
    clip_excitations: Sequence[np.ndarray],
    labels: np.ndarray,
    levels: Sequence[int],
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, object]:
    """Clip-bootstrap intervals of the "std across tags" curve and of its shape.

    Args:
        clip_excitations: one ``(K, C_i)`` array per SE level; labels: ``(K, T)``;
        levels: the level numbers of the arrays.

    Returns:
        A dict with keys ``levels`` (an :class:`Interval` per level), ``middle`` (the levels
        of :func:`middle_levels`), ``first_minus_middle`` and ``last_minus_middle`` (the first
        or last level's value minus the mean over the middle levels, an :class:`Interval`
        whose resamples score every level on the same clips).

    Note:
        The std across tags of a resample is biased upwards (a duplicated clip makes its tags'
        means noisier), so a percentile interval can lie entirely above the estimate; these
        are *basic* bootstrap intervals, the percentiles reflected around the estimate, which
        undo such a shift.
    """
    levels = list(levels)
    if len(levels) != len(clip_excitations):
        raise ValueError(f"{len(levels)} levels for {len(clip_excitations)} arrays")
    y = np.asarray(labels)
    weights = bootstrap_weights(y.shape[0], num_resamples, seed=seed)
    ones = np.ones((1, y.shape[0]))
    pairs = list(zip(levels, clip_excitations, strict=True))
    point = {lv: weighted_std_across_tags(x, y, ones)[0] for lv, x in pairs}
    draws = {lv: weighted_std_across_tags(x, y, weights) for lv, x in pairs}
    middle = middle_levels(levels)

    def contrast(end: int) -> Interval:
        estimate = point[end] - np.mean([point[m] for m in middle])
        spread = draws[end] - np.mean([draws[m] for m in middle], axis=0)
        return _percentiles(estimate, spread, level, "clips", basic=True)

    return {
        "levels": {
            lv: _percentiles(point[lv], draws[lv], level, "clips", basic=True) for lv in levels
        },
        "middle": middle,
        "first_minus_middle": contrast(levels[0]),
        "last_minus_middle": contrast(levels[-1]),
    }


def gate_spread(clip_excitations: np.ndarray) -> dict[str, float]:
    """How far one level's gates moved from the 0.5 that a fresh SE block outputs.

    Args:
        clip_excitations: ``(K, C)`` clip-level gates in (0, 1).

    Returns:
        ``mean``, ``p05``/``p95`` (percentiles over all clip x channel gates),
        ``channel_min``/``channel_max`` (of the per-channel means) and ``mean_abs_from_half``
        (mean of ``|g - 0.5|``: 0 for an untrained block, up to 0.5).
    """
    g = np.asarray(clip_excitations, dtype=np.float64)
    channel = g.mean(axis=0)
    p05, p95 = np.percentile(g, [5, 95])
    return {
        "mean": float(g.mean()),
        "p05": float(p05),
        "p95": float(p95),
        "channel_min": float(channel.min()),
        "channel_max": float(channel.max()),
        "mean_abs_from_half": float(np.abs(g - 0.5).mean()),
    }
