"""The synthetic MTAT-format dataset: layout, audio format, determinism, tag model, no leakage."""

import csv
import dataclasses
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from resemul_core.data import sources, synth, synth_release
from resemul_core.data.audio import dbfs, rms
from resemul_core.data.prepare import prepare_store
from resemul_core.data.sources import MTAT_KNOWN_BROKEN, read_mtat
from resemul_core.data.splits import mtat_split
from resemul_core.data.synth import (
    DEFAULT_NUM_CLIPS,
    PARAMS_FILE,
    SYNTH_TAGS,
    ensure_dataset,
    generate_dataset,
)
from resemul_core.data.synth_audio import render_clip
from resemul_core.data.synth_release import ensure_release, generate_release, shift_mp3_gain
from resemul_core.data.tags import MTAT_TOP50_TAGS
from resemul_core.interfaces import cli

NAME = re.compile(r"^[0-9a-f]/synthetic_artist_\d{3}-synthetic_album-\d{2}-track-0-29\.mp3$")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    """50 clips of 3 s: two per train folder and in the valid folder, eight per test folder."""
    root = tmp_path_factory.mktemp("synth")
    summary = generate_dataset(root, num_clips=50, seed=3, duration=3.0, workers=1, progress=False)
    return root, summary


def test_vocabulary_uses_mtat_spellings():
    assert len(SYNTH_TAGS) >= 12 and len(set(SYNTH_TAGS)) == len(SYNTH_TAGS)
    assert set(SYNTH_TAGS) - set(MTAT_TOP50_TAGS) == {"bass"}  # an MTAT tag outside the top 50


def test_csv_is_mtat_format(small):
    root, summary = small
    lines = (root / "annotations_final.csv").read_text().splitlines()
    assert lines[0].startswith('"clip_id"\t"piano"\t') and lines[0].endswith('\t"mp3_path"')
    rows = list(csv.reader(lines, delimiter="\t"))
    assert rows[0] == ["clip_id", *SYNTH_TAGS, "mp3_path"]
    assert len(rows) == 51 and all(len(r) == len(rows[0]) for r in rows)
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(50)]
    assert all(v in ("0", "1") for r in rows[1:] for v in r[1:-1])
    assert all(NAME.match(r[-1]) for r in rows[1:])
    # pandas reads the quoted values back as integers, as an MTAT reader would
    table = pd.read_csv(root / "annotations_final.csv", sep="\t")
    assert list(table.columns) == rows[0] and table[list(SYNTH_TAGS)].isin([0, 1]).all().all()
    assert table[list(SYNTH_TAGS)].sum().to_dict() == summary["tags"]
    assert (table[list(SYNTH_TAGS)].sum(axis=1) >= 1).all()  # no tagless clip to be dropped
    assert table["vocal"].add(table["no vocals"]).eq(1).all()


def test_files_sit_in_their_folders_and_fill_every_split(small):
    root, summary = small
    table = pd.read_csv(root / "annotations_final.csv", sep="\t")
    assert all((root / "mp3" / p).is_file() for p in table["mp3_path"])
    assert sorted(p.relative_to(root / "mp3").as_posix() for p in root.rglob("*.mp3")) == sorted(
        table["mp3_path"]
    )
    folders = Counter(p[0] for p in table["mp3_path"])
    assert folders == {**dict.fromkeys("0123456789abc", 2), **dict.fromkeys("def", 8)}
    assert summary["splits"] == {"train": 24, "valid": 2, "test": 24}
    assert summary["clips"] == 50 and summary["peak"] < 1.0


def test_default_size_gives_every_tag_positives_and_negatives_in_every_split():
    clips = synth._plan(DEFAULT_NUM_CLIPS, 0)
    folders = Counter(c.mp3_path[0] for c in clips)
    assert folders == {**dict.fromkeys("0123456789abc", 32), **dict.fromkeys("def", 128)}
    splits = Counter(mtat_split(c.mp3_path) for c in clips)
    assert splits == {"train": 384, "valid": 32, "test": 384}
    for split in ("train", "valid", "test"):
        members = [c for c in clips if mtat_split(c.mp3_path) == split]
        counts = Counter(tag for c in members for tag in c.spec.tags)
        assert all(0 < counts[tag] < len(members) for tag in SYNTH_TAGS), (split, counts)


