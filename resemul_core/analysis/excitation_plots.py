"""The excitation figures of the book (specification §5), each a matplotlib ``Figure``.

Public: :data:`DEFAULT_CONTRAST_TAGS`, :func:`plot_excitations_at_levels`,
:func:`plot_first_block_excitations`, :func:`plot_std_across_tags`,
:func:`plot_loudness_scatter`, :func:`excitation_figures`; all are also importable from
:mod:`resemul_core.analysis.plots`.

The numbers come from the pure analyses in :mod:`resemul_core.analysis.excitation_stats`: the
figures draw what :func:`~resemul_core.analysis.excitation_stats.summarize_excitations`
computed (its regression lines, slope counts and std table) and fit nothing themselves.

Channel order: like the paper's analysis notebook, the per-tag figures sort the channels of a
block by their mean excitation over the tags drawn, **in increasing order** (the channel with
the lowest mean on the left).
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
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from resemul_core.analysis.excitation_stats import (
    DEFAULT_FLOOR_DB,
    PAPER_STD_ACROSS_TAGS,
    loudness_summary,
    summarize_excitations,
)
from resemul_core.analysis.excitations import ExcitationSet
from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure, save_figure

__all__ = [
    "DEFAULT_CONTRAST_TAGS",
    "plot_excitations_at_levels",
    "plot_first_block_excitations",
    "plot_std_across_tags",
    "plot_loudness_scatter",
    "excitation_figures",
]

#: Contrasting MTAT tags of the paper's "excitations at each level" figure (specification §5.1).
DEFAULT_CONTRAST_TAGS = ("classical", "metal", "dance")

_LINESTYLES = ("-", "--", "-.", ":")


def _pick_tags(
    tags: Sequence[str],
    tag_mean_vectors: Sequence[np.ndarray],
    wanted: Sequence[str] | None,
    count: int = 3,
) -> list[str]:
    """The tags to draw.

    ``wanted`` if given (every name must exist). Otherwise ``count`` tags carried by some clip:
    the paper's three where present, completed by the most contrasting tags, chosen greedily:
    each next tag is the one whose excitations (all levels, each scaled to equal weight) lie
    farthest from the nearest tag already chosen; the first, if none of the paper's is present,
    is the one farthest from the average over the usable tags. Ties go to the earlier tag.
    """
    if wanted is not None:
        missing = [t for t in wanted if t not in tags]
        if missing:
            raise ValueError(f"unknown tag(s) {missing}; tags: {', '.join(tags)}")
        return list(wanted)
    rows = [np.asarray(m, dtype=np.float64) for m in tag_mean_vectors]
    usable = [i for i in range(len(tags)) if all(not np.isnan(m[i]).any() for m in rows)]
    if not usable:
        raise ValueError("no tag is carried by any clip; nothing to plot")
    features = np.concatenate([m[usable] / math.sqrt(m.shape[1]) for m in rows], axis=1)
    names = [tags[i] for i in usable]
    chosen = [names.index(t) for t in DEFAULT_CONTRAST_TAGS if t in names][:count]
    while len(chosen) < min(count, len(names)):
        if chosen:
            gaps = np.linalg.norm(features[:, None, :] - features[None, chosen, :], axis=2)
            distance = gaps.min(axis=1)
        else:
            distance = np.linalg.norm(features - features.mean(axis=0), axis=1)
        distance[chosen] = -np.inf
        chosen.append(int(np.argmax(distance)))  # first maximum: ties go to the earlier tag
    return [names[i] for i in chosen]


def _sorted_channels(values: np.ndarray) -> np.ndarray:
    """Channel order by mean over the rows (tags), lowest mean first, as the paper's notebook."""
    return np.argsort(np.nanmean(values, axis=0), kind="stable")


