"""Tagging real-length music: whole songs, spread and first segments, taggrams, embeddings.

The checkpoint is written by the real path: a table dataset of generated wav files, prepared
into a store (29 s decoded per clip, as for MagnaTagATune) and trained with the tiny profile.
At 4 kHz a 243-sample segment (the input of a 4-block model) lasts 61 ms, so a "4-minute
song" is 3,950 segments: the test protocol's first segments cover its first 0.24 s only.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from resemul_core.interfaces.cli import main
from resemul_core.interfaces.pipeline import fit, prepare
from resemul_core.interfaces.tag_files import find_audio, tag_files, tag_table
from resemul_core.interfaces.tagger import Tagger, segment_starts

RATE = 4_000
LENGTH = 3**5
PER_CLIP = 4
TAGS = ["high", "low", "noise"]  # the table's tags, sorted


def tone(seconds: float, freq: float | None, *, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    x = noise * rng.standard_normal(t.size)
    if freq:
        x += 0.4 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.3))
    return np.clip(x, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory trained on a table store: 'low' = 300 Hz, 'high' = 1.3 kHz, 'noise'."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        low, high, noisy = rng.integers(0, 2, 3)
        x = tone(30.0, None, noise=0.3 if noisy else 0.01, seed=i)
        if low:
            x += tone(30.0, 300, seed=100 + i)
        if high:
            x += tone(30.0, 1300, seed=200 + i)
        sf.write(root / f"clip{i:02d}.wav", np.clip(x, -1, 1), RATE)
        tags = ";".join(t for t, on in (("low", low), ("high", high), ("noise", noisy)) if on)
        rows.append({"path": f"clip{i:02d}.wav", "tags": tags})
    pd.DataFrame(rows).to_csv(root / "table.csv", index=False)
    store = prepare(
        "table",
        root / "table.csv",
        root / "store",
        workers=1,
        progress=False,
        audio={"sample_rate": RATE, "segment_length": LENGTH, "segments_per_clip": PER_CLIP},
    )
    assert store.tags == TAGS
    run = root / "run"
    overrides = {"device": "cpu", "learning_rate": 0.05, "max_steps_per_epoch": 30}
    fit(store, run, variant="se-multi", profile="tiny", overrides=overrides, progress=False)
    return run


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """A 4-minute song: the first 29 s a 300 Hz tone ('low'), then noise with a 1.3 kHz tone."""
    first = tone(29.0, 300, noise=0.01, seed=1)
    rest = tone(211.0, 1300, noise=0.3, seed=2)
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, np.concatenate([first, rest]), RATE)
    return path


def resemul(*args) -> int:
    """``resemul ARGS...`` in this process; paths may be given as they are."""
    return main([str(a) for a in args])


def test_segment_starts_for_each_mode():
    assert segment_starts(1000, 243, "whole").tolist() == [0, 243, 486, 729]
    assert segment_starts(1000, 243, "first", 2).tolist() == [0, 243]
    assert segment_starts(1000, 243, "first").tolist() == [0, 243, 486, 729]
    assert segment_starts(1000, 243, "spread", 3).tolist() == [0, 378, 757]  # 0 .. 1000 - 243
    assert segment_starts(1000, 243, "spread", 1).tolist() == [378]
    assert segment_starts(1000, 243, "spread", 9).tolist() == [0, 243, 486, 729]  # all of them
    assert segment_starts(100, 243, "whole").tolist() == [0]  # shorter: one, zero-padded
    with pytest.raises(ValueError, match="unknown segments mode"):
        segment_starts(1000, 243, "every")
    with pytest.raises(ValueError, match="num_segments"):
        segment_starts(1000, 243, "spread", 0)


def test_a_four_minute_song_is_tagged_whole_not_from_its_first_29_s(trained, song, capsys):
    tagger = Tagger.from_checkpoint(trained, device="cpu", precision="fp32")
    assert (tagger.sample_rate, tagger.num_segments, tagger.duration) == (RATE, PER_CLIP, 29.0)
    whole = tagger.analyse(song)
    first = tagger.analyse(song, segments="first")
    assert len(whole.starts) == 240 * RATE // LENGTH == 3950
    assert whole.duration == pytest.approx(240.0)
    assert len(first.starts) == PER_CLIP
    np.testing.assert_allclose(whole.starts[:3], [0, LENGTH / RATE, 2 * LENGTH / RATE])
    # the trained model hears the change: 'low' in the first 29 s, 'high' and 'noise' after
    assert first.top(1)[0][0] == "low"
    low, noise = TAGS.index("low"), TAGS.index("noise")
    assert whole.clip_probabilities[low] < first.clip_probabilities[low] - 0.2
    assert whole.clip_probabilities[noise] > first.clip_probabilities[noise] + 0.2
    assert np.abs(whole.clip_probabilities - first.clip_probabilities).max() > 0.2
    # the command line: whole songs by default, the paper's protocol on request
    outputs = {}
    for extra in ([], ["--all-segments"], ["--segments", "first"]):
        assert (
            resemul(
                "tag",
                song,
                "--checkpoint",
                trained,
                "--json",
                "--precision",
                "fp32",
                "--no-progress",
                *extra,
            )
            == 0
        )
        (item,) = __import__("json").loads(capsys.readouterr().out)
        outputs[tuple(extra)] = item
    assert outputs[()]["segments"] == outputs[("--all-segments",)]["segments"] == 3950
    assert outputs[("--segments", "first")]["segments"] == PER_CLIP
    cli = {t["tag"]: t["probability"] for t in outputs[()]["tags"]}
    assert cli == pytest.approx(dict(zip(TAGS, whole.clip_probabilities.tolist(), strict=True)))


def test_spread_segments_cover_the_file_evenly(trained, song):
    tagger = Tagger.from_checkpoint(trained, device="cpu", precision="fp32")
    spread = tagger.analyse(song, segments="spread", num_segments=5)
    expected = segment_starts(240 * RATE, LENGTH, "spread", 5) / RATE
    np.testing.assert_allclose(spread.starts, expected)
    assert spread.starts[0] == 0 and spread.starts[-1] == pytest.approx(240 - LENGTH / RATE)
    # the same segments as cutting the decoded waveform at those starts
    waveform, _ = sf.read(song, dtype="float32")
    direct = tagger.analyse(waveform, segments="spread", num_segments=5)
    np.testing.assert_array_equal(spread.probabilities, direct.probabilities)


def test_taggram_and_embeddings_are_the_models_outputs_per_segment(trained):
    tagger = Tagger.from_checkpoint(trained, device="cpu", precision="fp32")
    waveform = tone(2.0, 300, noise=0.05, seed=7)
    result = tagger.analyse(waveform, embeddings=True)
    segments = torch.from_numpy(waveform[: 32 * LENGTH].reshape(32, LENGTH))
    with torch.no_grad():
        logits, pooled = tagger.model.forward_pooled(segments)
    taggram = tagger.taggram(waveform)
    assert list(taggram.columns) == TAGS and taggram.index.name == "time"
    np.testing.assert_allclose(taggram.index, np.arange(32) * LENGTH / RATE)
    np.testing.assert_allclose(taggram.to_numpy(), torch.sigmoid(logits).numpy(), atol=1e-6)
    np.testing.assert_allclose(tagger.predict(waveform), taggram.mean().to_numpy(), atol=1e-6)
    # the embedding: the last three blocks' pooled outputs, concatenated (= forward_features)
    channels = tagger.model.config.block_channels()
    assert tagger.embedding_blocks == [2, 3, 4]
    assert result.embeddings.shape == (32, sum(channels[1:]))
    np.testing.assert_allclose(result.embeddings, torch.cat(pooled[1:], 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        result.embeddings, tagger.model.forward_features(segments).detach().numpy(), atol=1e-6
    )
    per_file = tagger.embed(waveform, per="file")
    np.testing.assert_allclose(per_file, result.embeddings.mean(axis=0), rtol=1e-6)
    first_block = Tagger.from_checkpoint(trained, device="cpu", embedding_blocks=[1])
    assert first_block.embed(waveform).shape == (32, channels[0])


def test_a_file_shorter_than_a_segment_is_padded_and_said_so(trained, tmp_path, caplog):
    path = tmp_path / "blip.wav"
    sf.write(path, tone(0.03, 300), RATE)  # 120 samples < 243
    tagger = Tagger.from_checkpoint(trained, device="cpu")
    with caplog.at_level(logging.WARNING, logger="resemul_core.interfaces.tagger"):
        result = tagger.analyse(path)
    assert len(result.starts) == 1 and "zero-padded to one segment" in result.note
    assert "blip.wav: 0.03 s of audio is shorter than one segment (0.06 s)" in caplog.text
    # the command line says so on stderr (its own process: logging as a user sees it)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "resemul_core.interfaces.cli",
            "tag",
            str(path),
            "--checkpoint",
            str(trained),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "blip.wav: 0.03 s of audio is shorter than one segment" in done.stderr
    assert "zero-padded" not in done.stdout and "blip.wav  (1 segments)" in done.stdout


def test_fast_precision_stays_within_its_tolerance_of_fp32(trained, song):
    fast = Tagger.from_checkpoint(trained, device="cpu")
    exact = Tagger.from_checkpoint(trained, device="cpu", precision="fp32")
    assert fast.precision == "fast"
    a, b = (
        fast.analyse(song, segments="spread", num_segments=50),
        exact.analyse(song, segments="spread", num_segments=50),
    )
    assert np.abs(a.clip_probabilities - b.clip_probabilities).max() < 0.02
    assert np.abs(a.probabilities - b.probabilities).max() < 0.05


def test_streaming_keeps_memory_bounded_for_long_files(trained, tmp_path):
    import tracemalloc

    path = tmp_path / "long.wav"
    minutes = 20
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1) as out:
        for k in range(minutes):
            out.write(tone(60.0, 300 if k % 2 else 1300, noise=0.05, seed=k))
    tagger = Tagger.from_checkpoint(trained, device="cpu", batch_size=64)
    decoded_bytes = minutes * 60 * RATE * 4  # the whole file as float32: 19 MB
    tracemalloc.start()
    try:
        result = tagger.analyse(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.starts) == minutes * 60 * RATE // LENGTH
    assert peak < decoded_bytes / 3, f"peak {peak / 1e6:.1f} MB for {decoded_bytes / 1e6:.1f} MB"


def test_folders_are_tagged_in_order_and_bad_files_are_skipped(trained, song, tmp_path, capsys):
    folder = tmp_path / "music"
    (folder / "b" / "deeper").mkdir(parents=True)
    sf.write(folder / "a.wav", tone(3.0, 300, seed=3), RATE)
    sf.write(folder / "b" / "deeper" / "c.FLAC", tone(2.0, 1300, noise=0.3, seed=4), 8_000)
    (folder / "b" / "broken.mp3").write_bytes(b"not audio at all, just text\n")
    (folder / "notes.txt").write_text("ignored: not an audio extension")
    paths = find_audio([folder, song])
    assert [p.name for p in paths] == ["a.wav", "broken.mp3", "c.FLAC", "song.wav"]
    tagger = Tagger.from_checkpoint(trained, device="cpu")
    outcomes = list(tag_files(tagger, paths, workers=2, progress=False))
    assert [o.path for o in outcomes] == paths
    assert outcomes[1].result is None and "broken.mp3 is not a recognisable audio file" in (
        outcomes[1].error
    )
    for outcome in (outcomes[0], outcomes[2], outcomes[3]):  # the same as one at a time
        alone = tagger.analyse(outcome.path)
        np.testing.assert_array_equal(outcome.result.probabilities, alone.probabilities)
    table = tag_table(outcomes)
    assert table["status"].tolist() == ["ok", "skipped", "ok", "ok"]
    # the command line: one row per file, the bad one reported and listed, exit status 1
    out = tmp_path / "tags.csv"
    code = resemul("tag", folder, song, "--checkpoint", trained, "--csv", out, "--no-progress")
    captured = capsys.readouterr()
    assert code == 1
    assert "skipped: " in captured.err and "broken.mp3" in captured.err
    assert "3 files tagged, 1 skipped" in captured.out
    written = pd.read_csv(out)
    assert written["file"].map(lambda f: f.rsplit("/", 1)[-1]).tolist() == [p.name for p in paths]
    assert (
        written.loc[1, "status"] == "skipped" and "not a recognisable" in written.loc[1, "reason"]
    )
    assert written.loc[3, "segments"] == 3950 and set(TAGS) <= set(written.columns)
    np.testing.assert_allclose(
        written.loc[0, TAGS].to_numpy(float), outcomes[0].result.clip_probabilities, atol=1e-6
    )
    # nothing decodable at all: exit status 2
    broken = folder / "b" / "broken.mp3"
    assert resemul("tag", broken, "--checkpoint", trained, "--no-progress") == 2


def test_cli_taggram_figure_and_table(trained, song, tmp_path, capsys):
    png, csv = tmp_path / "taggram.png", tmp_path / "taggram.csv"
    for out in (png, csv):
        assert (
            resemul(
                "tag",
                song,
                "--checkpoint",
                trained,
                "--segments",
                "spread",
                "--num-segments",
                "40",
                "--taggram",
                out,
                "--no-progress",
            )
            == 0
        )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    taggram = pd.read_csv(csv, index_col="time")
    assert taggram.shape == (40, 3) and list(taggram.columns) == TAGS
    # later segments hear 'high' more than the first 29 s do
    assert taggram["high"].iloc[-10:].mean() > taggram["high"].iloc[:4].mean()
    capsys.readouterr()
    assert (
        resemul("tag", song, song, "--checkpoint", trained, "--taggram", png, "--no-progress") == 2
    )
    assert "--taggram takes one audio file, but 2 were given" in capsys.readouterr().err


def test_cli_embed_writes_npy_and_parquet(trained, song, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, tone(1.5, 1300, seed=5), RATE)
    npy = tmp_path / "emb.npy"
    assert resemul("embed", clip, song, "--checkpoint", trained, "--out", npy, "--no-progress") == 0
    assert "2 embeddings (file)" in capsys.readouterr().out
    tagger = Tagger.from_checkpoint(trained, device="cpu")
    matrix = np.load(npy)
    index = pd.read_csv(tmp_path / "emb.index.csv")
    assert matrix.shape == (2, tagger.embed(clip).shape[1]) and matrix.dtype == np.float32
    assert index["file"].tolist() == [str(clip), str(song)]
    np.testing.assert_allclose(matrix[0], tagger.embed(clip, per="file"), rtol=1e-6)
    parquet = tmp_path / "emb.parquet"
    assert (
        resemul(
            "embed",
            clip,
            "--checkpoint",
            trained,
            "--out",
            parquet,
            "--per",
            "segment",
            "--blocks",
            "all",
            "--no-progress",
        )
        == 0
    )
    frame = pd.read_parquet(parquet)
    channels = sum(tagger.model.config.block_channels())
    assert frame.shape == (1.5 * RATE // LENGTH, 3 + channels)
    assert frame["time"].tolist() == pytest.approx(np.arange(24) * LENGTH / RATE)
    capsys.readouterr()
    assert resemul("embed", clip, "--checkpoint", trained, "--out", npy, "--blocks", "0,9") == 2
    assert "--blocks 0,9: expected block numbers between 1 and 4" in capsys.readouterr().err


def test_the_authors_keras_file_tags_directly_converted_once(tmp_path, monkeypatch, capsys):
    """``--checkpoint file.hdf5 --variant se-multi``: converted on first use, then cached; the
    outputs are named with MTAT's top-50 tags in the official order."""
    from test_keras_import import build_official, write_keras

    from resemul_core.data.tags import MTAT_TOP50_TAGS
    from resemul_core.model.keras_import import import_keras

    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "cache"))
    keras_file = tmp_path / "se-multi-auc_0.9111-tfrmodel.hdf5"  # paper size, random weights
    graph = build_official("se-multi", np.random.default_rng(0), width=1, num_blocks=9, alpha=16)
    write_keras(keras_file, graph)
    clip = tmp_path / "clip.wav"
    sf.write(clip, 0.3 * np.random.default_rng(1).standard_normal(3 * 22_050), 22_050)
    argv = [
        "tag",
        str(clip),
        "--checkpoint",
        str(keras_file),
        "--variant",
        "se-multi",
        "--json",
        "--top-k",
        "0",
        "--precision",
        "fp32",
        "--no-progress",
    ]
    assert resemul(*argv) == 0
    (first,) = __import__("json").loads(capsys.readouterr().out)
    cached = list((tmp_path / "cache" / "keras").glob("*-se-multi.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert resemul(*argv) == 0
    (second,) = __import__("json").loads(capsys.readouterr().out)
    assert cached[0].stat().st_mtime_ns == stamp and second == first
    assert sorted(t["tag"] for t in first["tags"]) == sorted(MTAT_TOP50_TAGS)
    model = import_keras(keras_file, variant="se-multi")
    waveform, _ = sf.read(clip, dtype="float32")
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(waveform[None, :59_049])))[0].numpy()
    got = {t["tag"]: t["probability"] for t in first["tags"]}
    np.testing.assert_allclose([got[t] for t in MTAT_TOP50_TAGS], expected, atol=1e-6)
    assert resemul("tag", clip, "--checkpoint", keras_file, "--no-progress") == 2
    assert "is a Keras file: give the variant it holds" in capsys.readouterr().err
