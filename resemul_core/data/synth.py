"""A synthetic music-tagging dataset in the MagnaTagATune layout: the project's default data.

Public: :func:`generate_dataset`, :data:`SYNTH_TAGS`, :data:`DEFAULT_NUM_CLIPS`.

:func:`generate_dataset` writes ``annotations_final.csv`` and ``mp3/<0..f>/<name>.mp3`` exactly
as MTAT lays them out (specification §1.1), so the real MTAT reader, split and pipeline run on it
offline:
16 kHz mono mp3 clips of 29.1 s, a tab-separated CSV with double-quoted values, a ``clip_id``
column, one 0/1 column per tag and an ``mp3_path`` relative to ``mp3/``. All audio is made with
numpy; the only encoder is libsndfile's MP3 writer. It shares MTAT's layout, not its data: the
reader recognises the folder by :data:`PARAMS_FILE` and names it dataset ``synth`` (store
manifests, ``resemul data info``, prepare summaries).

Generative model (each clip independently, from its own seed):

1. An *arrangement* is drawn, then the instruments it uses (``P`` = chance of each):

   =========== ==== ===================================================================
   arrangement P    instruments
   =========== ==== ===================================================================
   chamber     0.24 piano .5, strings .6, flute .4 (at least one of the three), voice .25
   band        0.22 guitar 1, drums 1, bass .85, voice .6, piano .2, synth .1
   club        0.18 synth 1, drums 1, bass .7, voice .25, piano .1
   pad         0.14 synth 1, piano .3, strings .3, flute .25, voice .15, bass .2
   mixed       0.22 each of the eight instruments .35 (at least two)
   =========== ==== ===================================================================

   The arrangement itself is never a tag; it only correlates the instruments.
2. Tempo class by arrangement (slow / medium / fast): chamber .45/.40/.15, band .10/.50/.40,
   club 0/.30/.70, pad .80/.20/0, mixed .25/.50/.25; tempo uniform in 60-78 (slow),
   96-126 (medium) or 148-176 (fast) BPM.
3. A voice, if present, is female with chance .6 (melody in MIDI 64-77, formants x1.17), else
   male (MIDI 48-60).
4. Level, as in recorded music a property of the style: the clip's RMS is drawn uniformly
   within ±8 dB of its arrangement's centre (chamber -37, pad -33, mixed -29, band -22, club
   -21 dBFS; all within -45..-13 dBFS), so loudness correlates with most tags (mean level per
   tag from -39 dBFS for ``quiet`` and -36 for ``classical`` to -22 for ``techno``). Within the
   clip the level swells and fades from one two-bar phrase to the next, by up to 12 (chamber),
   9 (pad), 6 (mixed), 4 (band) or 3 (club) dB peak to peak. A soft limiter keeps the peak
   below 0.9 (-0.9 dBFS) before encoding.

Tags are deterministic functions of what is audible (so every tag is learnable from the audio):

* ``piano guitar strings flute bass synth drums``: that instrument plays;
* ``vocal`` if the voice sings, else ``no vocals``; ``female`` / ``male``: the voice's register;
* ``slow`` / ``fast``: the slow / fast tempo class (medium tempo has neither);
* ``quiet`` if the clip's RMS ``L <= -35`` dBFS, ``loud`` if ``L >= -21`` dBFS;
* ``rock`` = guitar and drums without synth; ``techno`` = synth and drums without guitar, not
  slow; ``electronic`` = synth without piano, guitar, strings or flute; ``ambient`` = synth
  without drums, not fast; ``classical`` = piano, strings or flute without guitar, bass, synth or
  drums.

Resulting tag frequencies (expected, from 200,000 draws) are deliberately imbalanced, yet even
the rarest tag has ~4.5 expected positives among the 32 validation clips of the default size:
no vocals .65, drums .49, synth .43, bass .43, vocal .35, piano .33, guitar .31, fast .30,
slow .30, strings .29, classical .26, flute .23, quiet .23, electronic .23, rock .22, female .21,
techno .19, loud .19, ambient .18, male .14. Every clip has ``vocal`` or ``no vocals``, so none
is tagless.

The audio of each clip is rendered from its plan by :mod:`resemul_core.data.synth_audio`
(which describes the music and the instruments) and encoded to mp3 here.

Splits: MTAT's folders, but a test split as large as the training split (it costs generation
and evaluation only, and narrows the intervals of test-set comparisons): a seeded permutation
puts each clip into one of 25 slots, one per train folder (0-b) and for the valid folder (c),
four per test folder (d-f) (``index -> slot(perm[index] % 25)``). The default 800 clips give
32 per train folder and in c, 128 per test folder: 384 train / 32 valid / 384 test.

No leakage: file names (``synthetic_artist_NNN-synthetic_album-NN-track-0-29.mp3``), clip ids
and row order follow the clip index, whose tags are drawn independently of it; folders come
from the seeded permutation alone, so each train folder and the valid folder hold
``num_clips / 25`` clips (±1) and each test folder four times that, whatever the tags; every
clip has the same length. Same seed, same arguments: byte-identical CSV and mp3 files
(libsndfile's MP3 encoder is deterministic), whatever ``workers`` is.

At MagnaTagATune's full size (25,863 clips) rendering and encoding every clip takes over half
an hour on two cores; :mod:`resemul_core.data.synth_release` (``resemul data synth --mtat``) writes
such a release in minutes, as level variants of a bank of clips planned by this module and
rendered by :mod:`resemul_core.data.synth_audio`, with MTAT's split counts and quirks.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
from tqdm import tqdm

from resemul_core.data.audio import dbfs, rms
from resemul_core.data.splits import mtat_split
from resemul_core.data.synth_audio import INSTRUMENTS, render_clip
from resemul_core.files import atomic_write, write_json, write_text
from resemul_core.workers import available_cpus, exit_with_parent

__all__ = ["DEFAULT_NUM_CLIPS", "SYNTH_TAGS", "PARAMS_FILE", "ensure_dataset", "generate_dataset"]

#: Written next to the CSV: the parameters and summary of the run that made the folder. Its
#: presence marks a folder as synthetic (:data:`resemul_core.data.sources.SYNTH_MARKER`).
PARAMS_FILE = "synth.json"

#: Version of the generative model, saved with the parameters: a folder written by an earlier
#: design is regenerated rather than reused. 2: loudness by arrangement, dynamics within clips,
#: a test split as large as the training split.
DESIGN = 2

logger = logging.getLogger(__name__)

#: Clips in the default dataset: 32 per train folder and in the valid one, 128 per test folder,
#: i.e. 384 train / 32 valid / 384 test. Two processes generate it in about 70 s (the mp3
#: encoder takes most of the time).
DEFAULT_NUM_CLIPS = 800

#: The tag vocabulary, in CSV column order; exact MTAT spellings, all but ``bass`` in MTAT's top 50.
SYNTH_TAGS: tuple[str, ...] = (
    "piano", "guitar", "strings", "flute", "bass", "synth", "drums",
    "vocal", "no vocals", "female", "male",
    "slow", "fast", "loud", "quiet",
    "rock", "techno", "electronic", "ambient", "classical",
)  # fmt: skip

_ACOUSTIC = frozenset({"piano", "guitar", "strings", "flute"})

# arrangement -> (probability, instrument probabilities, (P slow, P medium, P fast))
_ARRANGEMENTS: dict[str, tuple[float, dict[str, float], tuple[float, float, float]]] = {
    "chamber": (
        0.24,
        {"piano": 0.5, "strings": 0.6, "flute": 0.4, "voice": 0.25},
        (0.45, 0.4, 0.15),
    ),
    "band": (
        0.22,
        {"guitar": 1.0, "drums": 1.0, "bass": 0.85, "voice": 0.6, "piano": 0.2, "synth": 0.1},
        (0.1, 0.5, 0.4),
    ),
    "club": (
        0.18,
        {"synth": 1.0, "drums": 1.0, "bass": 0.7, "voice": 0.25, "piano": 0.1},
        (0.0, 0.3, 0.7),
    ),
    "pad": (
        0.14,
        {"synth": 1.0, "piano": 0.3, "strings": 0.3, "flute": 0.25, "voice": 0.15, "bass": 0.2},
        (0.8, 0.2, 0.0),
    ),
    "mixed": (0.22, dict.fromkeys(INSTRUMENTS, 0.35), (0.25, 0.5, 0.25)),
}
# arrangement -> (centre of the clip level, dBFS; depth of the level changes within a clip, dB):
# as in recorded music, loudness follows the style, so it correlates with most tags.
_LEVELS: dict[str, tuple[float, float]] = {
    "chamber": (-37.0, 12.0),
    "pad": (-33.0, 9.0),
    "mixed": (-29.0, 6.0),
    "band": (-22.0, 4.0),
    "club": (-21.0, 3.0),
}
_LEVEL_SPREAD_DB = 8.0  # the clip level is uniform in centre +- this
_TEMPO_BPM = {"slow": (60.0, 78.0), "medium": (96.0, 126.0), "fast": (148.0, 176.0)}
_P_FEMALE = 0.6
_LEVEL_DB = (-45.0, -13.0)  # bounds of the clip RMS, dBFS
_QUIET_DB = -35.0  # at or below: "quiet"
_LOUD_DB = -21.0  # at or above: "loud"


@dataclass(frozen=True)
class _Spec:
    """What one clip contains; its tags follow from these fields alone."""

    arrangement: str
    instruments: frozenset[str]
    female: bool  # voice register; meaningless without "voice"
    tempo: str  # "slow" | "medium" | "fast"
    bpm: float  # beats per minute
    level_db: float  # RMS level of the clip, dBFS
    dynamics_db: float = 0.0  # depth of the level changes within the clip, dB

    @property
    def tags(self) -> tuple[str, ...]:
        has = self.instruments.__contains__
        on = {name: has(name) for name in INSTRUMENTS if name != "voice"}
        on["vocal"] = has("voice")
        on["no vocals"] = not has("voice")
        on["female"] = has("voice") and self.female
        on["male"] = has("voice") and not self.female
        on["slow"] = self.tempo == "slow"
        on["fast"] = self.tempo == "fast"
        on["loud"] = self.level_db >= _LOUD_DB
        on["quiet"] = self.level_db <= _QUIET_DB
        on["rock"] = has("guitar") and has("drums") and not has("synth")
        on["techno"] = has("synth") and has("drums") and not has("guitar") and not on["slow"]
        on["electronic"] = has("synth") and not (self.instruments & _ACOUSTIC)
        on["ambient"] = has("synth") and not has("drums") and not on["fast"]
        on["classical"] = bool(self.instruments & {"piano", "strings", "flute"}) and not (
            self.instruments & {"guitar", "bass", "synth", "drums"}
        )
        return tuple(tag for tag in SYNTH_TAGS if on[tag])


def _sample_spec(rng: np.random.Generator) -> _Spec:
    """Draw one clip's content from the generative model of the module docstring."""
    names = list(_ARRANGEMENTS)
    arrangement = names[rng.choice(len(names), p=[_ARRANGEMENTS[n][0] for n in names])]
    _, chances, tempo_p = _ARRANGEMENTS[arrangement]
    while True:  # rejection keeps each arrangement's minimum content
        draws = rng.random(len(INSTRUMENTS))
        chosen = frozenset(
            name for name, u in zip(INSTRUMENTS, draws, strict=True) if u < chances.get(name, 0.0)
        )
        if arrangement == "chamber" and not chosen & {"piano", "strings", "flute"}:
            continue
        if arrangement == "mixed" and len(chosen) < 2:
            continue
        break
    tempo = ("slow", "medium", "fast")[rng.choice(3, p=tempo_p)]
    bpm = float(rng.uniform(*_TEMPO_BPM[tempo]))
    female = bool(rng.random() < _P_FEMALE)
    centre, dynamics = _LEVELS[arrangement]
    level_db = float(rng.uniform(centre - _LEVEL_SPREAD_DB, centre + _LEVEL_SPREAD_DB))
    level_db = min(max(level_db, _LEVEL_DB[0]), _LEVEL_DB[1])
    return _Spec(arrangement, chosen, female, tempo, bpm, level_db, dynamics)