def plot_excitations_at_levels(
    tag_means: Mapping[int, np.ndarray],
    tags: Sequence[str],
    *,
    show_tags: Sequence[str] | None = None,
    num_tags: int = 3,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Tag-mean excitations of a few contrasting tags at several block levels, a panel each.

    Args:
        tag_means: level -> ``(T, C)`` tag-mean excitations (``ExcitationSet.tag_means``);
            the paper shows the first, middle and last block (1, 5, 9).
        tags: the T tag names.
        show_tags: tags to draw; default: ``num_tags`` contrasting tags, the paper's classical,
            metal and dance where the store has them, completed by the tags whose excitations
            differ most (see ``_pick_tags``).
        num_tags: how many tags to draw when ``show_tags`` is not given.
        path: also save the figure there as PNG.

    Returns:
        the figure, one axis per level and one legend above them; in each axis the channels
        are sorted by their mean excitation over the drawn tags, lowest first (specification
        §5.1 figure 1).
    """
    levels = list(tag_means)
    chosen = _pick_tags(tags, [tag_means[k] for k in levels], show_tags, num_tags)
    rows = [list(tags).index(t) for t in chosen]
    palette = sns.color_palette("colorblind", len(chosen))
    figure, axes = new_figure(len(levels), width=min(PAGE_WIDTH, 3.4 * len(levels)), height=3.4)
    for ax, level in zip(axes, levels, strict=True):
        values = np.asarray(tag_means[level])[rows]  # tags, C
        order = _sorted_channels(values)
        for k, (tag, curve) in enumerate(zip(chosen, values[:, order], strict=True)):
            ax.plot(
                np.arange(len(order)),
                curve,
                label=tag,
                color=palette[k],
                linestyle=_LINESTYLES[k % len(_LINESTYLES)],
                linewidth=1.5,
            )
        ax.set(
            title=f"block {level} ({values.shape[1]} channels)",
            xlabel="channel (sorted, lowest mean first)",
            ylim=(0, 1),
            xlim=(-0.5, len(order) - 0.5),
        )
    axes[0].set_ylabel("mean excitation over the tag's clips")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(chosen), title="tag")
    return finish(figure, path)


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
        split_at: draw a vertical line after the first ``split_at`` sorted channels and label
            the sizes of the two groups, as the paper does at 109 (specification §5.1 figure 2).
        path: also save the figure there as PNG.

    Returns:
        a one-axis figure with a dashed line at excitation 0.5. The channels are sorted by
        their mean excitation over all tags, **lowest first**, as in the paper's notebook, so
        the paper's "109 channels | 19 channels" mark has its 109 channels on the left.
    """
    values = np.asarray(tag_means, dtype=np.float64)
    keep = ~np.isnan(values).any(axis=1)
    values, names = values[keep], [t for t, k in zip(tags, keep, strict=True) if k]
    order = _sorted_channels(values)
    channels = values.shape[1]
    ncols = min(len(names), 6) or 1
    rows = math.ceil(len(names) / ncols)
    figure, (ax,) = new_figure(1, width=PAGE_WIDTH, height=4.0 + 0.2 * rows)
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
        xlabel="channel (sorted by mean excitation over all tags, lowest first)",
        ylabel="mean excitation",
        ylim=(0, 1),
        xlim=(-0.5, channels - 0.5),
    )
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="outside lower center", fontsize="x-small", ncols=ncols, title="tag"
    )
    return finish(figure, path)


