"""Figures: each is produced with the expected panels and content, and saves a PNG."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure

from resemul_core.analysis import excitation_stats
from resemul_core.analysis.excitation_stats import (
    PAPER_STD_ACROSS_TAGS,
    clip_means,
    loudness_summary,
    std_per_level,
    summarize_excitations,
)
from resemul_core.analysis.excitations import ExcitationSet
from resemul_core.analysis.plots import (
    excitation_figures,
    plot_excitations_at_levels,
    plot_first_block_excitations,
    plot_loudness_scatter,
    plot_std_across_tags,
    save_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def _legend_labels(fig) -> list[str]:
    (legend,) = fig.legends  # one legend for all panels
    return [t.get_text() for t in legend.get_texts()]


def test_excitations_at_levels_one_panel_per_level_sorted_channels(tmp_path):
    tags = ["rock", "classical", "metal", "dance", "pop"]
    rng = np.random.default_rng(0)
    means = {1: rng.uniform(size=(5, 8)), 3: rng.uniform(size=(5, 16)), 4: rng.uniform(size=(5, 4))}
    fig = plot_excitations_at_levels(means, tags, path=tmp_path / "levels.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert _is_png(tmp_path / "levels.png")
    assert [ax.get_title() for ax in fig.axes] == [
        "block 1 (8 channels)",
        "block 3 (16 channels)",
        "block 4 (4 channels)",
    ]
    assert _legend_labels(fig) == ["classical", "metal", "dance"]  # the paper's three
    # Every panel draws every chosen tag, with its own colour and line style.
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["classical", "metal", "dance"]
        assert len({line.get_linestyle() for line in ax.get_lines()}) == 3
    # Channels are sorted by their mean over the drawn tags, lowest first (the paper's order).
    drawn = np.stack([line.get_ydata() for line in fig.axes[1].get_lines()])
    np.testing.assert_allclose(
        drawn, means[3][[1, 2, 3]][:, np.argsort(means[3][[1, 2, 3]].mean(0))]
    )
    assert np.all(np.diff(drawn.mean(axis=0)) >= 0)


def test_excitations_at_levels_falls_back_to_the_first_tags_and_checks_names():
    means = {1: np.full((4, 2), 0.5)}
    means[1][0] = np.nan  # tag "a" is carried by no clip
    fig = plot_excitations_at_levels(means, ["a", "b", "c", "d"])
    assert _legend_labels(fig) == ["b", "c", "d"]  # all alike: the first usable ones
    fig = plot_excitations_at_levels(means, ["a", "b", "c", "d"], show_tags=["d"])
    assert _legend_labels(fig) == ["d"]
    with pytest.raises(ValueError, match=r"unknown tag\(s\) \['metal'\]"):
        plot_excitations_at_levels(means, ["a", "b", "c", "d"], show_tags=["metal"])


def test_without_the_papers_tags_several_contrasting_tags_are_drawn():
    """A store without classical/metal/dance still gets three tags, the most different ones."""
    rows = {"a": 0.5, "b": 0.5, "c": 0.75, "d": 0.25, "e": 0.5}
    means = {
        level: np.array([[v] * channels for v in rows.values()])
        for level, channels in ((1, 4), (5, 8), (9, 16))
    }
    fig = plot_excitations_at_levels(means, list(rows))
    # farthest from the average first (c and d tie: the earlier), then the farthest from those
    assert _legend_labels(fig) == ["c", "d", "a"]
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    assert _legend_labels(plot_excitations_at_levels(means, list(rows), num_tags=2)) == ["c", "d"]
    with_paper = {k: np.vstack([v, v[:1]]) for k, v in means.items()}
    fig = plot_excitations_at_levels(with_paper, [*rows, "metal"])
    assert _legend_labels(fig)[0] == "metal"  # the paper's tags come first where present
    assert len(_legend_labels(fig)) == 3


def test_first_block_figure_marks_half_and_the_split(tmp_path):
    rng = np.random.default_rng(1)
    means = rng.uniform(size=(6, 8))
    means[2] = np.nan
    fig = plot_first_block_excitations(means, list("abcdef"), split_at=3)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 5 + 2  # five tags with clips, the 0.5 line and the split line
    assert [ln.get_label() for ln in lines[:5]] == ["a", "b", "d", "e", "f"]
    # channels sorted by their mean over the tags, lowest first, as the paper's notebook does
    kept = means[[0, 1, 3, 4, 5]]
    drawn = np.stack([ln.get_ydata() for ln in lines[:5]])
    np.testing.assert_allclose(drawn, kept[:, np.argsort(kept.mean(axis=0))])
    assert np.all(np.diff(drawn.mean(axis=0)) >= 0)
    assert "lowest first" in ax.get_xlabel()
    assert len(fig.legends) == 1  # the tag legend sits below the axis
    assert list(lines[5].get_ydata()) == [0.5, 0.5]
    assert list(lines[6].get_xdata()) == [2.5, 2.5]
    assert "3 channels | 5 channels" in [t.get_text() for t in ax.texts]
    save_figure(fig, tmp_path / "first.png")
    assert _is_png(tmp_path / "first.png")
    with pytest.raises(ValueError, match="split_at"):
        plot_first_block_excitations(means, list("abcdef"), split_at=9)


def test_std_figure_overlays_the_paper(tmp_path):
    labels = np.array([[1, 0], [0, 1]])
    table = std_per_level(
        [np.array([[0.2, 0.4], [0.6, 0.4]]), np.array([[0.5], [0.7]])], labels, levels=[1, 2]
    )
    fig = plot_std_across_tags(table, path=tmp_path / "std.png")
    assert len(fig.axes) == 1 and _is_png(tmp_path / "std.png")
    ours, paper = fig.axes[0].get_lines()
    np.testing.assert_allclose(ours.get_ydata(), [0.1, 0.1])  # (0.2 + 0) / 2 and 0.1
    assert list(paper.get_xdata()) == list(range(1, 10))
    assert list(paper.get_ydata()) == list(PAPER_STD_ACROSS_TAGS.values())
    assert len(plot_std_across_tags(table, paper=False).axes[0].get_lines()) == 1


def test_loudness_scatter_two_rows_of_density_panels_with_the_fitted_lines(tmp_path):
    rng = np.random.default_rng(2)
    loud = rng.uniform(0, 0.5, 3000)
    slopes = np.array([0.6, -0.4, 0.01, 0.2])
    ex = 0.4 + np.outer(loud, slopes) + rng.normal(0, [0.05, 0.05, 0.01, 0.001], (3000, 4))
    fig = plot_loudness_scatter(ex, loud, path=tmp_path / "loud.png")
    assert len(fig.axes) == 6 and _is_png(tmp_path / "loud.png")
    assert fig.get_size_inches()[0] <= 10  # reads at the book's page width
    assert [ax.get_subplotspec().rowspan.start for ax in fig.axes] == [0, 0, 0, 1, 1, 1]
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles[0].startswith("average of 4 channels\n")
    (summary,) = fig.axes[5].texts
    assert summary.get_text().startswith("3 channels rise with loudness,\n1 fall")
    assert not fig.axes[5].axison
    assert [t.split("\n")[0] for t in titles[1:]] == [
        "most positive: channel 0",
        "most negative: channel 1",
        "most neutral: channel 2",
        "least error: channel 3",
    ]
    inside = (ex >= 0) & (ex <= 1)
    for k, ax in enumerate(fig.axes[:5]):
        counts = ax.collections[0].get_array()  # hexagon counts: every segment is drawn
        expected = inside.all(axis=1).sum() if k == 0 else inside[:, k - 1].sum()
        assert counts.sum() == pytest.approx(expected, abs=3) and counts.min() >= 1
    (line,) = fig.axes[1].get_lines()
    x, y = line.get_xdata(), line.get_ydata()
    assert (y[1] - y[0]) / (x[1] - x[0]) == pytest.approx(0.6, abs=0.02)
    assert fig.axes[3].get_xlabel() == "loudness (RMS amplitude)"


def _excitation_set() -> ExcitationSet:
    rng = np.random.default_rng(3)
    n_clips, per_clip = 20, 3
    segment_clip = np.repeat(np.arange(n_clips), per_clip)
    seg = rng.uniform(0.2, 0.8, (n_clips * per_clip, 8)).astype(np.float32)
    labels = rng.integers(0, 2, (n_clips, 3)).astype(np.uint8)
    labels[0] = 1
    clips = [clip_means(seg, segment_clip).astype(np.float32)] + [
        rng.uniform(size=(n_clips, c)).astype(np.float32) for c in (8, 16, 32)
    ]
    result = ExcitationSet(
        levels=(1, 2, 3, 4),
        clip=tuple(clips),
        segment={1: seg},
        segment_clip=segment_clip,
        segment_rms=rng.uniform(0, 0.5, n_clips * per_clip).astype(np.float32),
        clip_ids=np.array([str(i) for i in range(n_clips)]),
        labels=labels,
        tags=("classical", "metal", "dance"),
    )
    return result


def test_all_excitation_figures_from_an_excitation_set(tmp_path):
    result = _excitation_set()
    figures = excitation_figures(result, loudness="db", out_dir=tmp_path / "figs")
    expected_axes = {
        "excitations_at_levels": 3,
        "first_block_excitations": 1,
        "std_across_tags": 1,
        "loudness_scatter": 6,
    }
    assert {name: len(fig.axes) for name, fig in figures.items()} == expected_axes
    for name in expected_axes:
        assert _is_png(tmp_path / "figs" / f"{name}.png")
    levels_fig = figures["excitations_at_levels"]
    assert [ax.get_title().split()[1] for ax in levels_fig.axes] == ["1", "3", "4"]
    assert figures["loudness_scatter"].axes[3].get_xlabel() == "loudness (dBFS)"


def _fits_drawn(figure: Figure) -> list[tuple[np.ndarray, np.ndarray]]:
    panels = figure.axes[:5]  # the sixth axis holds text
    return [(ax.get_lines()[0].get_xdata(), ax.get_lines()[0].get_ydata()) for ax in panels]


def test_excitation_figures_draw_the_summarys_lines_and_fit_nothing(monkeypatch):
    result = _excitation_set()
    summary = summarize_excitations(result, loudness="db", floor_db=-60.0)
    fits = summary["loudness"]

    def refit(*args, **kwargs):
        raise AssertionError("a figure fitted again what the analysis had fitted")

    for name in ("loudness_regression", "std_per_level", "std_across_tags"):
        monkeypatch.setattr(excitation_stats, name, refit)
    monkeypatch.setattr(np, "polyfit", refit)
    figures = excitation_figures(result, summary=summary)
    loud = result.loudness("db", floor_db=-60.0)
    lines = _fits_drawn(figures["loudness_scatter"])
    for (x, y), fit in zip(lines, [fits["average"], *fits["notable"].values()], strict=True):
        np.testing.assert_array_equal(x, [loud.min(), loud.max()])
        np.testing.assert_array_equal(y, fit["intercept"] + fit["slope"] * x)
    (ours, _paper) = figures["std_across_tags"].axes[0].get_lines()
    assert list(ours.get_ydata()) == [row["std"] for row in summary["std_across_tags"]]
    (mark,) = figures["first_block_excitations"].axes[0].texts
    assert mark.get_text().startswith(f"{fits['positive']} channels |")
    with pytest.raises(ValueError, match="not with a summary"):
        excitation_figures(result, summary=summary, loudness="db")
    with pytest.raises(ValueError, match="not of these excitations"):
        excitation_figures(result, summary={**summary, "num_segments": 1})


def test_without_a_summary_the_figures_fit_once_through_the_analysis(monkeypatch):
    calls = []
    real = excitation_stats.loudness_regression

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(excitation_stats, "loudness_regression", counted)
    excitation_figures(_excitation_set(), loudness="db")
    assert len(calls) == 2  # one summary: the per-channel table and the channel average
    ex, loud = _excitation_set().segment_level(1), _excitation_set().loudness()
    fits = loudness_summary(ex, loud)
    given = _fits_drawn(plot_loudness_scatter(ex, loud, fits=fits))
    computed = _fits_drawn(plot_loudness_scatter(ex, loud))
    for (_, y_given), (_, y_computed) in zip(given, computed, strict=True):
        np.testing.assert_array_equal(y_given, y_computed)
    with pytest.raises(ValueError, match="fits of 8 channels of rms loudness"):
        plot_loudness_scatter(ex[:, :4], loud, fits=fits)
