"""Excitation analysis: gates match a hand computation, analyses match hand-computed values."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resemul_core import VARIANTS, build_model
from resemul_core.analysis.excitation_stats import (
    DEFAULT_FLOOR_DB,
    PAPER_STD_ACROSS_TAGS,
    clip_means,
    loudness_regression,
    loudness_summary,
    notable_channels,
    rms_to_db,
    segment_loudness,
    segment_rms,
    slope_counts,
    std_across_tags,
    std_per_level,
    summarize_excitations,
    tag_means,
)
from resemul_core.analysis.excitations import (
    ExcitationSet,
    extract_excitations,
    load_excitations,
    require_se,
    save_excitations,
    se_variants,
)
from resemul_core.data import audio
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.cli import main
from resemul_core.model.checkpoint import save_checkpoint

TAGS = ["classical", "metal", "dance"]
L = 243  # 3 ** 5: input length of the 4-block test models


def _tiny(name: str, *, width: float = 1 / 16) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_tags=len(TAGS), width=width, num_blocks=4)
    # Non-trivial running statistics, so that eval-mode BatchNorm matters in the comparison.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(1)
    counts = [3, 1, 2, 0, 2, 3]  # clip 3 has no segments and must be skipped
    waveforms = [
        (rng.standard_normal((n, L)) * (0.05 + 0.1 * i)).clip(-1, 1).astype(np.float32)
        for i, n in enumerate(counts)
    ]
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1], [1, 1, 0]])
    splits = ["test", "test", "test", "test", "train", "test"]
    ids = ["a", "b", "c", "d", "e", "f"]
    return write_store_from_arrays(
        tmp_path / "store",
        waveforms=waveforms,
        labels=labels,
        splits=splits,
        tags=TAGS,
        clip_ids=ids,
    )


# --- extraction against a hand computation ------------------------------------------------


def _bn(x, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean[:, None]) * scale[:, None] + bn.bias[:, None]


def _conv(x, conv):
    return F.conv1d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)


def _pool3(x):
    b, c, t = x.shape
    return x[..., : t - t % 3].reshape(b, c, t // 3, 3).amax(-1)


def _gate(x, se):
    squeezed = x.mean(-1)
    hidden = torch.relu(squeezed @ se.expand.weight.T + se.expand.bias)
    return torch.sigmoid(hidden @ se.contract.weight.T + se.contract.bias)


def _gates_by_hand(model, segments: np.ndarray) -> list[np.ndarray]:
    """Every SE gate recomputed from the layers' weights, without calling any module."""
    x = torch.from_numpy(segments)[:, None, :]
    h = torch.relu(_bn(_conv(x, model.stem.conv), model.stem.bn))
    gates = []
    for block in model.blocks:
        if hasattr(block, "conv"):  # SE block: gate on the pooled map (specification §2.2)
            out = _pool3(torch.relu(_bn(_conv(h, block.conv), block.bn)))
            g = _gate(out, block.se)
            h = out * g[..., None]
        else:  # ReSE block: gate on the main path after its last BN
            main = _bn(_conv(h, block.conv1), block.bn1)
            if block.conv2 is not None:  # eval mode: the dropout in between is the identity
                main = _bn(_conv(torch.relu(main), block.conv2), block.bn2)
            if block.shortcut is None:
                shortcut = h
            else:
                shortcut = _bn(_conv(h, block.shortcut.conv), block.shortcut.bn)
            g = _gate(main, block.se)
            h = _pool3(torch.relu(shortcut + main * g[..., None]))
        gates.append(g.numpy())
    return gates


@pytest.mark.parametrize("name", ["se", "rese1", "rese2-multi"])
def test_extracted_gates_equal_a_hand_computation(store, name):
    model = _tiny(name).train()
    result = extract_excitations(
        model, store, split="test", batch_size=4, segment_levels="all", progress=False
    )
    assert model.training  # the caller's mode is restored

    kept = [0, 1, 2, 5]  # the test clips that have segments
    segments = np.concatenate([store.read_clip(i) for i in kept])
    with torch.no_grad():
        expected = _gates_by_hand(model, segments)
    owner = np.repeat(np.arange(4), [3, 1, 2, 3])
    np.testing.assert_array_equal(result.segment_clip, owner)
    assert result.levels == (1, 2, 3, 4)
    for level, hand in zip(result.levels, expected, strict=True):
        np.testing.assert_allclose(result.segment_level(level), hand, atol=2e-6)
        by_clip = np.stack([hand[owner == k].mean(axis=0) for k in range(4)])
        np.testing.assert_allclose(result.clip_level(level), by_clip, atol=2e-6)
    np.testing.assert_array_equal(result.clip_ids, ["a", "b", "c", "f"])
    np.testing.assert_array_equal(result.labels, store.labels[kept])
    rms = np.sqrt((segments.astype(np.float64) ** 2).mean(axis=1))
    np.testing.assert_allclose(result.segment_rms, rms, rtol=1e-6)
    assert result.variant == name and result.tags == tuple(TAGS)