@dataclass(frozen=True)
class _Clip:
    """One row of the dataset: where it goes and what it holds."""

    clip_id: int
    # Relative to mp3/, e.g. "3/synthetic_artist_001-synthetic_album-02-track-0-29.mp3".
    mp3_path: str
    spec: _Spec
    audio_seed: np.random.SeedSequence


#: The folder of each of the 25 slots a clip can fall into: one per train folder (0-b) and for
#: the valid folder (c), four per test folder (d-f): the test split is as large as the training
#: split (it costs generation and evaluation only), so that test-set intervals are narrow.
_FOLDER_SLOTS: tuple[int, ...] = (*range(13), *(13 + i % 3 for i in range(12)))


def _plan(num_clips: int, seed: int) -> list[_Clip]:
    """All clips' metadata without audio; clip k's content does not depend on ``num_clips``."""
    order_seed, *clip_seeds = np.random.SeedSequence(seed).spawn(num_clips + 1)
    slots = np.random.default_rng(order_seed).permutation(num_clips) % len(_FOLDER_SLOTS)
    folders = np.array(_FOLDER_SLOTS)[slots]
    clips = []
    for index, (clip_seed, folder) in enumerate(zip(clip_seeds, folders, strict=True)):
        spec_seed, audio_seed = clip_seed.spawn(2)
        name = (
            f"synthetic_artist_{index // 10:03d}-synthetic_album-{index % 10 + 1:02d}"
            "-track-0-29.mp3"
        )
        spec = _sample_spec(np.random.default_rng(spec_seed))
        clips.append(_Clip(index, f"{folder:x}/{name}", spec, audio_seed))
    return clips


