"""Figures of the book: every function returns a matplotlib ``Figure`` and can save a PNG.

Public:

* common: :func:`save_figure`;
* excitation analysis (specification §5), defined in
  :mod:`resemul_core.analysis.excitation_plots`: :func:`plot_excitations_at_levels`,
  :func:`plot_first_block_excitations`, :func:`plot_std_across_tags`,
  :func:`plot_loudness_scatter`, :func:`excitation_figures`;
* listening and looking at audio, defined in :mod:`resemul_core.analysis.audio_views`:
  :func:`tag_examples`, :func:`audio_player`, :func:`audio_table`,
  :func:`plot_audio_views`;
* the architecture, defined in :mod:`resemul_core.analysis.diagrams`:
  :func:`plot_architecture`;
* data views: :func:`plot_tag_counts`, :func:`plot_waveform_segments`,
  :func:`plot_loudness_distribution`;
* training and results: :func:`plot_training_curves`, :func:`plot_results`,
  :func:`plot_per_tag`.

This module is the one to import from (``from resemul_core.analysis import plots``); the
figures live in modules by subject. Figures are built on ``matplotlib.figure.Figure`` rather
than ``pyplot`` (:mod:`resemul_core.analysis.figure_common`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from resemul_core.analysis.audio_views import (
    audio_player,
    audio_table,
    plot_audio_views,
    tag_examples,
)
from resemul_core.analysis.diagrams import plot_architecture
from resemul_core.analysis.excitation_plots import (
    DEFAULT_CONTRAST_TAGS,
    excitation_figures,
    plot_excitations_at_levels,
    plot_first_block_excitations,
    plot_loudness_scatter,
    plot_std_across_tags,
)
from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure, save_figure
from resemul_core.config import VARIANTS
from resemul_core.data.store import SPLITS

__all__ = [
    "save_figure",
    "DEFAULT_CONTRAST_TAGS",
    "plot_excitations_at_levels",
    "plot_first_block_excitations",
    "plot_std_across_tags",
    "plot_loudness_scatter",
    "excitation_figures",
    "tag_examples",
    "audio_player",
    "audio_table",
    "plot_audio_views",
    "plot_architecture",
    "plot_tag_counts",
    "plot_waveform_segments",
    "plot_loudness_distribution",
    "plot_training_curves",
    "plot_results",
    "plot_per_tag",
]


# --- data views (issue 6) -----------------------------------------------------------------


def plot_tag_counts(
    labels: np.ndarray,
    tags: Sequence[str],
    splits: Sequence[str],
    *,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Clips per tag and split as horizontal bars, most frequent tag on top.

    Args:
        labels: ``(clips, tags)`` 0/1 labels.
        tags: the tag names, one per column.
        splits: each clip's split name.
    """
    frame = pd.DataFrame(np.asarray(labels, dtype=int), columns=list(tags))
    frame["split"] = list(splits)
    counts = frame.groupby("split").sum().T
    counts = counts[[s for s in SPLITS if s in counts.columns]]
    counts = counts.loc[counts.sum(axis=1).sort_values().index]
    figure, (ax,) = new_figure(1, width=7, height=max(3.0, 0.22 * len(tags) + 1))
    left = np.zeros(len(counts))
    for split in counts.columns:
        ax.barh(counts.index, counts[split], left=left, label=split)
        left += counts[split].to_numpy()
    ax.set_xlabel("clips carrying the tag")
    ax.legend(title="split", loc="lower right")
    ax.set_title("Tag frequencies")
    return finish(figure, path)


