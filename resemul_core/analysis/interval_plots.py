"""Figures of the evaluation chapter with intervals: scores per variant, the paper's differences.

Public: :func:`plot_score_intervals`, :func:`plot_differences`.

Each draws a table of :mod:`resemul_core.analysis.comparison` (the excitation curve's
intervals are drawn by :func:`~resemul_core.analysis.plots.plot_std_across_tags`); every
interval is a 95 % bootstrap interval over the test clips
(:mod:`resemul_core.analysis.statistics`) unless the caption says otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure
from resemul_core.config import VARIANTS

__all__ = ["plot_differences", "plot_score_intervals"]

_SINGLE, _MULTI = "#4c72b0", "#dd8452"  # seaborn's first two colours: no multi / multi
_RESOLVED, _OPEN = "#2a7f3f", "#7f7f7f"


def plot_score_intervals(table: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Macro ROC-AUC and PR-AUC of every variant with their clip intervals.

    Args:
        table: :func:`~resemul_core.analysis.comparison.score_table` (``variant``,
            ``roc_auc``, ``roc_auc_low``, ``roc_auc_high``, the same for ``pr_auc``).
    """
    order = [v for v in VARIANTS if v in set(table["variant"])]
    rows = table.set_index("variant").loc[order]
    y = np.arange(len(order))[::-1]
    figure, axes = new_figure(2, width=PAGE_WIDTH, height=0.32 * len(order) + 1.4, sharey=True)
    for ax, metric, title in zip(axes, ("roc_auc", "pr_auc"), ("ROC-AUC", "PR-AUC"), strict=True):
        for yi, (variant, row) in zip(y, rows.iterrows(), strict=True):
            color = _MULTI if VARIANTS[variant].multi else _SINGLE
            # drawn from the interval's ends: a percentile interval need not be centred
            ax.hlines(yi, row[f"{metric}_low"], row[f"{metric}_high"], color=color)
            ax.plot(row[metric], yi, "o", color=color)
        ax.set_title(f"macro {title}, 95 % interval over test clips", fontsize="medium")
    axes[0].set_yticks(y, order)
    axes[0].set_ylim(-0.7, len(order) - 0.3)
    return finish(figure, path)


def plot_differences(differences: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """The paper's differences in this build: estimate and paired interval, paper marked.

    Args:
        differences: :func:`~resemul_core.analysis.comparison.difference_table`. Green: the
            interval excludes 0; grey: it does not. The cross is the paper's difference on
            MTAT (full size, one run: no interval is published).
    """
    rows = differences.reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    figure, axes = new_figure(1, width=PAGE_WIDTH, height=0.36 * len(rows) + 1.2)
    ax = axes[0]
    if rows.empty:
        ax.text(0.5, 0.5, "no comparison: train both variants of a pair", ha="center")
        ax.set_axis_off()
        return finish(figure, path)
    ax.axvline(0.0, color="black", linewidth=0.8)
    for yi, row in zip(y, rows.itertuples(), strict=True):
        color = _RESOLVED if row.sign != 0 else _OPEN
        ax.hlines(yi, row.low, row.high, color=color)
        ax.plot(row.difference, yi, "o", color=color, label="this build" if yi == y[0] else None)
        ax.plot(row.paper, yi, "x", color="black", label="paper (MTAT)" if yi == y[0] else None)
    ax.set_yticks(y, rows["comparison"])
    ax.set_xlabel("difference in macro ROC-AUC (a − b)")
    ax.legend(loc="lower right", fontsize="small")
    return finish(figure, path)