def _write_clip(job: tuple[_Clip, str, int, int]) -> tuple[int, float, float]:
    """Render one clip and write its mp3 atomically; returns (clip_id, RMS dBFS, peak)."""
    clip, path, sr, n = job
    audio = render_clip(clip.spec, clip.audio_seed, sr, n)
    buffer = io.BytesIO()
    sf.write(buffer, audio, sr, format="MP3")
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return clip.clip_id, float(dbfs(rms(audio))), float(np.abs(audio).max())


def _annotations(rows: Iterable[tuple[int, Iterable[str], str]]) -> str:
    """The CSV text of ``(clip_id, tags, mp3_path)`` rows: MTAT's tab-separated, fully quoted
    layout (also :mod:`resemul_core.data.synth_release`'s)."""
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["clip_id", *SYNTH_TAGS, "mp3_path"])
    for clip_id, tags, mp3_path in rows:
        on = set(tags)
        writer.writerow([clip_id, *(int(t in on) for t in SYNTH_TAGS), mp3_path])
    return text.getvalue()


def _params(num_clips: int, seed: int, sample_rate: int, duration: float) -> dict[str, Any]:
    """What a dataset's content depends on, saved next to it for :func:`ensure_dataset`."""
    return {
        "design": DESIGN,
        "num_clips": num_clips,
        "seed": seed,
        "sample_rate": sample_rate,
        "duration": duration,
    }