def plot_waveform_segments(
    waveform: np.ndarray,
    *,
    sample_rate: int,
    segment_length: int,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """A clip's waveform with the boundaries of its non-overlapping model segments.

    Args:
        waveform: ``(samples,)`` mono audio in [-1, 1].
        sample_rate: Hz.
        segment_length: samples per segment (59,049 in the paper: 2.68 s at 22,050 Hz).
    """
    figure, (ax,) = new_figure(1, width=10, height=2.8)
    step = max(1, waveform.size // 20000)  # plotting every sample adds nothing visible
    seconds = np.arange(0, waveform.size, step) / sample_rate
    ax.plot(seconds, waveform[::step], lw=0.4, color="tab:blue")
    for k in range(waveform.size // segment_length + 1):
        ax.axvline(k * segment_length / sample_rate, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("seconds")
    ax.set_ylabel("amplitude")
    ax.set_title(title or f"waveform and {segment_length:,}-sample segments")
    return finish(figure, path)


def plot_loudness_distribution(
    rms_db: np.ndarray,
    groups: Sequence[str],
    *,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Histogram of clip loudness (RMS in dBFS), coloured by a group label per clip."""
    figure, (ax,) = new_figure(1, width=7, height=3.2)
    frame = pd.DataFrame({"RMS level (dBFS)": rms_db, "group": list(groups)})
    sns.histplot(frame, x="RMS level (dBFS)", hue="group", bins=30, multiple="stack", ax=ax)
    ax.set_title("Clip loudness")
    return finish(figure, path)


# --- training and results (issue 6) -------------------------------------------------------


def plot_training_curves(log: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Training and validation loss per epoch, with the learning-rate stages.

    Args:
        log: a run's per-epoch log (:func:`resemul_core.training.run_dir.read_log`): columns
            ``epoch``, ``stage``, ``lr``, ``train_loss``, ``val_loss``.
    """
    figure, (loss_ax, lr_ax) = new_figure(2, width=PAGE_WIDTH, height=3.4)
    loss_ax.plot(log["epoch"], log["train_loss"], marker="o", label="training")
    loss_ax.plot(log["epoch"], log["val_loss"], marker="o", label="validation")
    for stage, rows in log.groupby("stage"):
        if stage % 2:
            loss_ax.axvspan(rows["epoch"].min() - 0.5, rows["epoch"].max() + 0.5, alpha=0.08)
    loss_ax.set_xlabel("epoch (shaded: odd learning-rate stages)")
    loss_ax.set_ylabel("binary cross-entropy")
    loss_ax.legend()
    lr_ax.semilogy(log["epoch"], log["lr"], marker="o", color="tab:green")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate at epoch end")
    return finish(figure, path)


def plot_results(table: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """This build's ROC-AUC and PR-AUC beside the paper's ROC-AUC, on one shared y range.

    One panel per score: this build's macro ROC-AUC, its macro PR-AUC (when the table has
    the column), and the paper's ROC-AUC on MTAT. Every panel shows each block with and
    without multi-level aggregation and all panels share one y axis, so a bar's height means
    the same in each of them. The axis does not start at 0 (ROC-AUCs of the paper differ in
    the third decimal); its range is printed in the label.

    Args:
        table: :func:`resemul_core.analysis.evaluate.results_table` output (``variant``,
            ``roc_auc``, ``paper_roc_auc`` and optionally ``pr_auc``).
    """
    scores = [("roc_auc", "ROC-AUC, this build")]
    if "pr_auc" in table and table["pr_auc"].notna().any():
        scores.append(("pr_auc", "PR-AUC, this build"))
    scores.append(("paper_roc_auc", "ROC-AUC, paper (MTAT, poster)"))
    blocks = list(dict.fromkeys(VARIANTS[v].block for v in VARIANTS))
    rows = []
    for row in table.itertuples():
        spec = VARIANTS[row.variant]
        for column, panel in scores:
            rows.append(
                {
                    "block": spec.block,
                    "head": "multi" if spec.multi else "no multi",
                    "panel": panel,
                    "score": getattr(row, column),
                }
            )
    frame = pd.DataFrame(rows)
    shown = [b for b in blocks if b in set(frame["block"])]
    values = frame["score"].dropna()
    low = float(np.floor((values.min() - 0.02) * 20) / 20) if len(values) else 0.0
    high = float(min(1.0, values.max() + 0.01)) if len(values) else 1.0
    low = max(0.0, min(low, high - 0.05))
    figure, axes = new_figure(len(scores), width=PAGE_WIDTH, height=3.8, sharey=True)
    for ax, (_, panel) in zip(axes, scores, strict=True):
        part = frame[frame["panel"] == panel]
        sns.barplot(
            part,
            x="block",
            y="score",
            hue="head",
            order=shown,
            hue_order=["no multi", "multi"],
            ax=ax,
            legend=ax is axes[0],
        )
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=35)
    axes[0].set_ylim(low, high)
    axes[0].set_ylabel(f"macro score (axis {low:.2f} to {high:.2f})")
    if axes[0].get_legend() is not None:
        axes[0].legend(title="head", fontsize="small", loc="upper left")
    return finish(figure, path)


def plot_per_tag(
    per_tag: pd.DataFrame, *, metric: str = "roc_auc", path: str | os.PathLike | None = None
) -> Figure:
    """Per-tag scores of several variants as a heatmap (tags x variants).

    Args:
        per_tag: one row per (variant, tag) with columns ``variant``, ``tag`` and ``metric``.
    """
    grid = per_tag.pivot(index="tag", columns="variant", values=metric)
    grid = grid.loc[grid.mean(axis=1).sort_values(ascending=False).index]
    figure, (ax,) = new_figure(1, width=1.0 + 0.7 * grid.shape[1], height=1.0 + 0.3 * len(grid))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", vmin=0.5, vmax=1.0, ax=ax)
    ax.set_title(f"per-tag {metric.replace('_', '-').upper()}")
    return finish(figure, path)