def plot_std_across_tags(
    table: pd.DataFrame,
    *,
    paper: bool = True,
    middle: Sequence[int] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """The "standard deviations across tags" per block level, with the paper's values.

    Args:
        table: :func:`~resemul_core.analysis.excitation_stats.std_per_level` output (``level``,
            ``std``), or the ``std_across_tags`` rows of a summary as a DataFrame; with
            ``low`` and ``high`` columns (the summary's clip-bootstrap interval) they are
            drawn as error bars.
        paper: overlay :data:`~resemul_core.analysis.excitation_stats.PAPER_STD_ACROSS_TAGS` (read
            off the paper's plot of the 9-block SE-multi model on MTAT).
        middle: levels to shade as "the middle of the network" (the summary's
            ``shape["middle_levels"]``).
        path: also save the figure there as PNG.

    Returns:
        a one-axis figure (specification §5.1 figure 3).
    """
    figure, (ax,) = new_figure(1, width=6.0, height=3.6)
    if {"low", "high"} <= set(table) and table[["low", "high"]].notna().all().all():
        # the interval is drawn from its ends: a percentile bootstrap interval of a biased
        # statistic (the std of noisy tag means) need not contain the point estimate
        (line,) = ax.plot(
            table["level"], table["std"], marker="o", label="this run (95 % over test clips)"
        )
        ax.vlines(table["level"], table["low"], table["high"], color=line.get_color())
    else:
        ax.plot(table["level"], table["std"], marker="o", label="this run")
    if middle:
        ax.axvspan(min(middle) - 0.4, max(middle) + 0.4, color="0.9", zorder=0, label="middle")
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
    return finish(figure, path)


def plot_loudness_scatter(
    excitations: np.ndarray,
    loudness: np.ndarray,
    *,
    fits: Mapping[str, Any] | None = None,
    measure: str | None = None,
    gridsize: int = 25,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Excitation vs loudness per segment as density plots, with least-squares lines (§5.2).

    Every segment is drawn: each panel is a hexagonal-bin density (logarithmic colour scale),
    which stays legible from a hundred to tens of thousands of segments, and the black line
    is the summary's regression. Panels sit in two rows of three, so that the figure reads at
    the book's page width; the sixth cell holds the slope counts next to the poster's.

    Args:
        excitations: ``(N, C)`` per-segment excitations of one block (the paper: the first).
        loudness: ``(N,)`` per-segment loudness.
        fits: the lines to draw, :func:`~resemul_core.analysis.excitation_stats.loudness_summary`
            of these arrays (a summary's ``"loudness"``); omitted: computed here by it.
        measure: ``"rms"`` or ``"db"``; default: that of ``fits``, else ``"rms"``.
        gridsize: hexagons across the horizontal axis.
        path: also save the figure there as PNG.

    Returns:
        a figure whose first five axes are the channel average, then the most positive, most
        negative and most neutral slope channels and the channel with the least regression
        error; its sixth axis is the text panel.
    """
    y = np.asarray(excitations, dtype=np.float64)
    x = np.asarray(loudness, dtype=np.float64)
    fits = loudness_summary(y, x, measure=measure or "rms") if fits is None else fits
    if measure not in (None, fits["measure"]) or np.shape(y)[1:] != (fits["channels"],):
        raise ValueError(f"fits of {fits['channels']} channels of {fits['measure']} loudness")
    panels: list[tuple[str, np.ndarray, Mapping[str, Any]]] = [
        (f"average of {y.shape[1]} channels", y.mean(axis=1), fits["average"])
    ]
    for name, fit in fits["notable"].items():
        channel = fit["channel"]
        panels.append((f"{name.replace('_', ' ')}: channel {channel}", y[:, channel], fit))
    line_x, fit_keys = np.array([x.min(), x.max()]), ("slope", "intercept", "r2")
    span = (x.min(), x.max()) if x.max() > x.min() else (x.min() - 0.5, x.max() + 0.5)
    figure, axes = new_figure(3, nrows=2, width=PAGE_WIDTH, height=6.6, sharex=True, sharey=True)
    norm = LogNorm(vmin=1, vmax=max(2, len(x)))
    for ax, (title, values, fit) in zip(axes, panels, strict=False):
        slope, intercept, r2 = (math.nan if fit[k] is None else fit[k] for k in fit_keys)
        ax.hexbin(
            x,
            values,
            gridsize=gridsize,
            extent=(*span, 0.0, 1.0),
            mincnt=1,
            cmap="Blues",
            norm=norm,
            linewidths=0,
        )
        ax.plot(line_x, intercept + slope * line_x, color="black", linewidth=2)
        ax.set_title(f"{title}\nslope {slope:+.3g}, r² {r2:.2f}", fontsize="medium")
        ax.set_ylim(0, 1)
        ax.grid(False)
    label = "loudness (RMS amplitude)" if fits["measure"] == "rms" else "loudness (dBFS)"
    for ax in axes[3:]:
        ax.set_xlabel(label)
    for ax in (axes[0], axes[3]):
        ax.set_ylabel("excitation")
    text_ax = axes[5]
    text_ax.set_axis_off()
    text_ax.text(
        0.05,
        0.5,
        f"{fits['positive']} channels rise with loudness,\n"
        f"{fits['negative']} fall"
        + (f", {fits['zero']} are flat" if fits.get("zero") else "")
        + f"\n(of {fits['channels']}).\n\nPoster: 109 positive,\n19 negative (of 128).\n\n"
        f"{len(x):,} segments; darker\nhexagons hold more of them.",
        transform=text_ax.transAxes,
        va="center",
        fontsize="medium",
    )
    return finish(figure, path)


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
        paper's model). The first-block figure sorts channels by mean excitation, lowest
        first, and marks the split after as many channels as rise with loudness, after the
        paper's 109 | 19 annotation: the mark is a count, not a boundary between the two
        slope groups.
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
        "std_across_tags": plot_std_across_tags(
            pd.DataFrame(summary["std_across_tags"]),
            middle=(summary.get("shape") or {}).get("middle_levels"),
        ),
        "loudness_scatter": plot_loudness_scatter(first, loud, fits=fits),
    }
    if out_dir is not None:
        for name, figure in figures.items():
            save_figure(figure, Path(out_dir) / f"{name}.png")
    return figures
