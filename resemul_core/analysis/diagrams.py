"""A diagram of the network drawn from the code: :func:`plot_architecture`.

Public: :func:`plot_architecture`, :func:`block_recipe`; also importable from
:mod:`resemul_core.analysis.plots`.

The boxes, widths and lengths come from
:func:`resemul_core.model.sample_cnn.architecture_summary` of a
:class:`~resemul_core.config.ModelConfig`, so the diagram follows the model that is built:
one box per stage, its height growing with the logarithm of the stage's output length, its
colour with the number of channels; below, the head that reads the last block or, with
multi-level aggregation, the last three.
"""

from __future__ import annotations

import math
import os

import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure
from resemul_core.config import ModelConfig
from resemul_core.model.sample_cnn import architecture_summary

__all__ = ["plot_architecture", "block_recipe"]

_GATE = "× SE gate"


def block_recipe(config: ModelConfig) -> str:
    """One line on what a block of ``config.block`` computes (specification §2.2)."""
    gate = f" → {_GATE}" if config.has_se else ""
    if config.num_convs == 0:
        return f"conv k3 → BN → ReLU → max-pool 3{gate}"
    first = (
        f"conv k3 → BN → ReLU → dropout {config.block_dropout:g} → "
        if config.num_convs == 2
        else ""
    )
    return (
        f"main = {first}conv k3 → BN{gate};  out = max-pool 3(ReLU(shortcut + main))\n"
        "shortcut: the input, or a 1×1 conv + BN where the width changes"
    )


def _box(ax, x, y, w, h, colour, **kwargs) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.06",
            facecolor=colour,
            edgecolor="0.25",
            linewidth=0.8,
            **kwargs,
        )
    )


def _arrow(ax, start, end, **kwargs) -> None:
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=9,
            color="0.3",
            linewidth=0.9,
            shrinkA=1,
            shrinkB=1,
            **kwargs,
        )
    )


def plot_architecture(
    config: ModelConfig | None = None, *, path: str | os.PathLike | None = None
) -> Figure:
    """The network of ``config`` as a diagram at the book's page width.

    Args:
        config: the model (default: the paper's SE block with multi-level aggregation,
            ``ModelConfig(block="se", multi=True)``).
        path: also save the figure there (PNG, or SVG for a ``.svg`` path).

    Returns:
        A one-axis figure. Top row: the input and every stage of
        :func:`~resemul_core.model.sample_cnn.architecture_summary`, labelled with its
        channels × output length; bottom row: the block's recipe, the pooling and the head.
    """
    config = config if config is not None else ModelConfig(block="se", multi=True)
    rows = architecture_summary(config)
    stages, head = rows[:-1], rows[-1]
    figure, (ax,) = new_figure(1, width=PAGE_WIDTH, height=3.7, style="white")
    n = len(stages) + 1  # the input, then stem and blocks
    ax.set(xlim=(-0.6, n - 0.4), ylim=(-1.25, 2.75))
    ax.set_axis_off()
    widths = sorted({int(r["channels"]) for r in stages})
    palette = dict(zip(widths, sns.color_palette("crest", len(widths) + 1)[1:], strict=True))
    top = 1.55
    longest = math.log(config.segment_length, 3)

    def height(length: int) -> float:
        return 0.25 + 1.05 * math.log(max(length, 1), 3) / longest

    items = [{"stage": "input", "channels": 1, "length": config.segment_length}] + stages
    for x, row in enumerate(items):
        h = height(int(row["length"]))
        colour = "white" if row["stage"] == "input" else palette[int(row["channels"])]
        _box(ax, x, top, 0.62, h, colour)
        name = "waveform" if row["stage"] == "input" else str(row["stage"])
        ax.text(x, top + h / 2 + 0.1, name, ha="center", va="bottom", fontsize=8, weight="bold")
        ax.text(
            x,
            top - h / 2 - 0.08,
            f"{int(row['channels'])} ch\n× {int(row['length']):,}",
            ha="center",
            va="top",
            fontsize=7.5,
        )
        if x:
            _arrow(ax, (x - 0.69, top), (x - 0.31, top))
    # the head: which blocks it pools, then the classifier
    pooled = list(range(n - 3, n)) if config.multi else [n - 1]
    pooled_widths = [int(items[x]["channels"]) for x in pooled]
    pool_w = 2.5 if config.multi else 1.8
    pool_x, pool_y = min((pooled[0] + pooled[-1]) / 2, n - 0.45 - pool_w / 2), -0.85
    for x in pooled:
        _arrow(ax, (x, top - height(int(items[x]["length"])) / 2 - 0.42), (pool_x, pool_y + 0.3))
    pool_text = (
        "max over time, concatenate\n" + " + ".join(str(w) for w in pooled_widths)
        if config.multi
        else "max over time"
    ) + f" = {int(head['channels'])}"
    _box(ax, pool_x, pool_y, pool_w, 0.55, "0.93")
    ax.text(pool_x, pool_y, pool_text, ha="center", va="center", fontsize=8)
    head_x = pool_x - pool_w / 2 - 2.35
    d = int(head["channels"])
    _box(ax, head_x, pool_y, 3.7, 0.55, "#fde9c9")
    ax.text(
        head_x,
        pool_y,
        f"FC {d} → BN → ReLU → dropout {config.dropout:g}\n"
        f"→ FC {int(head['length'])} → sigmoid: tag probabilities",
        ha="center",
        va="center",
        fontsize=8,
    )
    _arrow(ax, (pool_x - pool_w / 2, pool_y), (head_x + 1.85, pool_y))
    ax.text(
        -0.5,
        -0.05,
        f"{config.variant}: each block: {block_recipe(config)}"
        + (
            f"\nSE gate: mean over time → FC to {config.alpha:g}·C → ReLU → FC to C → sigmoid"
            if config.has_se
            else ""
        ),
        ha="left",
        va="center",
        fontsize=8,
        color="0.15",
    )
    ax.text(
        n - 0.45,
        2.7,
        "box height ∝ log(length), colour: channels",
        ha="right",
        va="top",
        fontsize=7,
        color="0.4",
    )
    return finish(figure, path)