# --- writing a dataset folder (also synth_release's) --------------------------------------

_Result = TypeVar("_Result")


def worker_count(workers: int | None, jobs: int) -> int:
    """Processes for ``jobs`` jobs: ``workers`` (``None``: one per available CPU), at least one
    and at most ``jobs``."""
    if workers is None:
        workers = available_cpus()
    return max(1, min(int(workers or 1), jobs))


def map_in_processes(
    function: Callable[[Any], _Result], jobs: list[Any], workers: int, *, chunksize: int = 1
) -> Iterator[_Result]:
    """``function`` over ``jobs``, results in job order: in this process when ``workers`` is 1,
    else in a pool of ``workers`` processes."""
    if workers == 1:
        yield from map(function, jobs)
        return
    # spawn: a fresh interpreter is safe even when the caller holds threads (notebooks, torch),
    # where fork can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        yield from pool.map(function, jobs, chunksize=chunksize)


def remove_stale(root: Path, pattern: str, wanted: set[Path], what: str) -> None:
    """Delete the files under ``root`` matching ``pattern`` that are not ``wanted``: mp3s of an
    earlier, larger run into the same folder."""
    for stale in sorted(root.glob(pattern)):
        if stale not in wanted:
            stale.unlink()
            logger.info("removed %s, not part of this %s", stale, what)


def write_metadata(
    root: Path,
    params: dict[str, Any],
    summary: dict[str, Any],
    rows: Iterable[tuple[int, Iterable[str], str]],
) -> None:
    """Write :data:`PARAMS_FILE`, then ``annotations_final.csv`` of ``(clip_id, tags,
    mp3_path)`` rows: last, as its presence marks a complete folder (:func:`saved_summary`)."""
    write_json(root / PARAMS_FILE, {"params": params, "summary": summary})
    write_text(root / "annotations_final.csv", _annotations(rows))


def reuse_or_generate(
    root: Path, params: dict[str, Any], generate: Callable[[], dict], what: str
) -> dict:
    """The saved summary with ``"reused": True`` if ``root`` holds a complete folder made with
    ``params``; otherwise ``generate()``'s, with ``"reused": False``."""
    saved = saved_summary(root, params)
    if saved is not None:
        logger.info("%s already holds this %s; not regenerating", root, what)
        return {**saved, "reused": True}
    return {**generate(), "reused": False}