@pytest.mark.parametrize("name", se_variants())
@pytest.mark.parametrize("width", [1 / 16, 1 / 8])
def test_every_se_variant_at_any_width_yields_one_array_per_block(store, name, width):
    model = _tiny(name, width=width)
    result = extract_excitations(model, store, progress=False)
    assert [a.shape for a in result.clip] == [(4, c) for c in model.config.block_channels()]
    assert list(result.segment) == [1]  # by default only the first block per segment
    assert all(((a > 0) & (a < 1)).all() for a in result.clip)


def test_se_variants_are_exactly_those_with_se_blocks():
    assert se_variants() == ["se", "se-multi", "rese1", "rese1-multi", "rese2", "rese2-multi"]
    assert set(se_variants()) < set(VARIANTS)


@pytest.mark.parametrize("name", ["basic", "res1-multi", "res2"])
def test_a_variant_without_se_blocks_is_refused_clearly(store, name):
    model = _tiny(name)
    with pytest.raises(ValueError, match=rf"variant '{name}' has no squeeze-and-excitation") as e:
        extract_excitations(model, store, progress=False)
    assert "se-multi" in str(e.value) and "rese2-multi" in str(e.value)
    with pytest.raises(ValueError, match="no squeeze-and-excitation"):
        require_se(model.config)


def test_bad_options_are_refused(store):
    model = _tiny("se")
    with pytest.raises(ValueError, match=r"no SE block at level\(s\) \[7\]"):
        extract_excitations(model, store, segment_levels=[1, 7], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_excitations(model, store, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        extract_excitations(model, store, split="val", progress=False)


def test_saved_file_round_trips(store, tmp_path):
    result = extract_excitations(
        _tiny("rese2"), store, segment_levels=[1, 3], batch_size=100, progress=False
    )
    path = save_excitations(tmp_path / "out" / "ex.npz", result)
    loaded = load_excitations(path)
    assert loaded.levels == result.levels and loaded.tags == result.tags
    assert sorted(loaded.segment) == [1, 3]
    for a, b in zip(loaded.clip, result.clip, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.segment[3], result.segment[3])
    np.testing.assert_array_equal(loaded.segment_clip, result.segment_clip)
    np.testing.assert_array_equal(loaded.clip_ids, result.clip_ids)
    assert (loaded.variant, loaded.split) == ("rese2", "test")
    with pytest.raises(KeyError, match="level 2 were not kept"):
        loaded.segment_level(2)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a resemul excitation file"):
        load_excitations(tmp_path / "other.npz")


# --- loudness -----------------------------------------------------------------------------


def test_loudness_measures():
    t = np.arange(300)
    segments = np.stack([np.full(300, 0.5), np.sin(2 * np.pi * t / 30), np.zeros(300)])
    np.testing.assert_allclose(segment_rms(segments), [0.5, 1 / math.sqrt(2), 0.0], atol=1e-12)
    db = segment_loudness(segments, measure="db")
    np.testing.assert_allclose(db, [20 * math.log10(0.5), -10 * math.log10(2), -80.0])
    np.testing.assert_allclose(rms_to_db(np.array([1.0, 0.1, 0.0]), floor_db=-60), [0, -20, -60])
    with pytest.raises(ValueError, match="unknown loudness measure 'lufs'"):
        segment_loudness(segments, measure="lufs")


def test_loudness_is_the_data_layers_one_definition():
    segments = np.random.default_rng(5).uniform(-0.3, 0.3, (4, 200)).astype(np.float32)
    segments[3] = 0.0
    assert rms_to_db is audio.dbfs and DEFAULT_FLOOR_DB == audio.LOUDNESS_FLOOR_DB
    np.testing.assert_array_equal(segment_rms(segments), audio.rms(segments))
    db = segment_loudness(segments, measure="db")
    np.testing.assert_array_equal(db, audio.dbfs(audio.rms(segments)))
    assert db[3] == audio.LOUDNESS_FLOOR_DB


# --- analyses on constructed data ---------------------------------------------------------


def test_clip_and_tag_means_by_hand():
    seg = np.array([[0.1, 0.5], [0.3, 0.7], [0.9, 0.1]])
    expected = [[0.2, 0.6], [np.nan, np.nan], [0.9, 0.1]]  # clip 1 has no segment
    np.testing.assert_allclose(clip_means(seg, np.array([0, 0, 2])), expected)
    clips = np.array([[0.2, 0.4], [0.4, 0.6], [0.7, 0.5]])
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    means = tag_means(clips, labels)
    np.testing.assert_allclose(means[:2], [[0.3, 0.5], [0.7, 0.5]])
    assert np.isnan(means[2]).all()  # no clip carries the third tag


def test_std_across_tags_is_the_population_std_averaged_over_channels():
    # Tag means (0.3, 0.5) and (0.7, 0.5): channel stds 0.2 and 0 (ddof=0) -> 0.1.
    means = np.array([[0.3, 0.5], [0.7, 0.5], [np.nan, np.nan]])
    assert std_across_tags(means) == pytest.approx(0.1)
    # Three tags 0.1, 0.2, 0.6 in one channel: population std sqrt(0.14/3).
    assert std_across_tags(np.array([[0.1], [0.2], [0.6]])) == pytest.approx(math.sqrt(0.14 / 3))


def test_std_per_level_on_a_constructed_example():
    labels = np.array([[1, 0], [1, 0], [0, 1]])
    level1 = np.array([[0.2, 0.4], [0.4, 0.6], [0.7, 0.5]])  # -> 0.1 (see above)
    level2 = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])  # tags agree -> 0
    table = std_per_level([level1, level2], labels, levels=[1, 2])
    assert table["level"].tolist() == [1, 2] and table["channels"].tolist() == [2, 3]
    np.testing.assert_allclose(table["std"], [0.1, 0.0], atol=1e-12)
    assert table["paper"].isna().all()  # a 2-level model is not compared with the paper's 9
    nine = std_per_level([level1] * 9, labels)
    assert nine["paper"].tolist() == list(PAPER_STD_ACROSS_TAGS.values())


