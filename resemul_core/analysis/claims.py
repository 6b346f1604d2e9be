"""The paper's qualitative claims against this build's evidence, with a computed verdict.

Public: :data:`VERDICTS`, :data:`TIME_RATIO_TOLERANCE`, :data:`LEARNED_GATES`,
:func:`evaluation_claims`,
:func:`excitation_claims`.

Every row of the tables these functions return is one claim of the paper (specification §4
and §5), the evidence this build has for it (an interval, a ratio, a count) and a verdict
decided by a fixed rule, never by hand:

* **reproduced**: the evidence resolves, and in the paper's direction;
* **contradicted**: the evidence resolves, against the paper's direction;
* **not resolved at this budget**: the interval holds zero (or the test is not significant),
  or, for the excitation claims, the SE gates involved have not moved from the 0.5 of an
  untrained block (:data:`LEARNED_GATES`).

"Resolves" means a 95 % interval that excludes zero (bootstrap over test clips, and over
seeds where there are several; :mod:`resemul_core.analysis.statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
from scipy import stats

__all__ = [
    "LEARNED_GATES",
    "TIME_RATIO_TOLERANCE",
    "VERDICTS",
    "evaluation_claims",
    "excitation_claims",
]

REPRODUCED, CONTRADICTED, OPEN = "reproduced", "contradicted", "not resolved at this budget"
#: The three verdicts, in the order the tables explain them.
VERDICTS = (REPRODUCED, CONTRADICTED, OPEN)

#: The SE gates of a level count as trained when their mean distance from 0.5 (what a fresh
#: SE block outputs) is at least this; below it, differences between levels are differences
#: between untrained gates, and the excitation claims on that level are not judged.
LEARNED_GATES = 0.05

#: A training-time ratio counts as "about 1.7" within this relative distance of it.
TIME_RATIO_TOLERANCE = 0.2
#: The paper's ReSE-2 / SE training-time ratio (the poster: "about 1.7 times longer").
PAPER_TIME_RATIO = 1.7

_COLUMNS = ["claim", "paper", "evidence", "verdict"]


def _verdict(sign: int, expected: int) -> str:
    """``sign``: +1 / -1 for evidence resolved above / below zero, 0 unresolved."""
    if sign == 0:
        return OPEN
    return REPRODUCED if sign == expected else CONTRADICTED


def _interval(row: Mapping[str, Any]) -> str:
    text = f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"
    if not math.isnan(row.get("seed_low", math.nan)):
        text += f"; over seeds [{row['seed_low']:+.4f}, {row['seed_high']:+.4f}]"
    return text


def _all_above(rows: pd.DataFrame) -> str:
    """Verdict for "X beats every one of these": all resolved above 0, any resolved below."""
    if (rows["sign"] < 0).any():
        return CONTRADICTED
    return REPRODUCED if (rows["sign"] > 0).all() else OPEN


def evaluation_claims(
    differences: pd.DataFrame,
    *,
    se_vs_single: pd.DataFrame | None = None,
    rese2_vs_all: pd.DataFrame | None = None,
    time_ratio: float | None = None,
) -> pd.DataFrame:
    """The claims of the paper's results table (specification §4.1).

    Args:
        differences: :func:`~resemul_core.analysis.comparison.difference_table` (ROC-AUC).
        se_vs_single: :func:`~resemul_core.analysis.comparison.best_variant_intervals` of
            ``se-multi`` against the other single-convolution multi-level variants
            (``basic-multi``, ``res1-multi``, ``rese1-multi``).
        rese2_vs_all: the same for ``rese2-multi`` against every other variant.
        time_ratio: ReSE-2 / SE time per training step in this build.

    Returns:
        Columns ``claim``, ``paper``, ``evidence``, ``verdict``; claims whose variants were
        not trained are left out.
    """
    rows = []
    for row in differences.to_dict("records"):
        if not row["comparison"].startswith("multi-level"):
            continue
        block = row["comparison"].split(", ", 1)[1]
        expected = 1 if row["paper"] > 0 else -1
        rows.append(
            {
                "claim": f"multi-level aggregation {'helps' if expected > 0 else 'hurts'} {block}",
                "paper": f"{row['paper']:+.4f}",
                "evidence": _interval(row),
                "verdict": _verdict(int(row["sign"]), expected),
            }
        )
    if se_vs_single is not None and len(se_vs_single):
        rows.append(
            {
                "claim": "SE is the best single-convolution block (multi-level heads)",
                "paper": "SE+multi 0.9111 > Basic 0.9077, ReSE-1 0.9053, Res-1 0.9037",
                "evidence": "; ".join(
                    f"vs {r['other']} {r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                    for r in se_vs_single.to_dict("records")
                ),
                "verdict": _all_above(se_vs_single),
            }
        )
    if rese2_vs_all is not None and len(rese2_vs_all):
        closest = rese2_vs_all.sort_values("difference").iloc[0]
        beaten = int((rese2_vs_all["sign"] > 0).sum())
        rows.append(
            {
                "claim": "ReSE-2 with multi-level aggregation is the best model",
                "paper": "0.9113, ahead of SE+multi's 0.9111 by 0.0002",
                "evidence": f"resolved ahead of {beaten} of {len(rese2_vs_all)} variants; "
                f"closest: {closest['other']} {closest['difference']:+.4f} "
                f"[{closest['low']:+.4f}, {closest['high']:+.4f}]",
                "verdict": _all_above(rese2_vs_all),
            }
        )
    if time_ratio is not None and not math.isnan(time_ratio):
        near = abs(time_ratio / PAPER_TIME_RATIO - 1) <= TIME_RATIO_TOLERANCE
        rows.append(
            {
                "claim": "ReSE-2 takes about 1.7 times as long to train as SE",
                "paper": f"{PAPER_TIME_RATIO} (GPU, full width)",
                "evidence": f"{time_ratio:.2f} per training step in this build "
                f"(counted as about 1.7 within ±{TIME_RATIO_TOLERANCE:.0%})",
                "verdict": REPRODUCED if near else CONTRADICTED,
            }
        )
    return pd.DataFrame(rows, columns=_COLUMNS)


def excitation_claims(summary: Mapping[str, Any], *, level: float = 0.95) -> pd.DataFrame:
    """The claims of the paper's excitation analysis (specification §5).

    Args:
        summary: :func:`~resemul_core.analysis.excitation_stats.summarize_excitations`.
        level: the significance of the sign test on the loudness slopes is ``1 - level``.

    Returns:
        Columns ``claim``, ``paper``, ``evidence``, ``verdict``.
    """
    rows = []
    moved = {int(g["level"]): g["mean_abs_from_half"] for g in summary.get("gates", [])}

    def untrained(*levels: int) -> str | None:
        """A note when some of ``levels`` did not learn (then no verdict is given)."""
        low = [lv for lv in levels if moved.get(lv, math.inf) < LEARNED_GATES]
        if not low:
            return None
        shown = ", ".join(f"level {lv}: {moved[lv]:.3f}" for lv in low)
        return f"; gates not trained (mean |g − 0.5| < {LEARNED_GATES}: {shown})"

    shape = summary.get("shape")
    levels = sorted(moved)
    if shape:
        middle = shape["middle_levels"]
        span = f"levels {middle[0]}-{middle[-1]}"
        for key, claim, paper in (
            (
                "first_minus_middle",
                "excitations are tag-dependent at the first block: its std across tags "
                f"exceeds the middle's ({span})",
                "0.055 vs ≈ 0.024",
            ),
            (
                "last_minus_middle",
                "excitations are discriminative at the end: the last block's std across tags "
                f"exceeds the middle's ({span})",
                "0.042 vs ≈ 0.024",
            ),
        ):
            iv = shape[key]
            sign = 1 if iv["low"] is not None and iv["low"] > 0 else 0
            if iv["high"] is not None and iv["high"] < 0:
                sign = -1
            end = levels[0] if key.startswith("first") else levels[-1]
            note = untrained(end, *middle) if levels else None
            rows.append(
                {
                    "claim": claim,
                    "paper": paper,
                    "evidence": f"difference {iv['estimate']:+.4f} "
                    f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" + (note or ""),
                    "verdict": OPEN if note else _verdict(sign, 1),
                }
            )
    loud = summary["loudness"]
    positive, negative = int(loud["positive"]), int(loud["negative"])
    n = positive + negative
    p = stats.binomtest(positive, n, 0.5).pvalue if n else 1.0
    sign = 0 if p >= 1 - level else (1 if positive > negative else -1)
    note = untrained(int(loud.get("level", 1))) if moved else None
    rows.append(
        {
            "claim": "most first-block channels' excitation rises with loudness "
            "(positive regression slopes)",
            "paper": "109 of 128 positive, 19 negative (its own scatter plot slopes the other way)",
            "evidence": f"{positive} of {n} positive, {negative} negative "
            f"(sign test p = {p:.3g}); channel average slope {loud['average']['slope']:+.3f}"
            + (note or ""),
            "verdict": OPEN if note else _verdict(sign, 1),
        }
    )
    return pd.DataFrame(rows, columns=_COLUMNS)
