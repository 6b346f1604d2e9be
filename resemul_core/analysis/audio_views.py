"""Listening to and looking at a store's clips: players, waveforms, RMS and mel spectrograms.

Public: :data:`DEFAULT_LISTENING_TAGS`, :func:`tag_examples`, :func:`audio_player`,
:func:`audio_table`, :func:`plot_audio_views`; also importable from
:mod:`resemul_core.analysis.plots`.

Everything here reads the samples the model is trained on (the store's 22,050 Hz segments,
concatenated), not the original files. The displays use librosa: ``librosa.display.waveshow``
for the waveform, ``librosa.feature.rms`` with ``librosa.amplitude_to_db`` for the level over
time, and ``librosa.feature.melspectrogram`` with ``librosa.power_to_db`` and
``librosa.display.specshow`` for the spectrogram. Levels are in dB relative to a full-scale
amplitude of 1 and every row shares one colour scale, so quiet and loud clips look different.
"""

from __future__ import annotations

import html
import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import soundfile as sf
from IPython.display import HTML, Audio
from matplotlib.figure import Figure

from resemul_core.analysis.figure_common import PAGE_WIDTH, finish, new_figure
from resemul_core.data.store import SegmentStore

# librosa loads its submodules lazily, and one of them imports tqdm.auto, which warns in a
# kernel without ipywidgets the first time a librosa function runs; the warning would land in
# the executed notebook, so this one message is ignored for the process, not just the import
warnings.filterwarnings("ignore", message="IProgress not found")
import librosa  # noqa: E402
import librosa.display  # noqa: E402

__all__ = [
    "DEFAULT_LISTENING_TAGS",
    "tag_examples",
    "excerpt",
    "audio_player",
    "audio_table",
    "plot_audio_views",
]

#: Tags to listen to by default: two genres and the two loudness tags (all MTAT top-50 tags,
#: and tags of the synthetic dataset).
DEFAULT_LISTENING_TAGS = ("classical", "techno", "quiet", "loud")

_HOP = 512
_N_FFT = 2048
_N_MELS = 96
_DB_SPAN = 80.0  # dB shown below the loudest mel bin of all rows


def tag_examples(
    store: SegmentStore,
    tags: Sequence[str] | None = None,
    *,
    per_tag: int = 1,
    split: str | None = None,
) -> pd.DataFrame:
    """A few clips for each of some tags, each clip used once.

    Args:
        store: the segment store.
        tags: the tags to show; default: those of :data:`DEFAULT_LISTENING_TAGS` the store has,
            else its first four tags.
        per_tag: clips per tag.
        split: take clips from this split only; default: any.

    Returns:
        One row per clip, in tag order: ``tag``, ``clip`` (the store index), ``clip_id`` and
        ``tags`` (all the clip's tags). For contrast a clip that carries none of the other
        listed tags is preferred; clips come in store order, so the choice is reproducible.
    """
    names = list(store.tags)
    if tags is None:
        tags = [t for t in DEFAULT_LISTENING_TAGS if t in names] or names[:4]
    missing = [t for t in tags if t not in names]
    if missing:
        raise ValueError(f"unknown tag(s) {missing}; tags: {', '.join(names)}")
    labels = np.asarray(store.labels, dtype=bool)
    allowed = np.ones(len(labels), dtype=bool)
    if split is not None:
        allowed[:] = False
        allowed[store.split_indices(split)] = True
    columns = [names.index(t) for t in tags]
    used: set[int] = set()
    rows = []
    for tag, column in zip(tags, columns, strict=True):
        others = [c for c in columns if c != column]
        carriers = np.flatnonzero(labels[:, column] & allowed)
        pure = [i for i in carriers if not labels[i, others].any()]
        picked = [int(i) for i in [*pure, *carriers] if int(i) not in used]
        for i in list(dict.fromkeys(picked))[:per_tag]:
            used.add(i)
            rows.append(
                {
                    "tag": tag,
                    "clip": i,
                    "clip_id": store.clips["clip_id"].iat[i],
                    "tags": ", ".join(n for n, on in zip(names, labels[i], strict=True) if on),
                }
            )
    return pd.DataFrame(rows, columns=["tag", "clip", "clip_id", "tags"])


def excerpt(store: SegmentStore, clip: int, *, seconds: float = 5.0) -> np.ndarray:
    """The first ``seconds`` of a clip's stored segments, concatenated: float32 in [-1, 1)."""
    waveform = store.read_clip(int(clip)).reshape(-1)
    return waveform[: int(round(seconds * store.sample_rate))]


def audio_player(
    waveform: np.ndarray, sample_rate: int, *, rate: int = 16_000, compress: bool = True
) -> Audio:
    """An embedded player for ``waveform``, at its own level (not normalised).

    Args:
        waveform: ``(samples,)`` mono audio in [-1, 1].
        sample_rate: its rate in Hz.
        rate: the player's rate; resampled with librosa (soxr) when it differs. MTAT's mp3s
            are 16 kHz, so 16,000 loses nothing the dataset had.
        compress: embed an MP3 (about a tenth of the WAV's size) where libsndfile can write
            one, else a 16-bit WAV.
    """
    audio = np.asarray(waveform, dtype=np.float32)
    if rate != sample_rate:
        audio = librosa.resample(audio, orig_sr=sample_rate, target_sr=rate)
    audio = np.clip(audio, -1.0, 1.0)
    if compress and "MP3" in sf.available_formats():
        buffer = io.BytesIO()
        sf.write(buffer, audio, rate, format="MP3", subtype="MPEG_LAYER_III")
        player = Audio(data=buffer.getvalue(), rate=rate)
        player.mimetype = "audio/mpeg"
        return player
    return Audio(data=audio, rate=rate, normalize=False)


