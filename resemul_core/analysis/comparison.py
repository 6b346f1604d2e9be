"""The paper's comparisons with intervals: scores per variant and the differences it draws
conclusions from (specification §4), with the intervals of
:mod:`resemul_core.analysis.statistics`.

Public: :class:`Comparison`, :data:`PAPER_COMPARISONS`, :func:`stack_predictions`,
:func:`score_table`, :func:`difference_table`, :func:`best_variant_intervals`,
:func:`compare_variants`, :func:`resolved_sign`, :func:`score_display`,
:func:`difference_display`.

Input: the clip-level predictions each evaluated run left in its directory
(:func:`~resemul_core.training.run_dir.read_predictions`), grouped by training seed. Output:
tables whose intervals come from :mod:`resemul_core.analysis.statistics`: ``*_low``/``*_high``
from resampling the test clips (the mean over seeds being resampled), ``seed_*`` from the
spread over seeds (only with two or more seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from resemul_core.analysis.evaluate import PAPER_RESULTS
from resemul_core.analysis.statistics import (
    DEFAULT_RESAMPLES,
    METRICS,
    Interval,
    macro_scores,
    paired_difference,
    score_interval,
    seed_interval,
)
from resemul_core.config import VARIANTS

__all__ = [
    "PAPER_COMPARISONS",
    "Comparison",
    "best_variant_intervals",
    "compare_variants",
    "resolved_sign",
    "difference_display",
    "score_display",
    "difference_table",
    "score_table",
    "stack_predictions",
]


@dataclass(frozen=True)
class Comparison:
    """One difference the paper draws a conclusion from: ``score(a) - score(b)``."""

    name: str
    a: str
    b: str

    @property
    def paper(self) -> float:
        """The paper's MTAT difference (NaN if it reports either variant on another set)."""
        a, b = PAPER_RESULTS[self.a].get("mtat"), PAPER_RESULTS[self.b].get("mtat")
        return math.nan if a is None or b is None else round(a - b, 4)


_BLOCK_NAMES = {
    "basic": "Basic",
    "se": "SE",
    "res1": "Res-1",
    "res2": "Res-2",
    "rese1": "ReSE-1",
    "rese2": "ReSE-2",
}

#: The paper's comparisons: multi-level minus single-level head for every block, SE minus
#: Basic, ReSE-2 minus SE, and the residual blocks minus Basic (specification §4.1).
PAPER_COMPARISONS: tuple[Comparison, ...] = (
    *(Comparison(f"multi-level − single, {n}", f"{b}-multi", b) for b, n in _BLOCK_NAMES.items()),
    Comparison("SE − Basic", "se", "basic"),
    Comparison("SE − Basic, multi-level", "se-multi", "basic-multi"),
    Comparison("ReSE-2 − SE", "rese2", "se"),
    Comparison("ReSE-2 − SE, multi-level", "rese2-multi", "se-multi"),
    Comparison("Res-1 − Basic", "res1", "basic"),
    Comparison("Res-2 − Basic", "res2", "basic"),
)


