"""Audio decoding and segmentation: file → mono 22,050 Hz float waveform → 59,049-sample segments.

Public: :func:`load_audio`, :func:`stream_audio` (the same decoding block by block, for files of
any length), :func:`audio_duration`, :func:`write_audio`, :func:`segment_waveform`,
:class:`AudioDecodeError`,
:data:`AUDIO_EXTENSIONS`, :data:`SAMPLE_RATE`, :data:`SEGMENT_LENGTH`, :data:`SEGMENTS_PER_CLIP`,
:data:`CLIP_DURATION`; loudness: :func:`rms`, :func:`dbfs`, :data:`LOUDNESS_FLOOR_DB` (the one
definition the store, the synthetic generator and the excitation analysis share).

The official code decodes with madmom → ffmpeg (mono, 22,050 Hz, first 29 s, float in [-1, 1])
and cuts non-overlapping 59,049-sample segments from the start, dropping the tail
(specification §1.1).
Here libsndfile (via ``soundfile``) decodes mp3/wav/flac/ogg and ``soxr`` resamples; no ffmpeg is
needed.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioDecodeError",
    "CLIP_DURATION",
    "LOUDNESS_FLOOR_DB",
    "SAMPLE_RATE",
    "SEGMENTS_PER_CLIP",
    "SEGMENT_LENGTH",
    "audio_duration",
    "dbfs",
    "load_audio",
    "rms",
    "segment_waveform",
    "stream_audio",
    "write_audio",
]

logger = logging.getLogger(__name__)

#: Sample rate the models see, in Hz (specification §1.1, madmom ``sample_rate=22050``).
SAMPLE_RATE = 22_050
#: Samples per model input: 3**10 ≈ 2.678 s at 22,050 Hz (specification §1.1).
SEGMENT_LENGTH = 59_049
#: Segments kept per clip: floor(29 s × 22,050 / 59,049) = 10 (specification §1.1).
SEGMENTS_PER_CLIP = 10
#: Seconds of audio decoded from the start of each clip (madmom ``stop=29``, specification §1.1).
CLIP_DURATION = 29.0
#: File name extensions the dataset adapters accept as audio (lower case, with the dot).
AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
#: Floor of every dBFS loudness: quieter audio, digital silence included, reads as this value
#: instead of -inf. -80 dBFS lies 35 dB below the quietest synthetic clip (-45 dBFS) and far
#: below real music, yet above the int16 store's quantisation noise (about -101 dBFS RMS), so
#: silence and near-silence read as one value instead of a spread of noise levels that would
#: dominate a regression on dB. (The excitation analysis has always used -80; its tests pin it.)
LOUDNESS_FLOOR_DB = -80.0

# Frames decoded beyond ``duration`` so that the resampler's filter sees real signal, not an
# artificial end, at the cut; the extra output is trimmed after resampling.
_RESAMPLE_MARGIN_S = 0.05


class AudioDecodeError(ValueError):
    """A path that exists but cannot be decoded as audio (not a readable regular file, empty,
    no format a decoder accepts, damaged); the message is one sentence naming the file and the
    reason."""


# Leading bytes of the formats a user is likely to hand over; only used to explain a failure.
_SIGNATURES = (
    (b"fLaC", "FLAC"),
    (b"OggS", "Ogg"),
    (b"ID3", "MP3"),
    (b"RF64", "RF64 (WAV)"),
    (b"FORM", "AIFF"),
    (b"caff", "CAF"),
    (b".snd", "AU"),
)
_FILE_KINDS = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)
# libsndfile's error 7: for a file named .mp3 whose content its MPEG reader rejects, libsndfile
# says "File does not exist or is not a regular file (possibly a pipe?)", never the reason here
# (the file was checked before); 1 is "Format not recognised."
_LIBSNDFILE_MISLEADING = 7
_LIBSNDFILE_UNRECOGNISED = 1


def _check_file(path: Path) -> bytes:
    """The first 64 bytes of ``path``, once it is known to be a readable, non-empty regular file;
    otherwise the error :func:`load_audio` documents. A pipe or device is never opened."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise FileNotFoundError(f"{path} is a broken symbolic link to {target}") from None
        raise FileNotFoundError(f"{path} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{path} does not exist (a folder on its path is a file)") from None
    except PermissionError as err:
        raise AudioDecodeError(f"{path} cannot be read: permission denied") from err
    except OSError as err:
        raise AudioDecodeError(f"{path} cannot be read: {err.strerror or err}") from err
    if stat.S_ISDIR(info.st_mode):
        raise AudioDecodeError(f"{path} is a directory")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "special file")
        raise AudioDecodeError(f"{path} is not a regular file (it is a {kind})")
    if info.st_size == 0:
        raise AudioDecodeError(f"{path} is empty (0 bytes)")
    try:
        with open(path, "rb") as handle:
            return handle.read(64)
    except PermissionError as err:
        raise AudioDecodeError(f"{path} cannot be read: permission denied") from err
    except OSError as err:
        raise AudioDecodeError(f"{path} cannot be read: {err.strerror or err}") from err


