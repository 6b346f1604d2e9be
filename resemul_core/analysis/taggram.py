"""The taggram figure: a piece's tag probabilities over time, with its clip-level tags beside.

Public: :func:`plot_taggram`, :func:`tags_by_section`.

Rows are tags, columns the segments in time order (each 2.68 s at the paper's settings),
the colour the segment's probability of the tag; the bars on the right are the clip-level
probabilities (the mean over segments, the tagger's prediction). Tags are ordered by their
clip-level probability, most probable on top, so what the piece is tagged with and when it
sounds like it read together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure

__all__ = ["plot_taggram", "tags_by_section"]


def plot_taggram(
    taggram: pd.DataFrame,
    *,
    top: int | None = 20,
    segment_seconds: float | None = None,
    marks: Sequence[float] = (),
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Plot a taggram (:meth:`~resemul_core.interfaces.tagger.TagResult.taggram`).

    Args:
        taggram: ``(S, T)`` probabilities, indexed by segment start in seconds (``time``),
            one column per tag.
        top: show the ``top`` tags of highest clip-level probability (``None``: all).
        segment_seconds: a segment's length, for the time axis' right edge (default: the
            spacing of the first two starts, or 1 s for a single segment).
        marks: times in seconds to mark with a dashed line (e.g. where sections change).
        title: the figure's title (e.g. the file name).
        path: also save the figure there (PNG, or SVG for ``.svg``).

    Returns:
        The figure: the heatmap on the left, the clip-level bars on the right.
    """
    if taggram.empty:
        raise ValueError("the taggram is empty: no segments to plot")
    clip = taggram.mean(axis=0).sort_values(ascending=False, kind="stable")
    shown = clip.index[: top if top is not None else None]
    starts = taggram.index.to_numpy(dtype=np.float64)
    if segment_seconds is None:
        segment_seconds = float(starts[1] - starts[0]) if len(starts) > 1 else 1.0
    height = max(2.5, 0.22 * len(shown) + 1.2)
    figure, (heat, bars) = new_figure(
        2, width=PAGE_WIDTH, height=height, style="white", gridspec_kw={"width_ratios": [4, 1]}
    )
    values = taggram[shown].to_numpy(dtype=np.float32).T  # tags, segments
    # cell edges: each cell spans from its segment's start to the next one's (the last one
    # a segment long), so spread segments fill the time between them
    image = heat.pcolormesh(
        np.append(starts, starts[-1] + segment_seconds),
        np.arange(len(shown) + 1),
        values,
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        shading="flat",
    )
    for mark in marks:
        heat.axvline(mark, color="white", linestyle="--", linewidth=1.0)
    heat.set_yticks(np.arange(len(shown)) + 0.5, labels=list(shown))
    heat.invert_yaxis()
    heat.set_xlabel("time (s)")
    heat.set_title(title or "taggram: tag probability of each segment")
    figure.colorbar(image, ax=heat, label="probability", pad=0.01, fraction=0.04)
    bars.barh(np.arange(len(shown)) + 0.5, clip[shown].to_numpy(), height=0.7, color="0.35")
    bars.set_ylim(len(shown), 0)
    bars.set_yticks([])
    bars.set_xlim(0, 1)
    bars.set_xlabel("clip probability")
    bars.set_title("mean over segments")
    return finish(figure, path)


def tags_by_section(taggram: pd.DataFrame, sections: pd.DataFrame, *, top: int = 3) -> pd.DataFrame:
    """The most probable tags of each section of a piece: the mean of its segments' rows.

    Args:
        taggram: as for :func:`plot_taggram`.
        sections: one row per section with ``start`` and ``end`` (seconds) and ``section``
            (a name), e.g. the table of :func:`~resemul_core.data.synth_piece.long_piece`.
        top: tags listed per section.

    Returns:
        One row per section: ``section``, ``segments`` (those starting inside it) and
        ``tags`` ("tag (probability), ..."), most probable first.
    """
    starts = taggram.index.to_numpy(dtype=np.float64)
    rows = []
    for _, section in sections.iterrows():
        inside = (starts >= section["start"]) & (starts < section["end"])
        mean = taggram[inside].mean(axis=0).sort_values(ascending=False, kind="stable")
        listed = ", ".join(f"{tag} ({p:.2f})" for tag, p in mean.iloc[:top].items())
        rows.append({"section": section["section"], "segments": int(inside.sum()), "tags": listed})
    return pd.DataFrame(rows).set_index("section")