def generate_dataset(
    out: str | os.PathLike,
    *,
    num_clips: int = DEFAULT_NUM_CLIPS,
    seed: int = 0,
    sample_rate: int = 16000,
    duration: float = 29.1,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write a synthetic MTAT-format dataset (see the module docstring for its content).

    Args:
        out: dataset folder; receives ``annotations_final.csv`` and ``mp3/<0..f>/*.mp3``.
            Existing files of the same names are replaced; mp3s named like this generator's
            but not in this dataset (left by a larger earlier run) are removed. The CSV is
            written last, so its presence marks a complete dataset.
        num_clips: number of clips; with 25 or more every folder, hence every split, is used.
        seed: the same seed and arguments give byte-identical files.
        sample_rate: audio rate in Hz (MTAT: 16,000).
        duration: clip length in seconds (MTAT: 29.1); all clips have this length.
        workers: processes rendering clips in parallel (``None``: one per available CPU;
            ``1``: in this process).
        progress: show a tqdm progress bar.

    Returns:
        A summary: ``path``, ``clips``, ``splits`` (clips per train/valid/test), ``tags``
        (positives per tag, in :data:`SYNTH_TAGS` order), ``level_db`` ((min, max) clip RMS
        in dBFS), ``peak`` (largest absolute sample before encoding) and ``seconds`` (wall
        time).
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz, got {sample_rate}")
    if not duration > 0:
        raise ValueError(f"duration must be positive (seconds), got {duration}")
    workers = worker_count(workers, num_clips)
    started = time.perf_counter()
    root = Path(out)
    clips = _plan(num_clips, seed)
    n = round(duration * sample_rate)
    csv_path = root / "annotations_final.csv"
    csv_path.unlink(missing_ok=True)  # until the new one is written, the folder is incomplete
    jobs = [(clip, str(root / "mp3" / clip.mp3_path), sample_rate, n) for clip in clips]
    logger.info(
        "synthesising %d clips of %.1f s into %s (%d workers)", num_clips, duration, root, workers
    )
    results = []
    bar = tqdm(total=num_clips, desc="synth clips", unit="clip", disable=not progress)
    try:
        for result in map_in_processes(_write_clip, jobs, workers, chunksize=4):
            results.append(result)
            bar.update()
    finally:
        bar.close()
    wanted = {root / "mp3" / clip.mp3_path for clip in clips}
    remove_stale(root, "mp3/?/synthetic_artist_*-track-0-29.mp3", wanted, "dataset")
    levels = [level for _, level, _ in results]
    splits = {"train": 0, "valid": 0, "test": 0}
    tag_counts = dict.fromkeys(SYNTH_TAGS, 0)
    for clip in clips:
        splits[mtat_split(clip.mp3_path)] += 1
        for tag in clip.spec.tags:
            tag_counts[tag] += 1
    summary = {
        "path": str(root),
        "clips": num_clips,
        "splits": splits,
        "tags": tag_counts,
        "level_db": (round(min(levels), 2), round(max(levels), 2)),
        "peak": round(max(peak for _, _, peak in results), 4),
        "seconds": round(time.perf_counter() - started, 2),
    }
    rows = ((clip.clip_id, clip.spec.tags, clip.mp3_path) for clip in clips)
    write_metadata(root, _params(num_clips, seed, sample_rate, duration), summary, rows)
    logger.info("wrote %d clips (%s) in %.1f s", num_clips, splits, summary["seconds"])
    return summary


def ensure_dataset(
    out: str | os.PathLike,
    *,
    num_clips: int = DEFAULT_NUM_CLIPS,
    seed: int = 0,
    sample_rate: int = 16000,
    duration: float = 29.1,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """:func:`generate_dataset`, unless ``out`` already holds a complete dataset made with the
    same parameters; then its saved summary is returned with ``"reused": True``."""
    root = Path(out)

    def generate() -> dict:
        return generate_dataset(
            root,
            num_clips=num_clips,
            seed=seed,
            sample_rate=sample_rate,
            duration=duration,
            workers=workers,
            progress=progress,
        )

    params = _params(num_clips, seed, sample_rate, duration)
    return reuse_or_generate(root, params, generate, "synthetic dataset")


def saved_summary(root: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The summary saved with the complete dataset in ``root`` if it was made with ``params``
    (its ``annotations_final.csv``, written last, marks it complete); otherwise None."""
    saved = root / PARAMS_FILE
    if not ((root / "annotations_final.csv").is_file() and saved.is_file()):
        return None
    try:
        record = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record["summary"] if record.get("params") == params else None