def test_full_length_clip_format(tmp_path):
    summary = generate_dataset(tmp_path, num_clips=3, workers=1, progress=False)
    mp3s = sorted(tmp_path.rglob("*.mp3"))
    assert len(mp3s) == 3 and summary["clips"] == 3
    for path in mp3s:
        info = sf.info(path)
        assert (info.format, info.samplerate, info.channels) == ("MP3", 16000, 1)
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 16000 and audio.ndim == 1
        assert audio.size == 465_600  # 29.1 s, the same for every clip
        assert np.abs(audio).max() < 1.0  # no clipping after encoding


def test_same_seed_same_bytes_whatever_the_workers_and_other_seed_differs(tmp_path):
    kwargs = {"num_clips": 6, "duration": 2.0, "progress": False}
    generate_dataset(tmp_path / "a", seed=7, workers=1, **kwargs)
    generate_dataset(tmp_path / "b", seed=7, workers=2, **kwargs)
    generate_dataset(tmp_path / "c", seed=8, workers=1, **kwargs)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    for files in (a, b, c):
        files.pop(PARAMS_FILE)  # records the wall time taken, so it differs between runs
    assert len(a) == 7 and a == b  # CSV + 6 mp3s, byte for byte
    assert a["annotations_final.csv"] != c["annotations_final.csv"]
    assert not set(a.values()) & set(c.values())


def test_ensure_dataset_reuses_a_complete_dataset_with_the_same_parameters(tmp_path):
    kwargs = {"num_clips": 4, "duration": 1.0, "workers": 1, "progress": False}
    first = ensure_dataset(tmp_path, seed=1, **kwargs)
    stamp = (tmp_path / "annotations_final.csv").stat().st_mtime_ns
    again = ensure_dataset(tmp_path, seed=1, **kwargs)
    assert (first["reused"], again["reused"]) == (False, True)
    assert again["tags"] == first["tags"]
    assert (tmp_path / "annotations_final.csv").stat().st_mtime_ns == stamp
    other = ensure_dataset(tmp_path, seed=2, **kwargs)  # different parameters: regenerated
    assert other["reused"] is False
    (tmp_path / "annotations_final.csv").unlink()  # incomplete folder: regenerated
    assert ensure_dataset(tmp_path, seed=2, **kwargs)["reused"] is False


def test_regenerating_removes_clips_of_a_larger_earlier_run(tmp_path):
    generate_dataset(tmp_path, num_clips=20, duration=1.0, workers=1, progress=False)
    generate_dataset(tmp_path, num_clips=16, duration=1.0, workers=1, progress=False)
    table = pd.read_csv(tmp_path / "annotations_final.csv", sep="\t")
    on_disk = sorted(p.relative_to(tmp_path / "mp3").as_posix() for p in tmp_path.rglob("*.mp3"))
    assert len(table) == 16 and on_disk == sorted(table["mp3_path"])


@pytest.mark.parametrize(
    "kwargs", [{"num_clips": 0}, {"duration": 0.0}, {"sample_rate": 100}], ids=str
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, progress=False, **kwargs)


def _documented_frequencies() -> dict[str, float]:
    """The tag frequencies the module docstring promises."""
    text = synth.__doc__.split("default size:", 1)[1].split(". Every clip", 1)[0]
    pairs = re.findall(r"([a-z][a-z ]*?) (\.\d\d)", " ".join(text.split()))
    return {tag.strip(): float(value) for tag, value in pairs}


