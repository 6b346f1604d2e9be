"""What every figure module of the book shares: a style, a figure factory and saving.

Public: :func:`save_figure`. The factory and the finishing step are for the figure modules
(:mod:`resemul_core.analysis.plots`, :mod:`resemul_core.analysis.excitation_plots`,
:mod:`resemul_core.analysis.audio_views`, :mod:`resemul_core.analysis.diagrams`).

Figures are built on ``matplotlib.figure.Figure`` rather than ``pyplot`` so that no global
figure registry grows in long sessions; Jupyter's inline backend still displays a returned
``Figure``. Widths are chosen for the book's page: at most about 10 inches, so that text stays
legible when the figure is scaled to the page.
"""

from __future__ import annotations

import os
from pathlib import Path

import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from resemul_core.files import atomic_write

__all__ = ["save_figure", "new_figure", "finish", "PAGE_WIDTH"]

#: Width in inches of a figure that spans the book's page.
PAGE_WIDTH = 10.0

_STYLE = "whitegrid"


def save_figure(figure: Figure, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Atomically write ``figure`` as a PNG file (SVG if ``path`` ends in ``.svg``)."""
    path = Path(path)
    kind = "svg" if path.suffix.lower() == ".svg" else "png"
    with atomic_write(path) as handle:
        figure.savefig(handle, format=kind, dpi=dpi, bbox_inches="tight")
    return path


def new_figure(
    ncols: int, *, width: float, height: float, nrows: int = 1, style: str = _STYLE, **kwargs
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure and its axes, row by row, in a seaborn style.

    The style applies at axes creation, so it is scoped here instead of set globally;
    ``kwargs`` go to ``Figure.subplots`` (``sharey=True``, ``gridspec_kw=...``).
    """
    with sns.axes_style(style):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.subplots(nrows, ncols, squeeze=False, **kwargs)
    return figure, [ax for row in axes for ax in row]


def finish(figure: Figure, path: str | os.PathLike | None) -> Figure:
    """Save ``figure`` to ``path`` when one is given; return it."""
    if path is not None:
        save_figure(figure, path)
    return figure
