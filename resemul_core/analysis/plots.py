"""Figures of the book: every function returns a matplotlib ``Figure`` and can save a PNG.

Public:

* common: :func:`save_figure`;
* excitation analysis (specification §5): :func:`plot_excitations_at_levels`,
  :func:`plot_first_block_excitations`, :func:`plot_std_across_tags`,
  :func:`plot_loudness_scatter`, :func:`excitation_figures`;
* data views: :func:`plot_tag_counts`, :func:`plot_waveform_segments`,
  :func:`plot_loudness_distribution`;
* training and results: :func:`plot_training_curves`, :func:`plot_results`,
  :func:`plot_per_tag`.

Figures are built on ``matplotlib.figure.Figure`` rather than ``pyplot`` so that no global
figure registry grows in long sessions; Jupyter's inline backend still displays a returned
``Figure``. The numbers come from the pure analyses in
:mod:`resemul_core.analysis.excitation_stats`: the excitation figures draw what
:func:`~resemul_core.analysis.excitation_stats.summarize_excitations` computed (its regression
lines, slope counts and std table) and fit nothing themselves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from resemul_core.analysis.excitation_stats import (
    DEFAULT_FLOOR_DB,
    PAPER_STD_ACROSS_TAGS,
    loudness_summary,
    summarize_excitations,
)
from resemul_core.analysis.excitations import ExcitationSet
from resemul_core.config import VARIANTS
from resemul_core.data.store import SPLITS
from resemul_core.files import atomic_write

__all__ = [
    "save_figure",
    "DEFAULT_CONTRAST_TAGS",
    "plot_excitations_at_levels",
    "plot_first_block_excitations",
    "plot_std_across_tags",
    "plot_loudness_scatter",
    "excitation_figures",
    "plot_tag_counts",
    "plot_waveform_segments",
    "plot_loudness_distribution",
    "plot_training_curves",
    "plot_results",
    "plot_per_tag",
]

_STYLE = "whitegrid"


# --- common -------------------------------------------------------------------------------


def save_figure(figure: Figure, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Atomically write ``figure`` as a PNG file; returns the path."""
    path = Path(path)
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _figure(ncols: int, *, width: float, height: float) -> tuple[Figure, list[Axes]]:
    # The seaborn style applies at axes creation, so it is scoped here instead of set globally.
    with sns.axes_style(_STYLE):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _finish(figure: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save_figure(figure, path)
    return figure


# --- excitation analysis (specification §5) ----------------------------------------------

#: Contrasting MTAT tags of the paper's "excitations at each level" figure (specification §5.1).
DEFAULT_CONTRAST_TAGS = ("classical", "metal", "dance")


def _pick_tags(
    tags: Sequence[str], tag_mean_vectors: Sequence[np.ndarray], wanted: Sequence[str] | None
) -> list[str]:
    """The tags to draw: ``wanted`` (all must exist), else the paper's three where present,
    else the first three tags that some clip carries."""
    usable = [
        t
        for i, t in enumerate(tags)
        if all(not np.isnan(np.asarray(m)[i]).any() for m in tag_mean_vectors)
    ]
    if wanted is not None:
        missing = [t for t in wanted if t not in tags]
        if missing:
            raise ValueError(f"unknown tag(s) {missing}; tags: {', '.join(tags)}")
        return list(wanted)
    chosen = [t for t in DEFAULT_CONTRAST_TAGS if t in usable] or usable[:3]
    if not chosen:
        raise ValueError("no tag is carried by any clip; nothing to plot")
    return chosen


def _sorted_channels(values: np.ndarray) -> np.ndarray:
    """Channel order by mean over the rows (tags), highest mean first."""
    return np.argsort(-np.nanmean(values, axis=0), kind="stable")


def plot_excitations_at_levels(
    tag_means: Mapping[int, np.ndarray],
    tags: Sequence[str],
    *,
    show_tags: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Tag-mean excitations of a few tags at several block levels, one panel per level.

    Args:
        tag_means: level -> ``(T, C)`` tag-mean excitations (``ExcitationSet.tag_means``);
            the paper shows the first, middle and last block (1, 5, 9).
        tags: the T tag names.
        show_tags: tags to draw; default: classical, metal and dance where present, else the
            first three tags.
        path: also save the figure there as PNG.

    Returns:
        the figure, one axis per level; in each, channels are sorted by their mean
        excitation over the drawn tags (specification §5.1 figure (a)).
    """
    levels = list(tag_means)
    chosen = _pick_tags(tags, [tag_means[k] for k in levels], show_tags)
    rows = [list(tags).index(t) for t in chosen]
    palette = sns.color_palette("colorblind", len(chosen))
    figure, axes = _figure(len(levels), width=4.2 * len(levels), height=3.4)
    for ax, level in zip(axes, levels, strict=True):
        values = np.asarray(tag_means[level])[rows]  # tags, C
        order = _sorted_channels(values)
        for tag, curve, color in zip(chosen, values[:, order], palette, strict=True):
            ax.plot(np.arange(len(order)), curve, label=tag, color=color, linewidth=1.2)
        ax.set(
            title=f"block {level} ({values.shape[1]} channels)",
            xlabel="channel (sorted by mean excitation)",
            ylim=(0, 1),
        )
    axes[0].set_ylabel("mean excitation")
    axes[-1].legend(title="tag", loc="best", fontsize="small")
    return _finish(figure, path)


def plot_first_block_excitations(
    tag_means: np.ndarray,
    tags: Sequence[str],
    *,
    split_at: int | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Tag-mean excitations of every tag at one block (the paper: the first), sorted channels.

    Args:
        tag_means: ``(T, C)`` tag-mean excitations; NaN rows (tags without clips) are skipped.
        tags: the T tag names.
        split_at: draw a vertical line before this sorted channel index and label the two
            groups' sizes, as the paper does at 109 (specification §5.1 figure (b)).
        path: also save the figure there as PNG.

    Returns:
        a one-axis figure with a dashed line at excitation 0.5; channels are sorted by their
        mean over all tags, highest first.
    """
    values = np.asarray(tag_means, dtype=np.float64)
    keep = ~np.isnan(values).any(axis=1)
    values, names = values[keep], [t for t, k in zip(tags, keep, strict=True) if k]
    order = _sorted_channels(values)
    channels = values.shape[1]
    figure, (ax,) = _figure(1, width=9.0, height=4.5)
    palette = sns.color_palette("husl", len(names))
    for name, curve, color in zip(names, values[:, order], palette, strict=True):
        ax.plot(np.arange(channels), curve, label=name, color=color, linewidth=0.9, alpha=0.85)
    ax.axhline(0.5, color="red", linestyle="--", linewidth=1)
    if split_at is not None:
        if not 0 <= split_at <= channels:
            raise ValueError(f"split_at must lie in [0, {channels}], got {split_at}")
        ax.axvline(split_at - 0.5, color="red", linestyle="--", linewidth=1)
        ax.text(
            split_at - 0.5,
            0.97,
            f"{split_at} channels | {channels - split_at} channels",
            ha="center",
            va="top",
            transform=ax.get_xaxis_transform(),
            fontsize="small",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
    ax.set(
        xlabel="channel (sorted by mean excitation over tags)",
        ylabel="mean excitation",
        ylim=(0, 1),
        xlim=(-0.5, channels - 0.5),
    )
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="xx-small",
        ncols=2 if len(names) > 25 else 1,
        title="tag",
    )
    return _finish(figure, path)


def plot_std_across_tags(
    table: pd.DataFrame,
    *,
    paper: bool = True,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The "standard deviations across tags" per block level, with the paper's values.

    Args:
        table: :func:`~resemul_core.analysis.excitation_stats.std_per_level` output (``level``,
            ``std``), or the ``std_across_tags`` rows of a summary as a DataFrame.
        paper: overlay :data:`~resemul_core.analysis.excitation_stats.PAPER_STD_ACROSS_TAGS` (read
            off the paper's plot of the 9-block SE-multi model on MTAT).
        path: also save the figure there as PNG.

    Returns:
        a one-axis figure (specification §5.1 figure (c)).
    """
    figure, (ax,) = _figure(1, width=5.5, height=3.6)
    ax.plot(table["level"], table["std"], marker="o", label="this run")
    if paper:
        ax.plot(
            list(PAPER_STD_ACROSS_TAGS),
            list(PAPER_STD_ACROSS_TAGS.values()),
            marker="s",
            linestyle="--",
            color="grey",
            label="paper (read off its plot)",
        )
    levels = sorted(set(table["level"]) | (set(PAPER_STD_ACROSS_TAGS) if paper else set()))
    ax.set(
        xticks=levels,
        xlabel="block level",
        ylabel="std of tag-mean excitation\n(mean over channels)",
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    return _finish(figure, path)


def plot_loudness_scatter(
    excitations: np.ndarray,
    loudness: np.ndarray,
    *,
    fits: Mapping[str, Any] | None = None,
    measure: str | None = None,
    max_points: int = 5000,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Excitation vs loudness per segment, with least-squares lines (specification §5.2).

    Args:
        excitations: ``(N, C)`` per-segment excitations of one block (the paper: the first).
        loudness: ``(N,)`` per-segment loudness.
        fits: the lines to draw, :func:`~resemul_core.analysis.excitation_stats.loudness_summary`
            of these arrays (a summary's ``"loudness"``); omitted: computed here by it.
        measure: ``"rms"`` or ``"db"``; default: that of ``fits``, else ``"rms"``.
        max_points: at most this many randomly chosen segments are drawn per panel; the
            regression lines always use every segment.
        seed: seed of that subsample.
        path: also save the figure there as PNG.

    Returns:
        a five-axis figure: the channel average, then the most positive, most negative and
        most neutral slope channels and the channel with the least regression error.
    """
    y = np.asarray(excitations, dtype=np.float64)
    x = np.asarray(loudness, dtype=np.float64)
    fits = loudness_summary(y, x, measure=measure or "rms") if fits is None else fits
    if measure not in (None, fits["measure"]) or np.shape(y)[1:] != (fits["channels"],):
        raise ValueError(f"fits of {fits['channels']} channels of {fits['measure']} loudness")
    panels: list[tuple[str, np.ndarray, Mapping[str, Any]]] = [
        (
            f"average of {y.shape[1]} channels\n"
            f"({fits['positive']} rising, {fits['negative']} falling)",
            y.mean(axis=1),
            fits["average"],
        )
    ]
    for name, fit in fits["notable"].items():
        channel = fit["channel"]
        panels.append((f"{name.replace('_', ' ')}: channel {channel}", y[:, channel], fit))
    rng = np.random.default_rng(seed)
    shown = rng.choice(len(x), size=min(max_points, len(x)), replace=False)
    line_x, fit_keys = np.array([x.min(), x.max()]), ("slope", "intercept", "r2")
    figure, axes = _figure(len(panels), width=3.2 * len(panels), height=3.3)
    for ax, (title, values, fit) in zip(axes, panels, strict=True):
        slope, intercept, r2 = (math.nan if fit[k] is None else fit[k] for k in fit_keys)
        ax.scatter(x[shown], values[shown], s=4, alpha=0.3, linewidths=0)
        ax.plot(line_x, intercept + slope * line_x, color="black", linewidth=1.5)
        ax.set(
            title=f"{title}\nslope {slope:+.3g}, r² {r2:.2f}",
            xlabel="loudness (RMS amplitude)" if fits["measure"] == "rms" else "loudness (dBFS)",
            ylim=(0, 1),
        )
        ax.title.set_fontsize("small")
    axes[0].set_ylabel("excitation")
    return _finish(figure, path)


def excitation_figures(
    excitations: ExcitationSet,
    *,
    summary: Mapping[str, Any] | None = None,
    loudness: str | None = None,
    floor_db: float | None = None,
    show_tags: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Figure]:
    """All four excitation figures of the paper from one :class:`ExcitationSet`.

    Args:
        excitations: the extracted gates; its first level needs per-segment gates.
        summary: its :func:`~resemul_core.analysis.excitation_stats.summarize_excitations`, whose
            std table, slope counts and lines the figures draw; omitted: computed here with
        loudness: ``"rms"`` (default) or ``"db"``, and
        floor_db: floor of the dB measure (default: ``DEFAULT_FLOOR_DB``).
        show_tags: tags of the per-level figure (see :func:`plot_excitations_at_levels`).
        out_dir: also save each figure there as ``<name>.png``.

    Returns:
        ``{"excitations_at_levels", "first_block_excitations", "std_across_tags",
        "loudness_scatter"}`` -> Figure.

    Note:
        The per-level figure shows the first, middle and last SE levels (1, 5, 9 for the
        paper's model). The first-block figure marks the split at the number of channels
        whose excitation rises with loudness, after the paper's 109 | 19 annotation; the
        channels are sorted by mean excitation, so the mark is a count, not a boundary
        between the two slope groups.
    """
    levels = excitations.levels
    if summary is None:
        floor_db = DEFAULT_FLOOR_DB if floor_db is None else floor_db
        summary = summarize_excitations(excitations, loudness=loudness or "rms", floor_db=floor_db)
    elif loudness is not None or floor_db is not None:
        raise ValueError("pass loudness/floor_db to summarize_excitations, not with a summary")
    fits = summary["loudness"]
    if (fits["level"], summary["num_segments"]) != (levels[0], excitations.num_segments):
        raise ValueError("the summary is not of these excitations (level or segment count)")
    floor = DEFAULT_FLOOR_DB if fits.get("floor_db") is None else fits["floor_db"]
    shown_levels = list(dict.fromkeys([levels[0], levels[len(levels) // 2], levels[-1]]))
    first = excitations.segment_level(levels[0])
    loud = excitations.loudness(fits["measure"], floor_db=floor)
    tags = list(excitations.tags)
    figures = {
        "excitations_at_levels": plot_excitations_at_levels(
            {k: excitations.tag_means(k) for k in shown_levels}, tags, show_tags=show_tags
        ),
        "first_block_excitations": plot_first_block_excitations(
            excitations.tag_means(levels[0]), tags, split_at=fits["positive"]
        ),
        "std_across_tags": plot_std_across_tags(pd.DataFrame(summary["std_across_tags"])),
        "loudness_scatter": plot_loudness_scatter(first, loud, fits=fits),
    }
    if out_dir is not None:
        for name, figure in figures.items():
            save_figure(figure, Path(out_dir) / f"{name}.png")
    return figures


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
    figure, (ax,) = _figure(1, width=7, height=max(3.0, 0.22 * len(tags) + 1))
    left = np.zeros(len(counts))
    for split in counts.columns:
        ax.barh(counts.index, counts[split], left=left, label=split)
        left += counts[split].to_numpy()
    ax.set_xlabel("clips carrying the tag")
    ax.legend(title="split", loc="lower right")
    ax.set_title("Tag frequencies")
    return _finish(figure, path)


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
    figure, (ax,) = _figure(1, width=10, height=2.8)
    step = max(1, waveform.size // 20000)  # plotting every sample adds nothing visible
    seconds = np.arange(0, waveform.size, step) / sample_rate
    ax.plot(seconds, waveform[::step], lw=0.4, color="tab:blue")
    for k in range(waveform.size // segment_length + 1):
        ax.axvline(k * segment_length / sample_rate, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("seconds")
    ax.set_ylabel("amplitude")
    ax.set_title(title or f"waveform and {segment_length:,}-sample segments")
    return _finish(figure, path)


def plot_loudness_distribution(
    rms_db: np.ndarray,
    groups: Sequence[str],
    *,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Histogram of clip loudness (RMS in dBFS), coloured by a group label per clip."""
    figure, (ax,) = _figure(1, width=7, height=3.2)
    frame = pd.DataFrame({"RMS level (dBFS)": rms_db, "group": list(groups)})
    sns.histplot(frame, x="RMS level (dBFS)", hue="group", bins=30, multiple="stack", ax=ax)
    ax.set_title("Clip loudness")
    return _finish(figure, path)


# --- training and results (issue 6) -------------------------------------------------------


def plot_training_curves(log: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Training and validation loss per epoch, with the learning-rate stages.

    Args:
        log: a run's per-epoch log (:func:`resemul_core.training.run_dir.read_log`): columns
            ``epoch``, ``stage``, ``lr``, ``train_loss``, ``val_loss``.
    """
    figure, (loss_ax, lr_ax) = _figure(2, width=11, height=3.4)
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
    return _finish(figure, path)


def plot_results(table: pd.DataFrame, *, path: str | os.PathLike | None = None) -> Figure:
    """Our ROC-AUC beside the paper's for every block, with and without multi-level heads.

    Args:
        table: :func:`resemul_core.analysis.evaluate.results_table` output (``variant``,
            ``roc_auc``, ``paper_roc_auc``).
    """
    rows = []
    for row in table.itertuples():
        block, multi = VARIANTS[row.variant].block, VARIANTS[row.variant].multi
        head = "multi" if multi else "no multi"
        rows.append({"block": block, "head": head, "source": "ours", "ROC-AUC": row.roc_auc})
        rows.append({"block": block, "head": head, "source": "paper", "ROC-AUC": row.paper_roc_auc})
    frame = pd.DataFrame(rows)
    figure, axes = _figure(2, width=11, height=3.6)
    for ax, source in zip(axes, ("ours", "paper"), strict=True):
        part = frame[frame["source"] == source]
        sns.barplot(part, x="block", y="ROC-AUC", hue="head", ax=ax)
        values = part["ROC-AUC"].dropna()
        if len(values):
            ax.set_ylim(max(0.0, values.min() - 0.05), min(1.0, values.max() + 0.02))
        ax.set_title("this build" if source == "ours" else "paper (MTAT, poster)")
    return _finish(figure, path)


def plot_per_tag(
    per_tag: pd.DataFrame, *, metric: str = "roc_auc", path: str | os.PathLike | None = None
) -> Figure:
    """Per-tag scores of several variants as a heatmap (tags x variants).

    Args:
        per_tag: one row per (variant, tag) with columns ``variant``, ``tag`` and ``metric``.
    """
    grid = per_tag.pivot(index="tag", columns="variant", values=metric)
    grid = grid.loc[grid.mean(axis=1).sort_values(ascending=False).index]
    figure, (ax,) = _figure(1, width=1.0 + 0.7 * grid.shape[1], height=1.0 + 0.3 * len(grid))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", vmin=0.5, vmax=1.0, ax=ax)
    ax.set_title(f"per-tag {metric.replace('_', '-').upper()}")
    return _finish(figure, path)