def test_tag_frequencies_match_the_documentation():
    documented = _documented_frequencies()
    assert set(documented) == set(SYNTH_TAGS)
    rng = np.random.default_rng(12345)
    draws = 20_000
    counts = Counter(tag for _ in range(draws) for tag in synth._sample_spec(rng).tags)
    for tag in SYNTH_TAGS:  # binomial s.d. <= 0.0035 here; the docs round to 0.01
        assert abs(counts[tag] / draws - documented[tag]) < 0.015, tag
    # imbalance: frequent and rare tags, the rarest still ~1 in 7 clips
    assert max(documented.values()) > 0.6 and 0.12 <= min(documented.values()) < 0.16


def test_tags_follow_the_documented_rules():
    rng = np.random.default_rng(5)
    for _ in range(3000):
        spec = synth._sample_spec(rng)
        tags, has = set(spec.tags), spec.instruments.__contains__
        for name in ("piano", "guitar", "strings", "flute", "bass", "synth", "drums"):
            assert (name in tags) == has(name)
        assert ("vocal" in tags) == has("voice") != ("no vocals" in tags)
        assert ("female" in tags) == (has("voice") and spec.female)
        assert ("male" in tags) == (has("voice") and not spec.female)
        assert ("slow" in tags) == (spec.bpm <= 78) and ("fast" in tags) == (spec.bpm >= 148)
        assert ("quiet" in tags) == (spec.level_db <= -35)
        assert ("loud" in tags) == (spec.level_db >= -21)
        assert ("rock" in tags) == (has("guitar") and has("drums") and not has("synth"))
        acoustic = {"piano", "guitar", "strings", "flute"}
        assert ("electronic" in tags) == (has("synth") and not spec.instruments & acoustic)


def test_level_spans_30_db_and_drives_loud_and_quiet(small):
    rng = np.random.default_rng(0)
    specs = [synth._sample_spec(rng) for _ in range(3000)]
    levels = np.array([spec.level_db for spec in specs])
    assert max(levels) - min(levels) >= 30
    assert synth._LEVEL_DB[0] <= levels.min() and levels.max() <= synth._LEVEL_DB[1]
    # loudness follows the style: it correlates with the genres, as in recorded music
    for quiet_tag, loud_tag in (("classical", "techno"), ("ambient", "rock")):
        on = {t: np.array([t in spec.tags for spec in specs]) for t in (quiet_tag, loud_tag)}
        assert levels[on[loud_tag]].mean() - levels[on[quiet_tag]].mean() > 8
    # the decoded audio has the planned level, so loud/quiet are audible
    root, summary = small
    table = pd.read_csv(root / "annotations_final.csv", sep="\t")
    plan = synth._plan(50, 3)
    measured = np.array([dbfs(rms(sf.read(root / "mp3" / p)[0])) for p in table["mp3_path"]])
    planned = np.array([c.spec.level_db for c in plan])
    assert np.abs(measured - planned).max() < 1.0
    assert measured[table["quiet"] == 1].max() < measured[table["loud"] == 1].min() - 10
    assert summary["level_db"][1] - summary["level_db"][0] > 15
    rendered = [dbfs(rms(render_clip(c.spec, c.audio_seed, 16000, 48000))) for c in plan]
    assert summary["level_db"] == (round(min(rendered), 2), round(max(rendered), 2))
    # and the extremes of the level range render 32 dB apart without clipping
    quietest, loudest = (
        dataclasses.replace(plan[0].spec, level_db=level) for level in synth._LEVEL_DB
    )
    low = render_clip(quietest, plan[0].audio_seed, 16000, 32000)
    high = render_clip(loudest, plan[0].audio_seed, 16000, 32000)
    assert dbfs(rms(high)) - dbfs(rms(low)) > 30 and np.abs(high).max() < 0.91