def audio_table(
    store: SegmentStore, examples: pd.DataFrame, *, seconds: float = 5.0, rate: int = 16_000
) -> HTML:
    """One HTML table of players for :func:`tag_examples`' rows: tag, clip, its tags, audio.

    Each player holds the first ``seconds`` of the clip as the model sees it (the stored
    segments), at its own level.
    """
    cells = []
    for row in examples.itertuples():
        player = audio_player(
            excerpt(store, row.clip, seconds=seconds), store.sample_rate, rate=rate
        )
        cells.append(
            "<tr>"
            f"<td><b>{html.escape(str(row.tag))}</b></td>"
            f"<td>{html.escape(str(row.clip_id))}</td>"
            f"<td>{html.escape(str(row.tags))}</td>"
            f"<td>{player._repr_html_()}</td>"
            "</tr>"
        )
    head = "<tr><th>tag</th><th>clip</th><th>all its tags</th><th>first seconds</th></tr>"
    return HTML(f"<table>{head}{''.join(cells)}</table>")


def plot_audio_views(
    store: SegmentStore,
    examples: pd.DataFrame,
    *,
    seconds: float = 5.0,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Waveform, RMS level and mel spectrogram of each example clip, one row per clip.

    Args:
        store: the segment store.
        examples: :func:`tag_examples` rows (``tag``, ``clip``, ``clip_id``).
        seconds: how much of each clip, from its start.
        path: also save the figure there as PNG.

    Returns:
        A figure of ``len(examples)`` rows and three columns: ``librosa.display.waveshow``; the
        frame RMS (``librosa.feature.rms``, 2,048-sample frames, hop 512) in dB
        (``librosa.amplitude_to_db`` with reference 1); the mel power spectrogram (96 bands)
        in dB (``librosa.power_to_db`` with reference 1; one colour scale for all rows,
        from the loudest bin down by 80 dB).
    """
    if examples.empty:
        raise ValueError("no example clips to show")
    sr = store.sample_rate
    n = len(examples)
    figure, axes = new_figure(
        3,
        nrows=n,
        width=PAGE_WIDTH,
        height=1.9 * n + 0.6,
        style="white",
        gridspec_kw={"width_ratios": [1.0, 0.8, 1.2]},
    )
    clips = [excerpt(store, row.clip, seconds=seconds) for row in examples.itertuples()]
    mels = [
        librosa.power_to_db(
            librosa.feature.melspectrogram(
                y=y, sr=sr, n_fft=_N_FFT, hop_length=_HOP, n_mels=_N_MELS
            ),
            ref=1.0,
            top_db=None,
        )
        for y in clips
    ]
    top = max(float(np.max(m)) for m in mels)  # one colour scale: the loudest bin, 80 dB down
    ticks = np.arange(0, math.floor(max(len(y) for y in clips) / sr) + 1)
    image = None
    for k, (row, y, mel) in enumerate(zip(examples.itertuples(), clips, mels, strict=True)):
        wave_ax, rms_ax, mel_ax = axes[3 * k : 3 * k + 3]
        librosa.display.waveshow(y, sr=sr, ax=wave_ax, color="tab:blue")
        wave_ax.set(ylim=(-1, 1), ylabel=f"{row.tag}\n(clip {row.clip_id})", xlabel="")
        rms = librosa.feature.rms(y=y, frame_length=_N_FFT, hop_length=_HOP)[0]
        level = librosa.amplitude_to_db(rms, ref=1.0, amin=1e-5, top_db=None)
        times = librosa.times_like(rms, sr=sr, hop_length=_HOP)
        rms_ax.plot(times, level, color="tab:orange")
        rms_ax.set(ylim=(-60, 0), xlim=(0, len(y) / sr), xlabel="", ylabel="RMS (dB)")
        rms_ax.grid(True, alpha=0.4)
        image = librosa.display.specshow(
            mel,
            sr=sr,
            hop_length=_HOP,
            x_axis="time",
            y_axis="mel",
            ax=mel_ax,
            vmin=top - _DB_SPAN,
            vmax=top,
            cmap="magma",
        )
        mel_ax.set(xlabel="", ylabel="Hz")
        for ax in (wave_ax, rms_ax, mel_ax):
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
        if k == 0:
            wave_ax.set_title("waveform")
            rms_ax.set_title("RMS level over time")
            mel_ax.set_title("mel spectrogram")
    for ax in axes[-3:]:
        ax.set_xlabel("seconds")
    figure.colorbar(image, ax=axes[2::3], label="power (dB)", shrink=0.8)
    return finish(figure, path)
