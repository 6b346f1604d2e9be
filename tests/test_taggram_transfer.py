"""The tagging chapter's helpers: the demo piece, taggram figures and tables, linear probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from resemul_core.analysis.statistics import score_interval
from resemul_core.analysis.taggram import plot_taggram, tags_by_section
from resemul_core.analysis.transfer import PAIRED_DIFFERENCE, clip_embeddings, linear_probe
from resemul_core.data.audio import dbfs, rms
from resemul_core.data.store import write_store_from_arrays
from resemul_core.data.synth_piece import DEMO_SECTIONS, Section, long_piece
from resemul_core.interfaces.tagger import Tagger
from resemul_core.model.sample_cnn import build_model


def test_long_piece_renders_each_section_at_its_level():
    waveform, sections = long_piece(section_seconds=6.0, sample_rate=8_000, seed=1)
    assert waveform.shape == (4 * 6 * 8_000,) and waveform.dtype == np.float32
    assert sections["start"].tolist() == [0.0, 6.0, 12.0, 18.0]
    assert sections["section"].tolist() == [s.name for s in DEMO_SECTIONS]
    for k, section in enumerate(DEMO_SECTIONS):  # away from the crossfades
        middle = waveform[k * 48_000 + 8_000 : (k + 1) * 48_000 - 8_000]
        assert float(dbfs(rms(middle))) == pytest.approx(section.level_db, abs=1.5)
    again, _ = long_piece(section_seconds=6.0, sample_rate=8_000, seed=1)
    np.testing.assert_array_equal(again, waveform)
    with pytest.raises(ValueError, match="unknown instruments \\['kazoo'\\]"):
        Section("x", frozenset({"kazoo"}), 100.0, -20.0)
    with pytest.raises(ValueError, match="section_seconds must exceed 2"):
        long_piece(section_seconds=1.5)


def taggram() -> pd.DataFrame:
    times = pd.Index([0.0, 1.0, 2.0, 3.0], name="time")
    return pd.DataFrame(
        {"a": [0.9, 0.8, 0.1, 0.2], "b": [0.1, 0.2, 0.7, 0.9], "c": [0.5, 0.5, 0.5, 0.3]},
        index=times,
    )


def test_tags_by_section_averages_the_segments_inside_each_section():
    sections = pd.DataFrame(
        {"start": [0.0, 2.0], "end": [2.0, 4.0], "section": ["first", "second"]}
    )
    table = tags_by_section(taggram(), sections, top=2)
    assert table["segments"].tolist() == [2, 2]
    assert table.loc["first", "tags"] == "a (0.85), c (0.50)"
    assert table.loc["second", "tags"] == "b (0.80), c (0.40)"


def test_plot_taggram_orders_tags_by_clip_probability():
    figure = plot_taggram(taggram(), top=2, marks=[2.0], title="x")
    heat, bars = figure.axes[:2]  # then the colour bar
    assert [t.get_text() for t in heat.get_yticklabels()] == ["a", "b"]  # means .5, .475, .45
    assert heat.get_xlim() == (0.0, 4.0) and len(heat.lines) == 1  # one section mark
    assert [p.get_width() for p in bars.patches] == pytest.approx([0.5, 0.475])
    with pytest.raises(ValueError, match="empty"):
        plot_taggram(taggram().iloc[:0])


def test_linear_probe_scores_and_pairs_with_the_head():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (200, 3))
    labels[:, 2] = 0
    labels[:5, 2] = 1  # rare tag: present in the test half only
    features = labels[:, :2] * 2.0 + rng.normal(0, 1.0, (200, 2))  # tags 0 and 1 readable
    features = np.hstack([features, rng.normal(0, 1, (200, 6))])
    head = np.clip(labels + rng.normal(0, 1.5, labels.shape), 0, 1)
    train, test = (features[100:], labels[100:]), (features[:100], labels[:100])
    table, scores = linear_probe(train, test, head=head[:100], num_resamples=200)
    assert scores.shape == (100, 3)
    assert np.all(scores[:, 2] == 0.0)  # never seen in training: its training rate, 0
    probe = table.loc["linear probe on embeddings"]
    expected = score_interval(test[1], scores, num_resamples=200)
    assert probe["roc_auc"] == pytest.approx(expected.estimate)
    assert probe["roc_auc_low"] == pytest.approx(expected.low)
    diff = table.loc[PAIRED_DIFFERENCE, "roc_auc"]
    assert diff == pytest.approx(probe["roc_auc"] - table.loc["the network's head", "roc_auc"])
    with pytest.raises(ValueError, match="embeddings of 8 and 7 values"):
        linear_probe(train, (features[:10, :7], labels[:10]))


def test_clip_embeddings_are_the_mean_of_each_clips_segments(tmp_path):
    rng = np.random.default_rng(0)
    clips = [(0.2 * rng.standard_normal((3, 243))).astype(np.float32) for _ in range(6)]
    store = write_store_from_arrays(
        tmp_path / "store",
        waveforms=clips,
        labels=rng.integers(0, 2, (6, 2)).astype(np.uint8),
        splits=["train"] * 4 + ["test"] * 2,
        tags=["x", "y"],
    )
    torch.manual_seed(0)
    model = build_model("se-multi", num_tags=2, width=1 / 16, num_blocks=4).eval()
    tagger = Tagger(model, ["x", "y"], precision="fp32")
    vectors, labels, head = clip_embeddings(tagger, store, "test")
    assert vectors.shape == (2, sum(model.config.block_channels()[1:]))
    np.testing.assert_array_equal(labels, store.labels[[4, 5]])
    segments = torch.from_numpy(store.read_clip(4))
    with torch.no_grad():
        features = model.forward_features(segments)
        probs = torch.sigmoid(model(segments)).mean(0)
    np.testing.assert_allclose(vectors[0], features.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head[0], probs.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="no clips in its 'valid' split"):
        clip_embeddings(tagger, store, "valid")