def _audio_format(head: bytes) -> str | None:
    """The audio format ``head`` (a file's first bytes) announces, or ``None``."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG frame header
        return "MP3"
    return None


def _describe_content(head: bytes) -> str:
    """What the first bytes of a file that no decoder accepts look like, for the message."""
    if not head.strip(b"\0"):
        return "its first bytes are all zero"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut off at the end still counts as text
        text = head[: err.start].decode("utf-8") if err.start >= len(head) - 3 else ""
    if text.strip() and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"it looks like text: {text.strip().splitlines()[0][:40]!r}"
    if head[:4] == b"RIFF":
        return f"it is a RIFF file of type {head[8:12].decode('latin-1')!r}, not WAVE"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _open_failure(path: Path, head: bytes, err: Exception) -> AudioDecodeError:
    """The error for a file libsndfile refused to open (``err``), explained by its content."""
    code = getattr(err, "code", None)
    reason = getattr(err, "error_string", None) or str(err)
    fmt = _audio_format(head)
    if fmt is None and code in (_LIBSNDFILE_UNRECOGNISED, _LIBSNDFILE_MISLEADING):
        return AudioDecodeError(
            f"{path} is not a recognisable audio file (no decoder accepts its format;"
            f" {_describe_content(head)})"
        )
    if code == _LIBSNDFILE_MISLEADING:
        reason = f"the {fmt} decoder found no complete audio frame: truncated or damaged"
    else:
        reason = f"libsndfile: {reason}"
    if fmt is None:
        return AudioDecodeError(f"{path} cannot be decoded ({reason})")
    article = "an" if fmt in ("MP3", "Ogg", "AIFF", "AU", "RF64 (WAV)") else "a"
    return AudioDecodeError(
        f"{path} looks like {article} {fmt} file but cannot be decoded ({reason})"
    )


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    duration: float | None = CLIP_DURATION,
) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform at ``sample_rate``.

    Args:
        path: an mp3, wav, flac or ogg file (anything libsndfile reads).
        sample_rate: output rate in Hz; the file is resampled with soxr ("HQ") if it differs.
        duration: keep only the first ``duration`` seconds (``None``: the whole file). The result
            has ``min(len(file), round(duration * sample_rate))`` samples.

    Returns:
        ``(num_samples,)`` float32 in [-1, 1]: channels are averaged (downmix), then clipped
        to [-1, 1] because resampling can overshoot slightly.

    Raises:
        AudioDecodeError: ``path`` exists but is a directory, not a regular file (a pipe, a
            device: never opened), unreadable (permission denied), empty, of no format a
            decoder accepts, damaged, or it decodes to no audio frames or to non-finite
            samples.
        FileNotFoundError: ``path`` does not exist (or is a broken symbolic link).

        Every message is one sentence that names the file and the reason ("x.mp3 is not
        a recognisable audio file ..."), never a decoder's guess about why it failed.

    Note:
        The official code resamples with ffmpeg's default (swresample) filter, this uses soxr;
        the two differ by a few 1e-4 in amplitude, far below the int16 store resolution of
        the audio itself (MTAT mp3s are 16 kHz, so both upsample).
    """
    path = Path(path)
    _check_rate_and_duration(sample_rate, duration)
    handle = _open_sound_file(path)
    try:
        with handle:
            native_rate = handle.samplerate
            frames = -1
            if duration is not None:
                frames = math.ceil((duration + _RESAMPLE_MARGIN_S) * native_rate)
            data = handle.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError) as err:
        raise AudioDecodeError(f"{path} failed partway through decoding ({err})") from err
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path} holds no audio frames")
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{path} decodes to samples that are NaN or infinite")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if native_rate != sample_rate:
        mono = soxr.resample(mono, native_rate, sample_rate, quality="HQ").astype(np.float32)
    if duration is not None:
        mono = mono[: round(duration * sample_rate)]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    np.clip(mono, -1.0, 1.0, out=mono)
    return mono


