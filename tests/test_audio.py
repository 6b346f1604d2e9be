"""Decoding (mp3/wav/flac/ogg, stereo, resampling, truncation) and segmentation."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import soundfile as sf

from resemul_core.data import audio as audio_module
from resemul_core.data.audio import (
    LOUDNESS_FLOOR_DB,
    AudioDecodeError,
    audio_duration,
    dbfs,
    load_audio,
    rms,
    segment_waveform,
    stream_audio,
    write_audio,
)


def sine(seconds: float, rate: int, *, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "max_error"),
    [("wav", 2**-15), ("flac", 2**-15), ("ogg", 0.05), ("mp3", 0.05)],
)
def test_each_format_decodes_to_the_written_signal(tmp_path, fmt, max_error):
    signal = sine(1.0, 22_050)
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, signal, 22_050)
    decoded = load_audio(path, duration=None)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert len(decoded) == 22_050  # mpg123 removes the encoder delay: no padding either side
    assert np.abs(decoded - signal).max() <= max_error


def test_stereo_44k_is_averaged_and_resampled(tmp_path):
    left, right = sine(1.0, 44_100, amp=0.6), sine(1.0, 44_100, amp=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44_100, subtype="FLOAT")
    decoded = load_audio(path, duration=None)
    assert len(decoded) == 22_050
    expected = sine(1.0, 22_050, amp=0.4)
    # soxr's HQ filter: ~1e-4 away from the ideal band-limited result, except the first and
    # last few samples where the filter runs off the signal.
    assert np.abs(decoded[100:-100] - expected[100:-100]).max() < 1e-3


def test_duration_keeps_the_start_and_matches_a_full_decode(tmp_path):
    signal = sine(2.0, 16_000, freq=1000.0)
    path = tmp_path / "two_seconds.wav"
    sf.write(path, signal, 16_000, subtype="FLOAT")
    head = load_audio(path, duration=0.5)
    full = load_audio(path, duration=None)
    assert len(head) == 11_025 and len(full) == 44_100
    # decoding a little past the cut means resampling sees no artificial end there
    assert np.abs(head - full[:11_025]).max() < 1e-6


def test_paper_size_clip_gives_ten_segments(tmp_path):
    path = tmp_path / "clip.mp3"
    sf.write(path, sine(30.0, 16_000), 16_000)  # MTAT mp3s are 16 kHz mono, ~29.1 s
    waveform = load_audio(path)
    assert waveform.shape == (639_450,)  # 29 s x 22,050 Hz
    segments = segment_waveform(waveform)
    assert segments.shape == (10, 59_049)
    np.testing.assert_array_equal(segments[3], waveform[3 * 59_049 : 4 * 59_049])


def test_resampling_overshoot_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.5, 1.5, -2.0, 0.25], dtype=np.float32), 8000, subtype="FLOAT")
    np.testing.assert_array_equal(
        load_audio(path, sample_rate=8000, duration=None), [0.5, 1.0, -1.0, 0.25]
    )


def test_bad_files_raise_errors_naming_the_file(tmp_path):
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"empty\.mp3 is empty \(0 bytes\)"):
        load_audio(empty)
    text = tmp_path / "notes.mp3"
    text.write_text("not audio at all\n" * 50)
    with pytest.raises(AudioDecodeError, match=r"notes\.mp3 is not a recognisable audio file"):
        load_audio(text)
    with pytest.raises(FileNotFoundError, match=r"absent\.wav"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(empty, sample_rate=0)


def test_each_failure_is_one_sentence_naming_the_file_and_the_true_reason(tmp_path, monkeypatch):
    def fails(path, error, message):
        with pytest.raises(error) as caught:
            load_audio(path)
        assert str(caught.value) == message
        assert "regular file (possibly a pipe?)" not in str(caught.value)  # libsndfile's guess

    fails(tmp_path / "absent.wav", FileNotFoundError, f"{tmp_path / 'absent.wav'} does not exist")
    (tmp_path / "album.mp3").mkdir()
    fails(tmp_path / "album.mp3", AudioDecodeError, f"{tmp_path / 'album.mp3'} is a directory")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    fails(
        tmp_path / "dangling.wav",
        FileNotFoundError,
        f"{tmp_path / 'dangling.wav'} is a broken symbolic link to {tmp_path / 'gone.wav'}",
    )
    os.mkfifo(tmp_path / "pipe.mp3")  # opening a pipe would block: it must never be opened
    fails(
        tmp_path / "pipe.mp3",
        AudioDecodeError,
        f"{tmp_path / 'pipe.mp3'} is not a regular file (it is a named pipe)",
    )
    (tmp_path / "empty.flac").write_bytes(b"")
    fails(
        tmp_path / "empty.flac", AudioDecodeError, f"{tmp_path / 'empty.flac'} is empty (0 bytes)"
    )
    for name in ("notes.mp3", "notes.wav", "notes.ogg"):  # libsndfile: 3 different complaints
        (tmp_path / name).write_text("not audio at all\n" * 50)
        fails(
            tmp_path / name,
            AudioDecodeError,
            f"{tmp_path / name} is not a recognisable audio file (no decoder accepts its format;"
            " it looks like text: 'not audio at all')",
        )
    (tmp_path / "zeros.mp3").write_bytes(bytes(4000))
    fails(
        tmp_path / "zeros.mp3",
        AudioDecodeError,
        f"{tmp_path / 'zeros.mp3'} is not a recognisable audio file (no decoder accepts its format;"
        " its first bytes are all zero)",
    )
    sf.write(tmp_path / "tone.wav", sine(0.1, 8000), 8000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "tone.wav").read_bytes()[:30])
    fails(
        tmp_path / "cut.wav",
        AudioDecodeError,
        f"{tmp_path / 'cut.wav'} looks like a WAV file but cannot be decoded"
        " (libsndfile: Error in WAV file. No 'data' chunk marker.)",
    )
    sf.write(tmp_path / "tone.mp3", sine(1.0, 16_000), 16_000)
    (tmp_path / "cut.mp3").write_bytes((tmp_path / "tone.mp3").read_bytes()[:40])
    fails(
        tmp_path / "cut.mp3",
        AudioDecodeError,
        f"{tmp_path / 'cut.mp3'} looks like an MP3 file but cannot be decoded"
        " (the MP3 decoder found no complete audio frame: truncated or damaged)",
    )

    # permission denied: chmod does not stop root, so the open is refused by hand if need be
    locked = tmp_path / "locked.wav"
    locked.write_bytes((tmp_path / "tone.wav").read_bytes())
    locked.chmod(0)

    def refuse(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    if os.access(locked, os.R_OK):
        monkeypatch.setattr(audio_module, "open", refuse, raising=False)
    fails(locked, AudioDecodeError, f"{locked} cannot be read: permission denied")
    monkeypatch.undo()
    locked.chmod(0o644)
    assert len(load_audio(locked, sample_rate=8000)) == 800  # a readable copy decodes


def test_truncated_mp3_decodes_its_intact_part(tmp_path):
    path = tmp_path / "cut.mp3"
    sf.write(path, sine(6.0, 16_000), 16_000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    decoded = load_audio(path, sample_rate=16_000, duration=None)
    # about half the audio survives; the store's duration check turns this into a skip
    assert 2.5 * 16_000 < len(decoded) < 3.5 * 16_000


def test_segment_waveform_cuts_from_the_start_and_drops_the_tail():
    x = np.arange(11, dtype=np.float32)
    np.testing.assert_array_equal(
        segment_waveform(x, segment_length=3, max_segments=None),
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
    )
    np.testing.assert_array_equal(
        segment_waveform(x, segment_length=3, max_segments=2), [[0, 1, 2], [3, 4, 5]]
    )
    short = np.array([0.5, -0.5])
    assert segment_waveform(short, segment_length=3).shape == (0, 3)
    np.testing.assert_array_equal(
        segment_waveform(short, segment_length=3, pad=True), [[0.5, -0.5, 0]]
    )
    segments = segment_waveform(x, segment_length=3, max_segments=None)
    segments[0, 0] = 99
    assert x[0] == 0  # a copy, not a view
    with pytest.raises(ValueError, match=r"1-D waveform.*\(2, 3\)"):
        segment_waveform(np.zeros((2, 3)), segment_length=3)


def test_rms_and_dbfs_values_axes_and_floor():
    square = np.array([1.0, -1.0, 1.0, -1.0])
    x = np.stack([0.5 * square, np.zeros(4), 0.1 * square]).astype(np.float32)
    np.testing.assert_allclose(rms(x), [0.5, 0.0, 0.1], rtol=1e-7)  # per row (axis=-1)
    assert rms(x).dtype == np.float64 and rms(x, axis=0).shape == (4,)
    assert rms(x, axis=None) == pytest.approx(np.sqrt((0.25 + 0.01) / 3))  # a whole clip
    assert rms(np.array([3, -3], dtype=np.int16)) == 3.0  # any dtype, computed in float64
    db = dbfs(np.array([1.0, 0.1, 0.0, 1e-9]))
    np.testing.assert_allclose(db[:2], [0.0, -20.0], atol=1e-12)
    assert LOUDNESS_FLOOR_DB == -80.0 and list(db[2:]) == [LOUDNESS_FLOOR_DB] * 2  # exact, no -inf
    assert dbfs(0.0, floor_db=-100.0) == -100.0 and dbfs(1e-4, floor_db=-60.0) == -60.0
    assert float(dbfs(0.5)) == 20 * np.log10(0.5)
    with pytest.raises(ValueError, match=">= 0"):
        dbfs(np.array([0.1, -0.1]))


@pytest.mark.parametrize(
    ("name", "rate", "channels"),
    [("a.wav", 44_100, 2), ("b.flac", 16_000, 1), ("c.wav", 22_050, 1)],
)
def test_streamed_decoding_equals_decoding_in_one_piece(tmp_path, name, rate, channels):
    """Block by block (soxr as a stream), any block size: the same samples as load_audio."""
    rng = np.random.default_rng(0)
    data = np.clip(0.3 * rng.standard_normal((round(7.3 * rate), channels)), -1, 1)
    path = tmp_path / name
    sf.write(path, data.astype(np.float32), rate)
    assert audio_duration(path) == pytest.approx(7.3, abs=1 / rate)
    for duration in (None, 2.5, 100.0):
        whole = load_audio(path, duration=duration)
        for block_seconds in (0.37, 3.0, 30.0):
            blocks = list(stream_audio(path, duration=duration, block_seconds=block_seconds))
            assert all(b.dtype == np.float32 and b.size > 0 for b in blocks)
            np.testing.assert_array_equal(np.concatenate(blocks), whole)
        if duration is None and rate != 22_050:
            assert len(list(stream_audio(path, block_seconds=0.37))) > 10  # really in pieces


def test_streamed_decoding_reports_bad_files_like_load_audio(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_text("plain text, not audio")
    with pytest.raises(AudioDecodeError, match="junk.wav is not a recognisable audio file"):
        next(stream_audio(junk))
    with pytest.raises(FileNotFoundError, match="missing.flac does not exist"):
        next(stream_audio(tmp_path / "missing.flac"))
    with pytest.raises(ValueError, match="block_seconds must be positive"):
        next(stream_audio(junk, block_seconds=0))


def test_write_audio_writes_16_bit_wav_with_the_umask(tmp_path):
    waveform = sine(1.0, 22_050)
    old = os.umask(0o027)
    try:
        path = write_audio(tmp_path / "sub" / "x.wav", waveform)
    finally:
        os.umask(old)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (22_050, 1, "PCM_16")
    assert (path.stat().st_mode & 0o777) == 0o640
    np.testing.assert_allclose(load_audio(path, duration=None), waveform, atol=2**-15)