def test_regression_by_hand():
    table = loudness_regression(np.array([[0.0], [2.0], [1.0]]), np.array([0.0, 1.0, 2.0]))
    row = table.loc[0]
    assert (row["slope"], row["intercept"]) == pytest.approx((0.5, 0.5))
    assert row["r2"] == pytest.approx(0.25)  # sse 1.5 / syy 2
    assert row["rmse"] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="loudness is the same"):
        loudness_regression(np.ones((3, 1)), np.ones(3))


def _planted(n: int = 4000, seed: int = 0):
    rng = np.random.default_rng(seed)
    loud = rng.uniform(0.0, 0.5, n)
    slopes = np.array([0.8, 0.3, 0.02, -0.05, -0.6, 0.1])
    noise = np.array([0.05, 0.01, 0.03, 0.002, 0.04, 0.02])
    ex = 0.5 + np.outer(loud - 0.25, slopes) + rng.standard_normal((n, 6)) * noise
    return ex, loud, slopes


def test_regression_recovers_planted_slopes_and_counts():
    ex, loud, slopes = _planted()
    table = loudness_regression(ex, loud)
    np.testing.assert_allclose(table["slope"], slopes, atol=0.01)
    np.testing.assert_allclose(table["intercept"], 0.5 - 0.25 * slopes, atol=0.005)
    assert slope_counts(table["slope"]) == {"positive": 4, "negative": 2, "zero": 0}
    assert notable_channels(table) == {
        "most_positive": 0,
        "most_negative": 4,
        "most_neutral": 2,
        "least_error": 3,
    }
    assert table.loc[3, "rmse"] == pytest.approx(0.002, rel=0.05)
    assert slope_counts(np.array([1.0, 0.0, -2.0])) == {"positive": 1, "negative": 1, "zero": 1}


def _constructed_set() -> ExcitationSet:
    ex, loud, _ = _planted(n=600)
    segment_clip = np.repeat(np.arange(60), 10)
    labels = np.zeros((60, 2), dtype=np.uint8)
    labels[:30, 0] = labels[30:, 1] = 1
    clip1 = clip_means(ex, segment_clip).astype(np.float32)
    clip2 = np.where(labels[:, :1] == 1, 0.3, 0.5) * np.ones((60, 4))  # tag means 0.3 vs 0.5
    return ExcitationSet(
        levels=(1, 2),
        clip=(clip1, clip2.astype(np.float32)),
        segment={1: ex.astype(np.float32)},
        segment_clip=segment_clip,
        segment_rms=loud.astype(np.float32),
        clip_ids=np.array([str(i) for i in range(60)]),
        labels=labels,
        tags=("loud", "soft"),
        variant="se",
        split="test",
    )