def _check_rate_and_duration(sample_rate: int, duration: float | None) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be positive or None, got {duration}")


def _open_sound_file(path: Path) -> sf.SoundFile:
    """``path`` opened for decoding, or the error :func:`load_audio` documents."""
    head = _check_file(path)
    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, EOFError) as err:
        raise _open_failure(path, head, err) from err


def audio_duration(path: str | os.PathLike) -> float:
    """Seconds of audio in a file, from its header (nothing is decoded).

    Raises:
        AudioDecodeError, FileNotFoundError: as :func:`load_audio`.
    """
    path = Path(path)
    with _open_sound_file(path) as handle:
        return handle.frames / handle.samplerate


def stream_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    duration: float | None = None,
    block_seconds: float = 10.0,
) -> Iterator[np.ndarray]:
    """Decode an audio file block by block: what :func:`load_audio` returns, in pieces.

    Memory stays bounded by the block size whatever the file's length (an hour of audio at
    22,050 Hz is 318 MB as one float32 array). The blocks, concatenated, equal
    ``load_audio(path, sample_rate=sample_rate, duration=duration)`` exactly: the same
    downmix, the same soxr resampler run as a stream (its output does not depend on where
    the blocks are cut), the same clipping.

    Args:
        path: an mp3, wav, flac or ogg file (anything libsndfile reads).
        sample_rate: output rate in Hz.
        duration: stop after this many seconds (``None``: the whole file).
        block_seconds: seconds of the file decoded per step (the yielded blocks have about
            ``block_seconds * sample_rate`` samples; the last ones may be shorter).

    Yields:
        ``(samples,)`` float32 blocks in [-1, 1], none of them empty.

    Raises:
        AudioDecodeError, FileNotFoundError: as :func:`load_audio`, at the first ``next``
            (or later, for a file damaged partway through).
    """
    path = Path(path)
    _check_rate_and_duration(sample_rate, duration)
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    handle = _open_sound_file(path)
    with handle:
        native_rate = handle.samplerate
        block = max(1, round(block_seconds * native_rate))
        wanted = None if duration is None else round(duration * sample_rate)
        stream = None
        if native_rate != sample_rate:
            stream = soxr.ResampleStream(native_rate, sample_rate, 1, dtype="float32", quality="HQ")
        produced, frames_read = 0, 0
        while wanted is None or produced < wanted:
            try:
                data = handle.read(frames=block, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, EOFError) as err:
                raise AudioDecodeError(f"{path} failed partway through decoding ({err})") from err
            last = data.shape[0] < block
            frames_read += data.shape[0]
            if not np.isfinite(data).all():
                raise AudioDecodeError(f"{path} decodes to samples that are NaN or infinite")
            mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if stream is not None:
                mono = stream.resample_chunk(np.ascontiguousarray(mono), last=last)
            if wanted is not None:
                mono = mono[: wanted - produced]
            if mono.size:
                out = np.ascontiguousarray(mono, dtype=np.float32)
                np.clip(out, -1.0, 1.0, out=out)
                produced += out.size
                yield out
            if last:
                break
        if frames_read == 0:
            raise AudioDecodeError(f"{path} holds no audio frames")