def test_level_changes_within_a_clip_by_the_planned_depth():
    plan = synth._plan(50, 3)
    sr, n, seg = 16000, 16000 * 29, 16000 * 2
    for depth in (0.0, 12.0):
        spec = dataclasses.replace(plan[0].spec, dynamics_db=depth, level_db=-30.0)
        audio = render_clip(spec, plan[0].audio_seed, sr, n)
        levels = [dbfs(rms(audio[i : i + seg])) for i in range(0, n - seg + 1, seg)]
        spread = max(levels) - min(levels)
        assert (spread < 4.0) if depth == 0 else (4.0 < spread < 14.0), (depth, spread)
        assert abs(dbfs(rms(audio)) + 30.0) < 0.5  # the clip keeps its planned level


def test_names_and_folders_do_not_depend_on_tags(monkeypatch):
    real = [c.mp3_path for c in synth._plan(200, 4)]
    # names follow the clip index only: another seed (other tags) gives the same names
    other = [c.mp3_path for c in synth._plan(200, 5)]
    assert [p[2:] for p in real] == [p[2:] for p in other]
    assert len({p[2:] for p in real}) == 200
    # folders do not look at the tags: constant tags leave every path unchanged
    fixed = synth._sample_spec(np.random.default_rng(0))
    monkeypatch.setattr(synth, "_sample_spec", lambda rng: fixed)
    assert [c.mp3_path for c in synth._plan(200, 4)] == real


# --- the fast MTAT-sized release (synth_release) --------------------------------------------

RELEASE_NAME = re.compile(
    r"^[0-9a-f]/synthetic_artist_(\d{3})-synthetic_album_\1-(\d{2})-track_\2-(\d+)-(\d+)\.mp3$"
)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict]:
    """80 clips of 2 s from a bank of 6, with MTAT's zero-byte and short clips."""
    root = tmp_path_factory.mktemp("release")
    summary = generate_release(
        root, num_clips=80, bank_size=6, seed=2, duration=2.0, workers=1, progress=False
    )
    return root, summary


def test_release_has_mtat_layout_and_the_promised_split_counts(release):
    root, summary = release
    table = pd.read_csv(root / "annotations_final.csv", sep="\t")
    assert list(table.columns) == ["clip_id", *SYNTH_TAGS, "mp3_path"]
    assert len(table) == summary["clips"] == 80 and summary["bank"] == 6
    assert table["clip_id"].is_unique and table["clip_id"].is_monotonic_increasing
    on_disk = sorted(p.relative_to(root / "mp3").as_posix() for p in root.rglob("*.mp3"))
    assert on_disk == sorted(table["mp3_path"]) and len(set(on_disk)) == 80
    assert {p[0] for p in table["mp3_path"]} == set("0123456789abcdef")
    synthetic = table["mp3_path"][~table["mp3_path"].isin(MTAT_KNOWN_BROKEN)]
    assert len(synthetic) == 77 and synthetic.str.match(RELEASE_NAME).all()
    assert all((root / "mp3" / p).stat().st_size == 0 for p in MTAT_KNOWN_BROKEN)
    tagless = table[list(SYNTH_TAGS)].sum(axis=1) == 0
    assert tagless.sum() == 80 - sum(summary["expected"]["resemul"]["source"]) > 0
    assert summary["splits"] == {
        s: int(table["mp3_path"].map(mtat_split).eq(s).sum()) for s in ("train", "valid", "test")
    }
    for policy in ("paper", "resemul"):  # the reader and the prepared store agree with it
        source = read_mtat(root, split_policy=policy, min_duration=2.0)
        assert list(source.split_counts()) == summary["expected"][policy]["source"]
        store = prepare_store(
            source,
            root.parent / f"store-{policy}",
            sample_rate=16000,
            segment_length=8000,
            segments_per_clip=2,
            clip_duration=1.0,
            workers=1,
            progress=False,
        )
        counts = [store.manifest["counts"][s]["clips"] for s in ("train", "valid", "test")]
        assert counts == summary["expected"][policy]["store"]


