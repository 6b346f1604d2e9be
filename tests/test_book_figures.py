"""Figures and displays added for the book: results on one scale, the architecture diagram,
audio players and librosa views of a store's clips."""

import base64
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from resemul_core.analysis import plots
from resemul_core.config import ModelConfig
from resemul_core.data.store import write_store_from_arrays
from resemul_core.model.sample_cnn import architecture_summary


def test_results_panels_share_one_y_range():
    table = pd.DataFrame(
        {
            "variant": ["basic", "se-multi", "res1"],
            "roc_auc": [0.80, 0.85, 0.70],
            "pr_auc": [0.50, 0.60, 0.40],
            "paper_roc_auc": [0.9055, 0.9111, 0.9048],
        }
    )
    fig = plots.plot_results(table)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["ROC-AUC, this build", "PR-AUC, this build", "ROC-AUC, paper (MTAT, poster)"]
    limits = {ax.get_ylim() for ax in fig.axes}
    assert len(limits) == 1  # one y range for every panel
    (low, high) = limits.pop()
    assert low <= 0.40 and high >= 0.9111 and high <= 1.0
    heights = sorted(round(p.get_height(), 4) for p in fig.axes[1].patches if p.get_height())
    assert heights == [0.4, 0.5, 0.6]
    without_pr = plots.plot_results(table.drop(columns="pr_auc"))
    assert len(without_pr.axes) == 2


def test_architecture_diagram_follows_the_model(tmp_path):
    config = ModelConfig(block="rese2", multi=True, width=1 / 16)
    fig = plots.plot_architecture(config, path=tmp_path / "arch.svg")
    assert fig.get_size_inches()[0] <= 10
    texts = [t.get_text() for t in fig.axes[0].texts]
    rows = architecture_summary(config)
    for row in rows[:-1]:
        assert row["stage"] in texts
        assert f"{row['channels']} ch\n× {row['length']:,}" in texts
    assert any("16 + 16 + 32 = 64" in t for t in texts)  # blocks 7-9 feed the multi head
    assert any("× SE gate" in t and "dropout 0.2" in t for t in texts)
    assert (tmp_path / "arch.svg").read_text().lstrip().startswith("<?xml")
    plain = plots.plot_architecture(ModelConfig(block="basic"))
    assert any(t.get_text() == "max over time = 512" for t in plain.axes[0].texts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    length, rate = 3**7, 8_000
    t = np.arange(3 * length) / rate
    levels = [0.5, 0.05, 0.3, 0.02, 0.4]
    waves = [
        (a * np.sin(2 * np.pi * f * t)).astype(np.float32).reshape(3, length)
        for a, f in zip(levels, [220, 440, 880, 330, 110], strict=True)
    ]
    labels = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]])
    return write_store_from_arrays(
        tmp_path_factory.mktemp("store") / "s",
        waveforms=waves,
        labels=labels,
        splits=["train", "valid", "test", "test", "train"],
        tags=["loud", "quiet", "classical", "techno"],
        sample_rate=rate,
    )


def test_tag_examples_prefer_clips_with_none_of_the_other_tags(store):
    examples = plots.tag_examples(store)
    # default tags in DEFAULT_LISTENING_TAGS order, each with a distinct clip
    assert list(examples["tag"]) == ["classical", "techno", "quiet", "loud"]
    assert examples["clip"].is_unique
    for row in examples.itertuples():
        assert row.tag in row.tags.split(", ")
    assert list(examples["clip"]) == [0, 2, 1, 4]  # clip 4 is loud and nothing else listed
    assert list(plots.tag_examples(store, ["loud"], per_tag=2)["clip"]) == [0, 2]
    assert list(plots.tag_examples(store, ["loud"], per_tag=2, split="test")["clip"]) == [2]
    with pytest.raises(ValueError, match="unknown tag"):
        plots.tag_examples(store, ["metal"])


def test_audio_table_embeds_short_players_at_their_own_level(store):
    examples = plots.tag_examples(store, ["loud", "quiet"])
    html = plots.audio_table(store, examples, seconds=0.5, rate=8_000).data
    sources = re.findall(r'src="data:(audio/[a-z]+);base64,([^"]+)"', html)
    assert len(sources) == 2 and html.count("<tr>") == 3
    sizes = [len(base64.b64decode(data)) for _, data in sources]
    assert max(sizes) < 20_000  # half a second, compressed
    wav = plots.audio_player(
        np.full(800, 0.25, dtype=np.float32), 8_000, rate=8_000, compress=False
    )
    assert wav.mimetype == "audio/wav"
    pcm = np.frombuffer(wav.data[44:], dtype="<i2")
    assert abs(int(np.median(pcm)) - round(0.25 * 32767)) <= 1  # not normalised to full scale


def test_audio_views_use_librosa_on_one_colour_scale(store):
    examples = plots.tag_examples(store, ["loud", "quiet"])
    fig = plots.plot_audio_views(store, examples, seconds=0.5)
    assert len(fig.axes) == 2 * 3 + 1  # two rows of three, and the colour bar
    meshes = [ax.collections[0] for ax in fig.axes[2:6:3]]
    assert len({m.get_clim() for m in meshes}) == 1
    loud, quiet = (np.median(ax.get_lines()[0].get_ydata()) for ax in fig.axes[1:5:3])
    assert loud == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=1.0)  # RMS of a sine
    assert quiet == pytest.approx(20 * np.log10(0.05 / np.sqrt(2)), abs=1.0)
    with pytest.raises(ValueError, match="no example"):
        plots.plot_audio_views(store, examples.iloc[:0])
