"""Segment store: format, quantisation, prepare with skips, SIGKILL + resume byte-identity."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from resemul_core.analysis.excitation_stats import segment_loudness
from resemul_core.data.audio import LOUDNESS_FLOOR_DB, dbfs, load_audio, rms, segment_waveform
from resemul_core.data.prepare import prepare_store, store_summary
from resemul_core.data.sources import read_table
from resemul_core.data.store import (
    clip_levels_db,
    dequantize,
    open_store,
    quantize,
    write_store_from_arrays,
)

RATE, LENGTH, PER_CLIP, DURATION = 8000, 243, 4, 0.15  # 1200 samples → 4 full segments
STORE_FILES = ("segments.npy", "labels.npy", "clips.csv", "manifest.json")


def test_quantize_values_and_round_trip_bound():
    x = np.array([-1.0, -0.5, 0.0, 2**-16 * 0.99, 0.5, 1 - 2**-15, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x), [-32768, -16384, 0, 0, 16384, 32767, 32767])
    samples = np.random.default_rng(0).uniform(-1, 1 - 2**-16, 100_000).astype(np.float32)
    error = np.abs(dequantize(quantize(samples)) - samples).max()
    assert error <= 2**-16 and error > 2**-17  # the bound is tight, not vacuous


def arrays_store(path: Path, *, labels=None, bump: float = 0.0):
    rng = np.random.default_rng(1)
    waveforms = [rng.uniform(-1, 1, (n, 5)).astype(np.float32) for n in (3, 1, 2, 3)]
    waveforms[2][0, 0] += bump
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]]) if labels is None else labels
    store = write_store_from_arrays(
        path,
        waveforms=waveforms,
        labels=labels,
        splits=["train", "test", "train", "valid"],
        tags=["rock", "jazz"],
        clip_ids=["a", "b", "c", "d"],
        sample_rate=8000,
    )
    return store, waveforms


def test_store_from_arrays_round_trips_within_quantisation(tmp_path):
    store, waveforms = arrays_store(tmp_path / "s")
    store = open_store(tmp_path / "s")
    assert store.segments.shape == (4, 3, 5) and store.segments.dtype == np.int16
    assert (store.tags, store.sample_rate, store.segment_length) == (["rock", "jazz"], 8000, 5)
    assert store.clips["clip_id"].tolist() == ["a", "b", "c", "d"]
    assert store.clips["num_segments"].tolist() == [3, 1, 2, 3]
    np.testing.assert_array_equal(store.split_indices("train"), [0, 2])
    np.testing.assert_array_equal(store.split_indices("valid"), [3])
    np.testing.assert_array_equal(store.labels, [[1, 0], [0, 1], [1, 1], [0, 0]])
    assert store.labels.dtype == np.uint8
    for i, w in enumerate(waveforms):
        clip = store.read_clip(i)
        assert clip.shape == w.shape and clip.dtype == np.float32
        assert np.abs(clip - w).max() <= 2**-15
    np.testing.assert_array_equal(store.read_segment(2, 1), store.read_clip(2)[1])
    assert not store.segments[1, 1:].any()  # unused slots stay zero
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == {"clips": 2, "segments": 5}
    with pytest.raises(ValueError, match="unknown split 'val'; valid splits: train, valid, test"):
        store.split_indices("val")
    with pytest.raises(IndexError, match="clip 1 has 1 segments"):
        store.read_segment(1, 1)


def test_fingerprint_is_stable_and_covers_labels_and_audio(tmp_path):
    base = arrays_store(tmp_path / "a")[0].fingerprint
    assert arrays_store(tmp_path / "b")[0].fingerprint == base
    other_labels = np.array([[1, 0], [0, 1], [1, 1], [1, 0]])
    assert arrays_store(tmp_path / "c", labels=other_labels)[0].fingerprint != base
    assert arrays_store(tmp_path / "d", bump=0.01)[0].fingerprint != base


def test_clip_levels_are_the_one_loudness_of_the_excitation_analysis(tmp_path):
    """One definition of dBFS: the store's clip levels and the analysis' segment loudness agree
    exactly on the same samples, floor included (a second definition would drift)."""
    rng = np.random.default_rng(4)
    waveforms = [
        rng.uniform(-0.5, 0.5, (1, 64)),  # loud
        np.zeros((1, 64)),  # digital silence
        np.full((1, 64), 2**-15),  # one LSB: -90 dBFS, below the floor
        rng.uniform(-0.01, 0.01, (3, 64)),  # several segments: one level over all of them
    ]
    store = write_store_from_arrays(
        tmp_path / "s",
        waveforms=[w.astype(np.float32) for w in waveforms],
        labels=np.zeros((4, 2), dtype=np.uint8),
        splits=["train"] * 4,
        tags=["loud", "quiet"],
    )
    levels = clip_levels_db(store)
    assert list(levels.columns) == ["clip_id", "split", "rms_db", "loud", "quiet"]
    for i in range(3):
        (segment,) = segment_loudness(store.read_clip(i), measure="db")
        assert levels["rms_db"].iat[i] == segment
    assert list(levels["rms_db"].iloc[1:3]) == [LOUDNESS_FLOOR_DB] * 2
    assert levels["rms_db"].iat[3] == dbfs(rms(store.read_clip(3), axis=None))
    assert clip_levels_db(store, floor_db=-120.0)["rms_db"].iat[2] == pytest.approx(
        -90.31, abs=0.01
    )


def test_open_store_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_store(tmp_path / "nowhere")
    arrays_store(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[:40])
    with pytest.raises(ValueError, match=r"manifest\.json: malformed manifest"):
        open_store(tmp_path / "s")
    manifest.unlink()
    with pytest.raises(ValueError, match=r"/s: not a complete segment store \(no manifest"):
        open_store(tmp_path / "s")
    with pytest.raises(ValueError, match="labels: expected shape"):
        write_store_from_arrays(
            tmp_path / "t", waveforms=[np.zeros((1, 3))], labels=[[1]], splits=["train"], tags=[]
        )


# --- prepare: a small table dataset with every kind of bad input ---------------------------


def noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, round(seconds * RATE)).astype(np.float32)


def make_dataset(root: Path) -> Path:
    """12 clips: 8 good ones in four formats and one of each bad kind, bad ones early."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(name: str, tags: str, split: str) -> None:
        rows.append({"path": f"audio/{name}", "tags": tags, "split": split})

    (root / "audio").mkdir()
    good = ["g0.wav", "g1.flac", "g2.ogg", "g3.mp3", "g4.wav", "g5.mp3", "g6.flac", "g7.wav"]
    for k, name in enumerate(good):
        sf.write(root / "audio" / name, noise(0.3, k), RATE)
    (root / "audio" / "text.mp3").write_text("<html>not found</html>\n" * 40)
    (root / "audio" / "empty.wav").write_bytes(b"")
    sf.write(root / "audio" / "short.wav", noise(0.1, 20), RATE)
    sf.write(root / "audio" / "cut.mp3", noise(2.0, 21), RATE)
    data = (root / "audio" / "cut.mp3").read_bytes()
    (root / "audio" / "cut.mp3").write_bytes(data[: len(data) // 4])  # ~0.22 s survive
    add("g0.wav", "rock", "train")
    add("text.mp3", "rock", "train")
    add("g1.flac", "jazz;rock", "train")
    add("empty.wav", "jazz", "valid")
    add("g2.ogg", "jazz", "valid")
    add("short.wav", "pop", "test")
    add("cut.mp3", "pop", "test")
    add("g3.mp3", "pop", "train")
    add("g4.wav", "", "train")
    add("g5.mp3", "rock", "train")
    add("g6.flac", "jazz", "valid")
    add("g7.wav", "pop", "test")
    pd.DataFrame(rows).to_csv(root / "clips.csv", index=False)
    return root / "clips.csv"


def prepare(table: Path, out: Path, **kwargs):
    source = read_table(table, min_duration=0.25)
    return prepare_store(
        source,
        out,
        sample_rate=RATE,
        segment_length=LENGTH,
        segments_per_clip=PER_CLIP,
        clip_duration=DURATION,
        progress=False,
        **kwargs,
    )


def test_prepare_records_skips_and_fills_holes_with_the_last_clips(tmp_path):
    table = make_dataset(tmp_path / "data")
    store = prepare(table, tmp_path / "store", workers=2)
    skips = {s["path"]: s["reason"] for s in store.manifest["skipped"]}
    assert skips == {
        "audio/text.mp3": "undecodable",
        "audio/empty.wav": "empty",
        "audio/short.wav": "too short",
        "audio/cut.mp3": "too short",
    }
    assert store.manifest["skip_counts"] == {"undecodable": 1, "empty": 1, "too short": 2}
    # planned order g0 text g1 empty g2 short cut g3 g4 g5 g6 g7: the 4 holes at 1, 3, 5, 6
    # take the last 4 kept clips (8..11 = g4 g5 g6 g7) in order
    assert store.clips["path"].str[6:8].tolist() == ["g0", "g4", "g1", "g5", "g2", "g6", "g7", "g3"]
    assert store.segments.shape == (8, PER_CLIP, LENGTH)
    assert store.tags == ["jazz", "pop", "rock"]
    np.testing.assert_array_equal(store.labels[2], [1, 0, 1])  # g1: jazz;rock
    np.testing.assert_array_equal(store.labels[1], [0, 0, 0])  # g4: no tag
    for i, path in enumerate(store.clips["path"]):
        expected = segment_waveform(
            load_audio(table.parent / path, sample_rate=RATE, duration=DURATION),
            segment_length=LENGTH,
            max_segments=PER_CLIP,
        )
        assert expected.shape == (4, LENGTH)
        np.testing.assert_array_equal(store.segments[i], quantize(expected))
    summary = store_summary(store)
    assert summary["splits"][0] == {"split": "train", "clips": 5, "segments": 20}
    assert summary["skips"]["too short"] == 2
    assert not (tmp_path / "store" / ".prepare").exists()


def test_rerun_reuses_a_complete_store_and_refuses_different_parameters(tmp_path):
    table = make_dataset(tmp_path / "data")
    first = prepare(table, tmp_path / "store", workers=1)
    again = prepare(table, tmp_path / "store", workers=1)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(ValueError, match="already holds a store prepared from other data"):
        prepare_store(read_table(table), tmp_path / "store", segment_length=81, progress=False)
    rebuilt = prepare_store(
        read_table(table), tmp_path / "store", segment_length=81, progress=False, overwrite=True
    )
    assert rebuilt.segment_length == 81 and rebuilt.fingerprint != first.fingerprint


CHILD = """
import os, signal, sys
from resemul_core.data import prepare as prep
from resemul_core.data.sources import read_table

mode = sys.argv[3]
if mode == "after-slots":  # die with clip 5's slot written but not journaled
    original, calls = prep._process_task, []

    def dying(task):
        result = original(task)
        calls.append(task)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    prep._process_task = dying
elif mode == "in-finish":  # die after compaction, before the manifest
    prep.finish_store = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
prep.prepare_store(
    read_table(sys.argv[1], min_duration=0.25), sys.argv[2], sample_rate={RATE},
    segment_length={LENGTH}, segments_per_clip={PER_CLIP}, clip_duration={DURATION},
    workers=1, progress=False,
)
"""


def run_child(table: Path, out: Path, mode: str) -> int:
    code = textwrap.dedent(CHILD).format(
        RATE=RATE, LENGTH=LENGTH, PER_CLIP=PER_CLIP, DURATION=DURATION
    )
    done = subprocess.run([sys.executable, "-c", code, str(table), str(out), mode], timeout=120)
    return done.returncode


def test_resume_after_sigkill_gives_a_byte_identical_store(tmp_path):
    table = make_dataset(tmp_path / "data")
    prepare(table, tmp_path / "reference", workers=1)

    out = tmp_path / "store"
    assert run_child(table, out, "after-slots") == -signal.SIGKILL
    journal = out / ".prepare" / "journal.jsonl"
    assert len(journal.read_bytes().splitlines()) == 4
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="not a complete segment store"):
        open_store(out)
    with journal.open("ab") as handle:  # as if killed in the middle of an append
        handle.write(b'{"i": 7, "status": "o')

    assert run_child(table, out, "in-finish") == -signal.SIGKILL
    assert (out / ".prepare" / "compacted").exists()
    assert not (out / "manifest.json").exists()

    store = prepare(table, out, workers=2)
    assert store.num_clips == 8
    for name in STORE_FILES:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_resume_refuses_another_plan_and_a_corrupt_journal(tmp_path):
    table = make_dataset(tmp_path / "data")
    out = tmp_path / "store"
    assert run_child(table, out, "after-slots") == -signal.SIGKILL
    with pytest.raises(ValueError, match="unfinished prepare of other data"):
        prepare_store(read_table(table), out, sample_rate=RATE, progress=False)
    journal = out / ".prepare" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
    with pytest.raises(ValueError, match=r"journal\.jsonl: line 2 is corrupt"):
        prepare(table, out, workers=1)


def test_prepare_keeps_a_bounded_window_of_clips_in_flight(tmp_path, monkeypatch):
    from resemul_core.data import prepare as prep

    table = make_dataset(tmp_path / "data")
    prepare(table, tmp_path / "reference", workers=1)
    submitted, finished, outstanding = [], [], []

    class Counting(prep.ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            submitted.append(future)
            outstanding.append(len(submitted) - len(finished))
            future.add_done_callback(finished.append)
            return future

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Counting)
    monkeypatch.setattr(prep, "IN_FLIGHT_PER_WORKER", 1)
    prepare(table, tmp_path / "store", workers=2)
    assert len(submitted) == 12 and max(outstanding) <= 2  # 2 workers x 1, not all 12 at once
    for name in STORE_FILES:
        assert (tmp_path / "store" / name).read_bytes() == (
            tmp_path / "reference" / name
        ).read_bytes(), name


class LazyClips:
    """Clips made on demand, as a caller with more clips than memory would pass them."""

    def __init__(self, count: int) -> None:
        self.count, self.made = count, 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(i)
        self.made += 1
        return noise(0.1, i)[: 2 * LENGTH].reshape(2, LENGTH)


def test_write_store_from_arrays_reads_clips_one_by_one(tmp_path):
    lazy = LazyClips(5)
    kwargs = {"labels": np.eye(5, 2, dtype=np.uint8), "splits": ["train"] * 5, "tags": ["a", "b"]}
    store = write_store_from_arrays(tmp_path / "lazy", waveforms=lazy, **kwargs)
    listed = write_store_from_arrays(tmp_path / "list", waveforms=list(LazyClips(5)), **kwargs)
    assert lazy.made == 10  # twice per clip (shapes, then samples), never all at once
    assert store.fingerprint == listed.fingerprint
    for name in STORE_FILES:
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "list" / name).read_bytes()
    assert not list((tmp_path / "lazy").glob(".*tmp"))