def test_release_clips_are_level_variants_with_matching_tags(release):
    root, _ = release
    rows, _ = synth_release._plan_release(80, 2, 6, 2.0, True)
    table = pd.read_csv(root / "annotations_final.csv", sep="\t")
    assert list(table["mp3_path"]) == [r.mp3_path for r in rows]
    for row in rows:
        if row.empty:
            continue
        info = sf.info(root / "mp3" / row.mp3_path)
        assert (info.format, info.samplerate, info.channels) == ("MP3", 16000, 1)
        assert (info.duration >= 2.0) == (row.duration == 2.0)  # the 3 short ones are short
        audio, _ = sf.read(root / "mp3" / row.mp3_path)
        planned = -13.0 + row.gain_steps * synth_release.GAIN_STEP_DB
        assert abs(dbfs(rms(audio)) - planned) < 1.0  # the limiter and encoder delay: < 1 dB
        if row.tags:
            assert ("loud" in row.tags) == (planned >= synth._LOUD_DB)
            assert ("quiet" in row.tags) == (planned <= synth._QUIET_DB)


def test_release_at_mtat_size_reproduces_the_real_counts():
    rows, bank = synth_release._plan_release(synth_release.MTAT_CLIPS, 0, 1024, 29.1, True)
    assert len(rows) == 25_863 and len(bank) == 1024
    assert Counter(r.split for r in rows) == {"train": 18_683, "valid": 1_873, "test": 5_307}
    expected = synth_release._expected_counts(rows, 29.1)
    for policy, counts in sources._MTAT_EXPECTED.items():
        assert expected[policy] == {k: list(v) for k, v in counts.items()}
    # a bank clip's variants stay in one split: no music shared between splits
    assert all(len({r.split for r in rows if r.bank == b}) == 1 for b in range(0, 1024, 97))


def test_shift_mp3_gain_scales_the_decoded_audio_exactly(tmp_path):
    audio = (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    for options in ({"bitrate_mode": "CONSTANT", "compression_level": 0.85}, {}):  # CBR, VBR
        buffer = io.BytesIO()
        sf.write(buffer, audio, 16000, format="MP3", **options)
        original, _ = sf.read(io.BytesIO(buffer.getvalue()))
        for steps in (-8, -1, 2):
            scaled, _ = sf.read(io.BytesIO(shift_mp3_gain(buffer.getvalue(), steps)))
            assert scaled.shape == original.shape
            np.testing.assert_allclose(scaled, original * 2 ** (steps / 4), atol=1e-5)
    wav = io.BytesIO()
    sf.write(wav, audio, 16000, format="WAV")
    with pytest.raises(ValueError, match="no MPEG frame header"):
        shift_mp3_gain(wav.getvalue(), -1)


def test_release_is_deterministic_whatever_the_workers_and_is_reused(tmp_path, release):
    root, _ = release
    kwargs = {"num_clips": 80, "bank_size": 6, "duration": 2.0, "progress": False}
    generate_release(tmp_path / "b", seed=2, workers=2, **kwargs)
    a, b = _files(root), _files(tmp_path / "b")
    for files in (a, b):
        files.pop(PARAMS_FILE)  # records the wall time taken
    assert len(a) == 81 and a == b  # CSV + 80 mp3s, byte for byte
    assert ensure_release(tmp_path / "b", seed=2, workers=1, **kwargs)["reused"] is True
    other = ensure_release(tmp_path / "b", seed=3, workers=1, **kwargs)
    assert other["reused"] is False
    assert (tmp_path / "b" / "annotations_final.csv").read_bytes() != a["annotations_final.csv"]


def test_release_cli(tmp_path, capsys):
    assert cli.main(["data", "synth", "--mtat", "--out", str(tmp_path), "--clips", "64",
                     "--bank", "3", "--workers", "1"]) == 0  # fmt: skip
    assert "expected" in capsys.readouterr().out
    assert len(list(tmp_path.rglob("*.mp3"))) == 64
    assert cli.main(["data", "synth", "--out", str(tmp_path), "--bank", "3"]) == 2