def test_summary_is_json_and_matches_the_analyses():
    summary = summarize_excitations(_constructed_set())
    json.dumps(summary, allow_nan=False)
    level2 = summary["std_across_tags"][1]
    assert level2 == {"level": 2, "channels": 4, "std": pytest.approx(0.1), "paper": None}
    loud = summary["loudness"]
    assert (loud["positive"], loud["negative"], loud["channels"]) == (4, 2, 6)
    assert loud["notable"]["most_positive"]["channel"] == 0
    assert loud["notable"]["most_positive"]["slope"] == pytest.approx(0.8, abs=0.03)
    mean_slope = np.mean([0.8, 0.3, 0.02, -0.05, -0.6, 0.1])
    assert loud["average"]["slope"] == pytest.approx(mean_slope, abs=0.01)
    assert "positive = the channel's excitation rises with loudness" in loud["convention"]
    assert summary["paper"]["slope_counts"] == {"positive": 109, "negative": 19}
    assert summary["paper"]["std_across_tags"]["1"] == 0.055
    db = summarize_excitations(_constructed_set(), loudness="db")["loudness"]
    assert db["measure"] == "db" and db["positive"] + db["negative"] == 6
    assert (loud["floor_db"], db["floor_db"]) == (None, DEFAULT_FLOOR_DB)


def test_summary_loudness_section_is_the_one_fit():
    excitations = _constructed_set()
    loud = excitations.loudness("db", floor_db=-70.0)
    fits = loudness_summary(excitations.segment_level(1), loud, measure="db", floor_db=-70.0)
    assert summarize_excitations(excitations, loudness="db", floor_db=-70.0)["loudness"] == fits
    table = loudness_regression(excitations.segment_level(1), loud)
    assert fits["notable"]["least_error"]["rmse"] == table["rmse"].min()
    assert (fits["level"], fits["floor_db"], fits["channels"]) == (1, -70.0, 6)
    with pytest.raises(ValueError, match="unknown loudness measure 'lufs'"):
        loudness_summary(excitations.segment_level(1), loud, measure="lufs")


# --- command line -------------------------------------------------------------------------


def test_cli_end_to_end(store, tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "best.pt", model=_tiny("se-multi"), tags=TAGS)
    out = tmp_path / "analysis"
    args = ["excitations", str(run), "--data", str(store.path), "--out", str(out)]
    code = main([*args, "--batch-size", "5", "--loudness", "db", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "se-multi on test: 4 clips, 9 segments, 3 tags" in printed
    assert "channels rise" in printed and "paper: 109 positive / 19 negative" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [r["level"] for r in summary["std_across_tags"]] == [1, 2, 3, 4]
    assert summary["loudness"]["measure"] == "db"
    assert summary["loudness"]["positive"] + summary["loudness"]["negative"] == 8
    loaded = load_excitations(out / "excitations.npz")
    assert loaded.num_segments == 9 and loaded.variant == "se-multi"
    names = ["excitations_at_levels", "first_block_excitations", "std_across_tags"]
    for name in [*names, "loudness_scatter"]:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_checkpoint_without_se_blocks(store, tmp_path, capsys):
    save_checkpoint(tmp_path / "basic.pt", model=_tiny("basic-multi"), tags=TAGS)
    args = ["excitations", str(tmp_path / "basic.pt"), "--data", str(store.path)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "variant 'basic-multi' has no squeeze-and-excitation blocks" in err
    assert not (tmp_path / "o").exists()


def test_summary_intervals_and_gate_spread_on_a_constructed_example():
    base = _constructed_set()
    flat = np.full((60, 4), 0.5, dtype=np.float32)  # an untrained level: every gate 0.5
    three = dataclasses.replace(base, levels=(1, 2, 3), clip=(base.clip[0], flat, base.clip[1]))
    summary = summarize_excitations(three, num_resamples=200)
    json.dumps(summary, allow_nan=False)
    rows = {row["level"]: row for row in summary["std_across_tags"]}
    for row in rows.values():
        assert row["low"] <= row["std"] + 1e-12 and row["std"] <= row["high"] + 1e-12
    # level 3's tag means are 0.3 and 0.5 in every resample: std 0.1, an interval of width 0
    assert rows[3]["low"] == pytest.approx(0.1) and rows[3]["high"] == pytest.approx(0.1)
    assert (rows[2]["std"], rows[2]["low"], rows[2]["high"]) == (0.0, 0.0, 0.0)
    shape = summary["shape"]
    assert shape["middle_levels"] == [2]
    assert shape["last_minus_middle"]["estimate"] == pytest.approx(0.1)
    assert shape["first_minus_middle"]["estimate"] == pytest.approx(rows[1]["std"])
    gates = {g["level"]: g for g in summary["gates"]}
    assert gates[2] == {"level": 2, "mean": 0.5, "p05": 0.5, "p95": 0.5, "channel_min": 0.5,
                        "channel_max": 0.5, "mean_abs_from_half": 0.0}  # fmt: skip
    assert gates[3]["mean_abs_from_half"] == pytest.approx(0.1)  # half the clips at 0.3
    assert gates[3]["mean"] == pytest.approx(0.4)