def stack_predictions(
    predictions: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Put every seed's predictions of every variant on one axis, checking that they pair.

    Args:
        predictions: ``{seed_name: {variant: read_predictions(run)}}``; every run must have
            scored the same clips in the same order with the same labels and tags.

    Returns:
        ``(labels (K, T), tags, {variant: scores (S, K, T)})``, variants in registry order,
        seeds in the order given.

    Raises:
        ValueError: two runs scored different clips, labels or tags, or a variant is
            missing for some seed.
    """
    runs = [(seed, v, p) for seed, group in predictions.items() for v, p in group.items()]
    if not runs:
        raise ValueError("no predictions to compare")
    _, first_variant, first = runs[0]
    for seed, variant, p in runs[1:]:
        for key, what in (("clip_index", "clips"), ("labels", "labels"), ("tags", "tags")):
            if not np.array_equal(p[key], first[key]):
                where = f" of {seed}" if seed else ""
                raise ValueError(
                    f"the runs of {variant}{where} and {first_variant} scored different {what}; "
                    "evaluate every run on the same store and split"
                )
    variants = [v for v in VARIANTS if any(v in g for g in predictions.values())]
    scores = {}
    for v in variants:
        missing = [seed for seed, g in predictions.items() if v not in g]
        if missing:
            raise ValueError(f"{v} has no predictions for {', '.join(missing)}")
        scores[v] = np.stack(
            [np.asarray(g[v]["scores"], dtype=np.float64) for g in predictions.values()]
        )
    return np.asarray(first["labels"]), [str(t) for t in first["tags"]], scores


def _per_seed(labels: np.ndarray, scores: np.ndarray, metric: str) -> np.ndarray:
    """``(S,)`` macro score of each seed's model on all clips."""
    ones = np.ones((1, labels.shape[0]))
    return np.array([macro_scores(labels, s, ones, metric)[0] for s in scores])


def score_table(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
    dataset: str = "mtat",
) -> pd.DataFrame:
    """Every variant's macro ROC-AUC and PR-AUC with clip (and seed) intervals.

    Args:
        labels: ``(K, T)``; scores: ``{variant: (S, K, T)}`` (:func:`stack_predictions`).
        num_resamples, level, seed: of the bootstrap (:mod:`resemul_core.analysis.statistics`).
        dataset: the column of the paper's results to show beside ours.

    Returns:
        One row per variant: ``variant``, ``seeds``; for ``m`` in ``roc_auc``, ``pr_auc``:
        ``m`` (mean over seeds), ``m_low``/``m_high`` (clip bootstrap of that mean),
        ``m_seed_sd`` (standard deviation over seeds, NaN for one); ``paper_roc_auc``.
    """
    rows = []
    for variant, s in scores.items():
        row: dict[str, object] = {"variant": variant, "seeds": len(s)}
        for metric in METRICS:
            iv = score_interval(
                labels, s, metric, num_resamples=num_resamples, level=level, seed=seed
            )
            per_seed = _per_seed(labels, s, metric)
            row |= {
                metric: iv.estimate,
                f"{metric}_low": iv.low,
                f"{metric}_high": iv.high,
                f"{metric}_seed_sd": float(per_seed.std(ddof=1)) if len(s) > 1 else math.nan,
            }
        row["paper_roc_auc"] = PAPER_RESULTS.get(variant, {}).get(dataset, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def difference_table(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    comparisons: Sequence[Comparison] = PAPER_COMPARISONS,
    *,
    metric: str = "roc_auc",
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's differences in this build, with paired intervals.

    Comparisons whose variants were not both trained are left out.

    Returns:
        One row per comparison: ``comparison``, ``a``, ``b``, ``difference`` (mean over
        seeds of ``metric(a) - metric(b)``), ``low``/``high`` (paired clip bootstrap),
        ``seed_low``/``seed_high`` (t interval over the per-seed differences; NaN for one
        seed), ``paper`` (the paper's difference) and ``sign`` (:func:`resolved_sign`).
    """
    rows = []
    for c in comparisons:
        if c.a not in scores or c.b not in scores:
            continue
        iv = paired_difference(
            labels,
            scores[c.a],
            scores[c.b],
            metric,
            num_resamples=num_resamples,
            level=level,
            seed=seed,
        )
        per_seed = _per_seed(labels, scores[c.a], metric) - _per_seed(labels, scores[c.b], metric)
        seeds = seed_interval(per_seed, level=level) if len(per_seed) > 1 else None
        sign = resolved_sign(iv, per_seed)
        rows.append(
            {
                "comparison": c.name,
                "a": c.a,
                "b": c.b,
                "difference": iv.estimate,
                "low": iv.low,
                "high": iv.high,
                "seed_low": seeds.low if seeds else math.nan,
                "seed_high": seeds.high if seeds else math.nan,
                "paper": c.paper,
                "sign": sign,
            }
        )
    columns = ["comparison", "a", "b", "difference", "low", "high", "seed_low", "seed_high"]
    return pd.DataFrame(rows, columns=[*columns, "paper", "sign"])


def resolved_sign(clips: Interval, per_seed: np.ndarray) -> int:
    """Whether a difference is resolved: +1 / -1 when its clip interval lies above / below 0
    *and* every seed's own difference (on all clips) has that sign, else 0.

    With one seed this is the clip interval alone, which says nothing about training
    another model: at the demo's budget two seeds of one variant differ by up to 0.05
    ROC-AUC (bench/RESULTS.md, "Demo design experiment"). With several, a difference that
    changes sign between training runs is not resolved whatever its clip interval; a
    t interval over so few seeds would almost never exclude 0 (12.7 standard errors wide for
    two seeds), so sign agreement is the rule and the t interval is only shown.
    """
    if clips.sign == 0:
        return 0
    return clips.sign if bool(np.all(np.sign(per_seed) == clips.sign)) else 0


def best_variant_intervals(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    best: str,
    *,
    metric: str = "roc_auc",
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``score(best) - score(other)`` for every other variant, each a paired difference.

    Returns:
        One row per other variant: ``other``, ``difference``, ``low``, ``high``, ``sign``
        (:func:`resolved_sign`).
    """
    rows = []
    for other, s in scores.items():
        if other != best:
            iv = paired_difference(
                labels,
                scores[best],
                s,
                metric,
                num_resamples=num_resamples,
                level=level,
                seed=seed,
            )
            per_seed = _per_seed(labels, scores[best], metric) - _per_seed(labels, s, metric)
            rows.append(
                {
                    "other": other,
                    "difference": iv.estimate,
                    "low": iv.low,
                    "high": iv.high,
                    "sign": resolved_sign(iv, per_seed),
                }
            )
    return pd.DataFrame(rows, columns=["other", "difference", "low", "high", "sign"])


#: The single-convolution blocks' multi-level variants, which SE is claimed to beat.
_SINGLE_CONV_MULTI = ("se-multi", "basic-multi", "res1-multi", "rese1-multi")


def compare_variants(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    *,
    time_ratio: float | None = None,
    num_resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Everything the evaluation chapter shows: scores, the paper's differences and its claims.

    Args:
        labels: ``(K, T)``; scores: ``{variant: (S, K, T)}`` (:func:`stack_predictions`).
        time_ratio: ReSE-2 / SE time per training step, for the timing claim.

    Returns:
        A dict of three tables: ``scores_table`` (:func:`score_table`), ``differences``
        (:func:`difference_table`) and ``claims``
        (:func:`~resemul_core.analysis.claims.evaluation_claims`).
    """
    from resemul_core.analysis.claims import evaluation_claims

    options = {"num_resamples": num_resamples, "level": level, "seed": seed}
    differences = difference_table(labels, scores, **options)
    singles = {v: scores[v] for v in _SINGLE_CONV_MULTI if v in scores}
    se_vs_single = (
        best_variant_intervals(labels, singles, "se-multi", **options)
        if "se-multi" in scores
        else None
    )
    rese2_vs_all = (
        best_variant_intervals(labels, scores, "rese2-multi", **options)
        if "rese2-multi" in scores
        else None
    )
    return {
        "scores_table": score_table(labels, scores, **options),
        "differences": differences,
        "claims": evaluation_claims(
            differences, se_vs_single=se_vs_single, rese2_vs_all=rese2_vs_all, time_ratio=time_ratio
        ),
    }


def _span(estimate: float, low: float, high: float, digits: int = 4) -> str:
    if math.isnan(low):
        return f"{estimate:.{digits}f}"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def score_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`score_table` as the book prints it: one string per score with its interval.

    Columns: ``ROC-AUC [95 % clips]``, ``PR-AUC [95 % clips]``, ``± sd over seeds`` (only
    with several seeds) and ``paper ROC-AUC (MTAT)``, indexed by variant.
    """
    out = pd.DataFrame(index=pd.Index(table["variant"], name="variant"))
    for metric, name in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
        out[f"{name} [95 % clips]"] = [
            _span(r[metric], r[f"{metric}_low"], r[f"{metric}_high"])
            for r in table.to_dict("records")
        ]
    if (table["seeds"] > 1).any():
        out["ROC-AUC ± sd over seeds"] = [
            f"{r['roc_auc']:.4f} ± {r['roc_auc_seed_sd']:.4f}" for r in table.to_dict("records")
        ]
    out["paper ROC-AUC (MTAT)"] = [f"{x:.4f}" for x in table["paper_roc_auc"]]
    return out


def difference_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`difference_table` as the book prints it, indexed by comparison."""
    out = pd.DataFrame(index=pd.Index(table["comparison"], name="comparison (a − b)"))
    out["this build [95 % clips]"] = [
        _span(r["difference"], r["low"], r["high"], 4) for r in table.to_dict("records")
    ]
    if table["seed_low"].notna().any():
        out["[95 % over seeds]"] = [
            f"[{r['seed_low']:+.4f}, {r['seed_high']:+.4f}]" for r in table.to_dict("records")
        ]
    out["resolved"] = table["sign"].map({1: "a > b", -1: "a < b", 0: "no"}).to_numpy()
    out["paper (MTAT)"] = [f"{x:+.4f}" for x in table["paper"]]
    return out
