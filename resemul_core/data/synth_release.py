"""An MTAT-sized synthetic release, written fast: level variants of a bank of rendered clips.

Public: :func:`generate_release`, :func:`ensure_release`, :func:`shift_mp3_gain`,
:data:`MTAT_CLIPS`, :data:`DEFAULT_BANK_SIZE`, :data:`GAIN_STEP_DB`.

:func:`resemul_core.data.synth.generate_dataset` renders and encodes every clip (about 0.17 s of CPU
per 29.1-s clip, two thirds of it in the mp3 encoder), so MagnaTagATune's 25,863 clips would
take over half an hour on two cores. This mode is for rehearsing data preparation at MTAT's
scale: it renders and encodes a *bank* of ``bank_size`` clips with the same renderer and
writes every clip of the release as a *level variant* of one bank clip.

Level variants. Each bank clip is rendered at the top of the synthetic level range (-13 dBFS
RMS, soft-limited below -0.9 dBFS) and encoded once. A clip of the release is its bank clip's
mp3 with every granule's ``global_gain`` field lowered by ``k`` steps, ``k`` uniform in 0..21:
the mp3 format's own gain (:func:`shift_mp3_gain`; each step scales the decoded audio by
exactly ``2**(-1/4)``, i.e. :data:`GAIN_STEP_DB` = 1.505 dB), so the variant decodes to the
bank clip times ``2**(-k/4)`` without re-encoding (about 1 ms per clip). Levels thus cover
-13 to -44.6 dBFS in 22 steps (the synthetic range of -13 to -45 dBFS, here uniform rather
than by style); ``loud`` (>= -21 dBFS) and ``quiet`` (<= -35 dBFS) follow the variant's level,
every other tag its bank clip's content (the rules of :mod:`resemul_core.data.synth`).
Variants of one bank clip stay in one split, so no music is shared between train, valid and
test; within a split, ``num_clips / bank_size`` clips (about 25 by default) share their music
and differ in level only.

MTAT's format and counts. 16 kHz mono mp3 at a constant 32 kbit/s, like MTAT's files (116,784
bytes per 29.1-s clip; without a gapless-playback header, so decoders return the encoder's
delay and padding too: 467,136 samples). ``annotations_final.csv`` is MTAT's tab-separated,
fully quoted table (``clip_id``, the tags of :data:`~resemul_core.data.synth.SYNTH_TAGS`,
``mp3_path``), rows in album order with increasing, gapped clip ids. Files are named like
MTAT's, ``artist-album-NN-title-START-END.mp3`` (five 29-s clips per track, up to 100 clips
per album, an album in one folder, albums shuffled over the folders). With ``num_clips =
25,863`` the release reproduces the counts of the real data under
:func:`~resemul_core.data.sources.read_mtat`:

* rows per split 18,683 / 1,873 / 5,307 (folders 0-b / c / d-f, even within a split), of
  which 15,250 / 1,529 / 4,332 carry tags, the rest none (MTAT's 21,111 clips with a top-50
  tag: the same fraction, 81.6 %, in every split);
* ``quirks``: MTAT's three zero-byte files (:data:`~resemul_core.data.sources.MTAT_KNOWN_BROKEN`,
  the real names in folders 6, 8 and 9) and three train clips shorter than 29.1 s (0.80, 0.85
  and 0.90 of ``duration``), all tagged; the store then holds 15,244 / 1,529 / 4,332 clips
  under the ``paper`` policy and 15,247 / 1,529 / 4,332 under ``resemul``, as on real MTAT.

Other sizes scale these counts (largest remainders). Same seed and arguments: byte-identical
files whatever ``workers`` is.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from resemul_core.data import synth
from resemul_core.data.sources import _MTAT_EXPECTED, MTAT_KNOWN_BROKEN
from resemul_core.data.splits import MTAT_SPLIT_OF_FOLDER, mtat_folders
from resemul_core.data.store import SPLITS as _SPLITS
from resemul_core.data.synth_audio import render_clip

__all__ = [
    "DEFAULT_BANK_SIZE",
    "GAIN_STEP_DB",
    "MTAT_CLIPS",
    "ensure_release",
    "generate_release",
    "shift_mp3_gain",
]

logger = logging.getLogger(__name__)

#: Rows of MTAT's annotations_final.csv, the default release size.
MTAT_CLIPS = 25_863
#: Distinct rendered clips by default: about 25 level variants each at MTAT's size.
DEFAULT_BANK_SIZE = 1024
#: dB per ``global_gain`` step of an mp3 granule: 20 * log10(2 ** (1 / 4)).
GAIN_STEP_DB = 5.0 * math.log10(2.0)
_MAX_STEPS = 21  # 21 steps below -13 dBFS = -44.6 dBFS, the synthetic range's bottom

# Clips per split that have a top-50 tag on the real data: (train, valid, test).
_MTAT_TAGGED: tuple[int, int, int] = _MTAT_EXPECTED["resemul"]["source"]
_SHORT_FRACTIONS = (0.80, 0.85, 0.90)  # of ``duration``: MTAT's three short clips
_CLIPS_PER_TRACK, _CLIPS_PER_ALBUM = 5, 100
# libsndfile's MPEG encoder in constant-bitrate mode: level 0.85 gives 32 kbit/s at 16 kHz.
_MP3_OPTIONS = {"format": "MP3", "bitrate_mode": "CONSTANT", "compression_level": 0.85}

# MPEG-2 (version bits 2) and MPEG-2.5 (0) Layer III: sample rates and bit rates (kbit/s).
_MPEG2_RATES = {2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)


def shift_mp3_gain(data: bytes, gain_steps: int) -> bytes:
    """Scale a mono MPEG-2/2.5 Layer III stream by ``2 ** (gain_steps / 4)`` without re-encoding.

    Adds ``gain_steps`` to the 8-bit ``global_gain`` of every granule (bits 30-37 of a mono
    MPEG-2 frame's side information); decoders multiply every spectral value by
    ``2 ** (global_gain / 4)``, so the decoded waveform scales exactly (as mp3gain does it).
    A Xing/Info header frame is left alone (it carries no audio), as are leading ID3v2 and
    trailing ID3v1 tags.

    Args:
        data: the mp3 file's bytes: mono, 8-24 kHz, no CRC (what libsndfile writes).
        gain_steps: 1.505-dB steps (:data:`GAIN_STEP_DB`); negative attenuates.

    Raises:
        ValueError: another kind of stream (MPEG-1, stereo, CRC, free format) or a gain
            outside 0..255 in a granule that holds audio.
    """
    out = bytearray(data)
    pos, frames = 0, 0
    if out[:3] == b"ID3":  # ID3v2: a 10-byte header and a 28-bit "syncsafe" size
        pos = 10 + ((out[6] & 0x7F) << 21 | (out[7] & 0x7F) << 14 | (out[8] & 0x7F) << 7)
        pos += out[9] & 0x7F
    while pos + 4 <= len(out):
        header = int.from_bytes(out[pos : pos + 4], "big")
        if header >> 21 != 0x7FF:
            if out[pos : pos + 3] == b"TAG":  # ID3v1 at the end
                break
            raise ValueError(f"no MPEG frame header at byte {pos}")
        version, layer, no_crc = header >> 19 & 3, header >> 17 & 3, header >> 16 & 1
        bitrate, rate, padding = header >> 12 & 15, header >> 10 & 3, header >> 9 & 1
        if version not in _MPEG2_RATES or layer != 1 or header >> 6 & 3 != 3 or not no_crc:
            raise ValueError(f"frame at byte {pos}: not a mono MPEG-2/2.5 Layer III frame w/o CRC")
        if bitrate in (0, 15) or rate == 3:
            raise ValueError(f"frame at byte {pos}: free-format or reserved bit/sample rate")
        side = pos + 4
        if bytes(out[side + 9 : side + 13]) not in (b"Xing", b"Info"):
            bits = int.from_bytes(out[side : side + 5], "big")  # side info bits 0-39
            gain = (bits >> 2 & 0xFF) + gain_steps
            if not 0 <= gain <= 255:
                if bits >> 19 & 0xFFF:  # part2_3_length > 0: the granule holds audio
                    raise ValueError(f"frame at byte {pos}: global_gain {gain} out of 0..255")
                gain = min(255, max(0, gain))  # a silent granule: its gain is never applied
            bits = bits & ~(0xFF << 2) | gain << 2
            out[side : side + 5] = bits.to_bytes(5, "big")
        pos += 72_000 * _MPEG2_L3_KBPS[bitrate] // _MPEG2_RATES[version][rate] + padding
        frames += 1
    if frames == 0:
        raise ValueError("no MPEG frame found")
    return bytes(out)


@dataclass(frozen=True)
class _Row:
    """One row of the release's CSV."""

    clip_id: int
    mp3_path: str  # relative to mp3/
    split: str
    tags: tuple[str, ...]  # empty: a clip without any tag (MTAT: no top-50 tag)
    bank: int  # the bank clip it is a variant of
    gain_steps: int  # 0..-21: its level is -13 dBFS + gain_steps * GAIN_STEP_DB
    duration: float  # seconds of audio
    empty: bool  # written as a zero-byte file (MTAT's broken files)


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainders (exact integers)."""
    whole = sum(weights)
    counts = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(total * weights[k] % whole), k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def _names(num_clips: int, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """(album, mp3_path, split) of every clip, in album order (the CSV's row order)."""
    rows_per_split = _apportion(num_clips, _MTAT_TAGGED)
    folder_rows: dict[str, int] = {}
    for split, rows in zip(_SPLITS, rows_per_split, strict=True):
        folders = mtat_folders(split)
        for folder, count in zip(folders, _apportion(rows, [1] * len(folders)), strict=True):
            folder_rows[folder] = count
    albums = [
        (folder, start, min(_CLIPS_PER_ALBUM, count - start))
        for folder, count in folder_rows.items()
        for start in range(0, count, _CLIPS_PER_ALBUM)
    ]
    number = rng.permutation(len(albums))  # album numbers do not follow the folders
    out = []
    for (folder, _, size), album in zip(albums, number, strict=True):
        for j in range(size):
            track, part = j // _CLIPS_PER_TRACK + 1, j % _CLIPS_PER_TRACK
            name = (
                f"synthetic_artist_{album:03d}-synthetic_album_{album:03d}-{track:02d}"
                f"-track_{track:02d}-{29 * part}-{29 * part + 29}.mp3"
            )
            out.append((int(album), f"{folder}/{name}", MTAT_SPLIT_OF_FOLDER[folder]))
    out.sort(key=lambda row: row[0])  # stable: tracks and clips stay in order in an album
    return out


def _plan_release(
    num_clips: int, seed: int, bank_size: int, duration: float, quirks: bool
) -> tuple[list[_Row], list[tuple[synth._Spec, np.random.SeedSequence]]]:
    """The release's rows and its bank (spec at -13 dBFS, audio seed per bank clip)."""
    layout_seed, bank_seed, gain_seed = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(layout_seed)
    names = _names(num_clips, rng)
    paths = [path for _, path, _ in names]
    splits = np.array([split for _, _, split in names])
    empty = np.zeros(num_clips, dtype=bool)
    durations = np.full(num_clips, float(duration))
    if quirks:
        for broken in MTAT_KNOWN_BROKEN:  # the last clip of its folder takes the real name
            in_folder = [i for i, p in enumerate(paths) if p[0] == broken[0]]
            if not in_folder:
                raise ValueError(f"num_clips={num_clips} leaves folder {broken[0]} empty")
            paths[in_folder[-1]], empty[in_folder[-1]] = broken, True
        train = np.flatnonzero((splits == "train") & ~empty)
        if len(train) < len(_SHORT_FRACTIONS):
            raise ValueError(f"num_clips={num_clips} is too small for MTAT's short clips")
        short = rng.choice(train, len(_SHORT_FRACTIONS), replace=False)
        durations[np.sort(short)] = [f * duration for f in _SHORT_FRACTIONS]
    special = empty | (durations < duration)
    tagged_total = round(num_clips * sum(_MTAT_TAGGED) / MTAT_CLIPS)
    tagless = np.zeros(num_clips, dtype=bool)
    for split, tagged in zip(_SPLITS, _apportion(tagged_total, _MTAT_TAGGED), strict=True):
        members = np.flatnonzero((splits == split) & ~special)
        count = int((splits == split).sum()) - tagged
        if count > len(members):
            raise ValueError(f"num_clips={num_clips} is too small for the {split} split")
        tagless[rng.choice(members, count, replace=False)] = True

    # The bank: per split, in proportion to its rows; its clips go round-robin over them.
    per_split = [max(1, b) for b in _apportion(bank_size, [(splits == s).sum() for s in _SPLITS])]
    per_split = [min(b, int((splits == s).sum())) for b, s in zip(per_split, _SPLITS, strict=True)]
    bank_of = np.zeros(num_clips, dtype=np.int64)
    first = 0
    for split, size in zip(_SPLITS, per_split, strict=True):
        members = rng.permutation(np.flatnonzero(splits == split))
        bank_of[members] = first + np.arange(len(members)) % size
        first += size
    top = synth._LEVEL_DB[1]
    bank = []
    for clip_seed in bank_seed.spawn(first):
        spec_seed, audio_seed = clip_seed.spawn(2)
        spec = synth._sample_spec(np.random.default_rng(spec_seed))
        bank.append((dataclasses.replace(spec, level_db=top), audio_seed))
    steps = -np.random.default_rng(gain_seed).integers(0, _MAX_STEPS + 1, num_clips)

    ids = 2 + np.cumsum(rng.integers(1, 5, num_clips)) - 1  # increasing with gaps, like MTAT's
    rows = []
    for i in range(num_clips):
        spec = bank[bank_of[i]][0]
        level = top + int(steps[i]) * GAIN_STEP_DB
        tags = () if tagless[i] else dataclasses.replace(spec, level_db=level).tags
        rows.append(
            _Row(
                int(ids[i]),
                paths[i],
                str(splits[i]),
                tags,
                int(bank_of[i]),
                int(steps[i]),
                float(durations[i]),
                bool(empty[i]),
            )
        )
    return rows, bank


def _encode(audio: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, **_MP3_OPTIONS)
    return buffer.getvalue()


def _write_bank_clip(job: tuple[Any, ...]) -> tuple[int, float]:
    """Render and encode one bank clip, then write its level variants; (files, peak)."""
    spec, audio_seed, sample_rate, duration, variants = job
    audio = render_clip(spec, audio_seed, sample_rate, round(duration * sample_rate))
    encoded: dict[float, bytes] = {}
    for path, gain_steps, seconds in variants:
        if seconds not in encoded:  # a short clip is a shorter encoding of the same audio
            encoded[seconds] = _encode(audio[: round(seconds * sample_rate)], sample_rate)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(shift_mp3_gain(encoded[seconds], gain_steps))
        os.replace(tmp, path)  # made durable by one os.sync() before the CSV is written
    return len(variants), float(np.abs(audio).max())


def _expected_counts(rows: Sequence[_Row], duration: float) -> dict[str, dict[str, list[int]]]:
    """(train, valid, test) clips after read_mtat and in the store, per split policy."""

    def count(keep) -> list[int]:
        return [sum(1 for r in rows if r.split == s and r.tags and keep(r)) for s in _SPLITS]

    broken = set(MTAT_KNOWN_BROKEN)
    return {
        "resemul": {"source": count(lambda r: True), "store": count(lambda r: not r.empty)},
        "paper": {
            "source": count(lambda r: r.mp3_path not in broken),
            "store": count(lambda r: r.mp3_path not in broken and r.duration >= duration),
        },
    }


def _params(
    num_clips: int, bank_size: int, seed: int, sample_rate: int, duration: float, quirks: bool
) -> dict[str, Any]:
    """What a release's content depends on, saved next to it for :func:`ensure_release`."""
    return {
        "kind": "mtat-release",
        "design": synth.DESIGN,
        "num_clips": num_clips,
        "bank_size": bank_size,
        "seed": seed,
        "sample_rate": sample_rate,
        "duration": duration,
        "quirks": quirks,
    }


def generate_release(
    out: str | os.PathLike,
    *,
    num_clips: int = MTAT_CLIPS,
    bank_size: int = DEFAULT_BANK_SIZE,
    seed: int = 0,
    sample_rate: int = 16000,
    duration: float = 29.1,
    quirks: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write an MTAT-format release of ``num_clips`` clips fast (see the module docstring).

    Args:
        out: release folder; receives ``annotations_final.csv`` and ``mp3/<0..f>/*.mp3``.
            Generated mp3s (``synthetic_artist_*``) not in this release are removed. The CSV
            is written last, after an ``os.sync()``: its presence marks a complete release.
        num_clips: CSV rows (25,863 = MTAT's); at least 64 with ``quirks``, 16 without.
        bank_size: distinct rendered clips; each clip is a level variant of one of them.
        seed: the same seed and arguments give byte-identical files.
        sample_rate: Hz, 8,000-24,000 (MPEG-2 rates, which the level variants need).
        duration: seconds per clip (MTAT: 29.1).
        quirks: include MTAT's three zero-byte files and three short clips.
        workers: processes (``None``: one per available CPU; ``1``: in this process).
        progress: show a tqdm bar.

    Returns:
        A summary: ``path``, ``clips``, ``bank``, ``splits`` (rows per split), ``tags``
        (positives per tag), ``expected`` (``{policy: {"source" | "store": [train, valid,
        test]}}``: clips after :func:`~resemul_core.data.sources.read_mtat` and in the prepared
        store), ``mp3_bytes`` (apparent size of all mp3s) and ``seconds`` (wall time).
    """
    if num_clips < (64 if quirks else 16):
        raise ValueError(f"num_clips must be >= {64 if quirks else 16}, got {num_clips}")
    if bank_size < 3:
        raise ValueError(f"bank_size must be >= 3 (one per split at least), got {bank_size}")
    if not 8000 <= sample_rate <= 24000:
        raise ValueError(f"sample_rate must be 8000-24000 Hz (MPEG-2), got {sample_rate}")
    if not duration > 0:
        raise ValueError(f"duration must be positive (seconds), got {duration}")
    started = time.perf_counter()
    root = Path(out)
    rows, bank = _plan_release(num_clips, seed, bank_size, duration, quirks)
    csv_path = root / "annotations_final.csv"
    csv_path.unlink(missing_ok=True)  # until the new one is written, the folder is incomplete
    for folder in MTAT_SPLIT_OF_FOLDER:
        (root / "mp3" / folder).mkdir(parents=True, exist_ok=True)
    variants: list[list[tuple[str, int, float]]] = [[] for _ in bank]
    for row in rows:
        path = root / "mp3" / row.mp3_path
        if row.empty:
            path.write_bytes(b"")
        else:
            variants[row.bank].append((str(path), row.gain_steps, row.duration))
    jobs = [
        (spec, seed_, sample_rate, duration, todo)
        for (spec, seed_), todo in zip(bank, variants, strict=True)
    ]
    workers = synth.worker_count(workers, len(jobs))
    logger.info(
        "writing %d clips (bank of %d) into %s with %d workers", num_clips, len(bank), root, workers
    )
    peaks = []
    bar = tqdm(total=num_clips, desc="release clips", unit="clip", disable=not progress)
    bar.update(sum(row.empty for row in rows))
    try:
        for written, peak in synth.map_in_processes(_write_bank_clip, jobs, workers):
            peaks.append(peak)
            bar.update(written)
    finally:
        bar.close()
    wanted = {root / "mp3" / row.mp3_path for row in rows}
    # .mp3*: also a killed run's .tmp files
    synth.remove_stale(root, "mp3/?/synthetic_artist_*.mp3*", wanted, "release")
    os.sync()  # every mp3 is on disk before the CSV says the release is complete
    tag_counts = dict.fromkeys(synth.SYNTH_TAGS, 0)
    for row in rows:
        for tag in row.tags:
            tag_counts[tag] += 1
    summary = {
        "path": str(root),
        "clips": num_clips,
        "bank": len(bank),
        "splits": {s: sum(r.split == s for r in rows) for s in _SPLITS},
        "tags": tag_counts,
        "expected": _expected_counts(rows, duration),
        "peak": round(max(peaks), 4),
        "mp3_bytes": sum(p.stat().st_size for p in wanted),
        "seconds": round(time.perf_counter() - started, 2),
    }
    params = _params(num_clips, bank_size, seed, sample_rate, duration, quirks)
    synth.write_metadata(root, params, summary, ((r.clip_id, r.tags, r.mp3_path) for r in rows))
    logger.info("wrote %d clips in %.1f s", num_clips, summary["seconds"])
    return summary


def ensure_release(
    out: str | os.PathLike,
    *,
    num_clips: int = MTAT_CLIPS,
    bank_size: int = DEFAULT_BANK_SIZE,
    seed: int = 0,
    sample_rate: int = 16000,
    duration: float = 29.1,
    quirks: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`generate_release`, unless ``out`` already holds a complete release made with the
    same parameters; then its saved summary is returned with ``"reused": True``."""
    root = Path(out)

    def generate() -> dict:
        return generate_release(
            root,
            num_clips=num_clips,
            bank_size=bank_size,
            seed=seed,
            sample_rate=sample_rate,
            duration=duration,
            quirks=quirks,
            workers=workers,
            progress=progress,
        )

    params = _params(num_clips, bank_size, seed, sample_rate, duration, quirks)
    return synth.reuse_or_generate(root, params, generate, "release")