def write_audio(
    path: str | os.PathLike, waveform: np.ndarray, *, sample_rate: int = SAMPLE_RATE
) -> Path:
    """Write a mono waveform in [-1, 1] as a 16-bit WAV file, atomically.

    Args:
        path: the ``.wav`` file to write (its folder is created).
        waveform: ``(samples,)`` float audio.
        sample_rate: Hz.
    """
    from resemul_core.files import atomic_write

    path = Path(path)
    with atomic_write(path) as handle:
        sf.write(
            handle,
            np.asarray(waveform, dtype=np.float32),
            sample_rate,
            format="WAV",
            subtype="PCM_16",
        )
    return path


def segment_waveform(
    waveform: np.ndarray,
    *,
    segment_length: int = SEGMENT_LENGTH,
    max_segments: int | None = SEGMENTS_PER_CLIP,
    pad: bool = False,
) -> np.ndarray:
    """Cut a waveform into non-overlapping segments from its start; the tail is dropped.

    Args:
        waveform: ``(num_samples,)`` audio.
        segment_length: samples per segment (59,049 in the paper).
        max_segments: keep at most this many segments (``None``: all).
        pad: if the waveform is shorter than one segment, zero-pad it to exactly one segment
            instead of returning zero segments.

    Returns:
        ``(num_segments, segment_length)`` float32, ``num_segments = min(num_samples //
        segment_length, max_segments)`` (a copy, never a view of ``waveform``).
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"expected a 1-D waveform (num_samples,), got shape {waveform.shape}")
    if segment_length <= 0:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    if max_segments is not None and max_segments < 0:
        raise ValueError(f"max_segments must be >= 0 or None, got {max_segments}")
    count = waveform.shape[0] // segment_length
    if max_segments is not None:
        count = min(count, max_segments)
    if count == 0 and pad and (max_segments is None or max_segments > 0):
        out = np.zeros((1, segment_length), dtype=np.float32)
        out[0, : waveform.shape[0]] = waveform
        return out
    return waveform[: count * segment_length].reshape(count, segment_length).astype(np.float32)


def rms(samples: np.ndarray, axis: int | None = -1) -> np.ndarray:
    """Root-mean-square amplitude, computed in float64: the one loudness measurement.

    Args:
        samples: audio in [-1, 1] (any float or int dtype, any shape).
        axis: the axis to average over (``None``: all samples together, e.g. a whole clip).

    Returns:
        ``sqrt(mean(samples**2))`` over ``axis``: 0 for silence, 1 for a full-scale square
        wave; a float64 array with ``axis`` removed (a numpy scalar for ``axis=None``).
    """
    return np.sqrt(np.mean(np.square(np.asarray(samples, dtype=np.float64)), axis=axis))


def dbfs(rms: np.ndarray | float, *, floor_db: float = LOUDNESS_FLOOR_DB) -> np.ndarray:
    """RMS amplitude in dB relative to full scale: ``max(20 log10(rms), floor_db)``.

    Args:
        rms: RMS amplitudes (see :func:`rms`), >= 0; full scale = 1 = 0 dBFS.
        floor_db: the value of silence and of anything quieter
            (default :data:`LOUDNESS_FLOOR_DB`).

    Returns:
        float64 of ``rms``'s shape (a numpy scalar for a scalar); exactly ``floor_db`` at and
        below the floor, never -inf.
    """
    level = np.asarray(rms, dtype=np.float64)
    if (level < 0).any() or np.isnan(level).any():
        raise ValueError("an RMS amplitude must be >= 0")
    with np.errstate(divide="ignore"):
        return np.maximum(20.0 * np.log10(level), floor_db)
