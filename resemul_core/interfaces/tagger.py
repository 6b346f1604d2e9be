"""Tag music with a trained model: whole songs, taggrams over time, embeddings.

Public: :class:`Tagger`, :class:`TagResult`, :data:`SEGMENT_MODES`, :func:`segment_starts`.
Many files at once (folders, CSV, embeddings files): :mod:`resemul_core.interfaces.tag_files`.

Audio is decoded as the store's audio was (mono, resampled to the checkpoint's rate by
:mod:`resemul_core.data.audio`) and cut into segments of the model's input length
(59,049 samples, 2.68 s at the paper's settings). Which segments, is the ``segments`` mode:

* ``"whole"`` (the default): every whole segment of the file, back to back from its start; the
  tail after the last whole segment is left out. A 4-minute song is 89 segments. The file is
  decoded block by block, so an hour-long file needs little memory.
* ``"spread"``: ``num_segments`` whole segments spread evenly from the start to the end of the
  file (all of them if it has fewer): a fixed cost per file whatever its length.
* ``"first"``: the first ``num_segments`` segments of the first ``duration`` seconds, decoded
  exactly as the training store was (by default the checkpoint's: 10 segments of the first
  29 s for MagnaTagATune); the paper's test protocol (specification §3), for training clips.

Audio shorter than one segment is zero-padded to one segment, and a WARNING saying so is
logged. The segments' sigmoid outputs are the *taggram* (tag probabilities over time); their
mean over segments is the clip-level prediction (the test protocol). Each segment's
*embedding* is its blocks' outputs max-pooled over time (by default the last three blocks',
concatenated: the multi-level features of the paper).

Speed: with ``precision="fast"`` (the default) the CPU runs the float32 copy of
:func:`~resemul_core.model.inference.inference_model` (BatchNorm folded, the large first maps
one segment at a time): about 3x the eager float32 forward, probabilities within 1e-4 of it.
``"fp32"`` is evaluation's exact path; ``"bf16"`` is faster again but only as faithful as bf16
(clip probabilities off by up to a few hundredths). The forward loop is
:func:`~resemul_core.model.inference.run_model`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from resemul_core.data.audio import (
    SAMPLE_RATE,
    SEGMENTS_PER_CLIP,
    audio_duration,
    load_audio,
    segment_waveform,
    stream_audio,
)
from resemul_core.model.inference import clip_average, inference_model, run_model
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.runtime import select_device

__all__ = [
    "SEGMENT_MODES",
    "TagResult",
    "Tagger",
    "segment_starts",
]

logger = logging.getLogger(__name__)

#: The ways of choosing a file's segments (module docstring).
SEGMENT_MODES = ("whole", "spread", "first")
Audio = str | os.PathLike | np.ndarray | torch.Tensor

# Seconds decoded per step when streaming. Long blocks, because libsndfile's MP3 decoder can
# recover differently from a damaged frame when a read starts nearby: clean files decode
# identically in any block size, and a 29 s training clip always decodes in one piece.
_BLOCK_SECONDS = 30.0


def segment_starts(
    num_samples: int, segment_length: int, mode: str, num_segments: int | None = None
) -> np.ndarray:
    """Where a file's segments start, in samples: ``(S,)`` int64, ascending.

    Args:
        num_samples: the audio's length in samples.
        segment_length: samples per segment.
        mode: one of :data:`SEGMENT_MODES`.
        num_segments: segments wanted ("spread", "first"); ``None``: every whole segment.

    Returns:
        ``[0]`` for audio shorter than one segment (it is zero-padded); otherwise every
        ``k * segment_length`` ("whole"; "first" keeps the first ``num_segments``), or
        ``num_segments`` starts rounded from an even spacing of ``0 ... num_samples -
        segment_length`` ("spread", which is "whole" when the file has no more segments).
    """
    if mode not in SEGMENT_MODES:
        raise ValueError(f"unknown segments mode {mode!r}; valid: {', '.join(SEGMENT_MODES)}")
    if num_segments is not None and num_segments < 1:
        raise ValueError(f"num_segments must be >= 1 or None, got {num_segments}")
    whole = num_samples // segment_length
    if whole == 0:
        return np.zeros(1, dtype=np.int64)
    if mode == "spread" and num_segments is not None and num_segments < whole:
        if num_segments == 1:  # the middle of the file
            return np.array([(num_samples - segment_length) // 2], dtype=np.int64)
        spaced = np.linspace(0, num_samples - segment_length, num_segments)
        return np.round(spaced).astype(np.int64)
    count = whole if mode != "first" or num_segments is None else min(whole, num_segments)
    return np.arange(count, dtype=np.int64) * segment_length


@dataclass(frozen=True)
class TagResult:
    """What tagging one piece of audio gives.

    Attributes:
        source: the file's path, or ``"<waveform>"``.
        tags: the tag names, in output order.
        starts: ``(S,)`` float64, each segment's start in seconds.
        probabilities: ``(S, T)`` float32, each segment's tag probabilities (the taggram).
        embeddings: ``(S, F)`` float32, each segment's embedding, if asked for.
        duration: seconds of audio the segments were cut from.
        segment_seconds: the length of one segment in seconds.
        mode: the :data:`SEGMENT_MODES` entry used.
        note: what was done out of the ordinary (a file shorter than one segment), or None.
    """

    source: str
    tags: list[str]
    starts: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    duration: float
    segment_seconds: float
    mode: str
    note: str | None = None

    @property
    def clip_probabilities(self) -> np.ndarray:
        """``(T,)`` float32: the mean over segments of their probabilities (computed as
        evaluation computes it, :func:`~resemul_core.model.inference.clip_average`)."""
        probs = torch.from_numpy(self.probabilities)
        return clip_average(probs, [len(probs)])[0].numpy()

    def top(self, k: int | None = 5) -> list[tuple[str, float]]:
        """The ``k`` most probable tags (all for ``None``), most probable first."""
        probs = self.clip_probabilities
        order = np.argsort(-probs, kind="stable")[: k if k is not None else None]
        return [(self.tags[i], float(probs[i])) for i in order]

    def taggram(self) -> pd.DataFrame:
        """Tag probabilities over time: one row per segment, indexed by its start in seconds
        (``time``), one column per tag."""
        index = pd.Index(self.starts, name="time")
        return pd.DataFrame(self.probabilities, index=index, columns=self.tags)

    def embedding(self) -> np.ndarray:
        """``(F,)`` float32: the file's embedding, the mean of its segments'."""
        if self.embeddings is None:
            raise ValueError("this result has no embeddings (tag with embeddings=True)")
        return self.embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)


class Tagger:
    """Tag probabilities, taggrams and embeddings of audio files or waveforms of any length.

    Args:
        model: a trained :class:`~resemul_core.model.sample_cnn.SampleCNN`.
        tags: its ``num_tags`` tag names, in output order.
        sample_rate: Hz the model was trained at (audio is resampled to it).
        segments: one of :data:`SEGMENT_MODES` (module docstring); ``"whole"`` by default.
        num_segments: segments per file for "spread" and "first" (default: the training
            store's segments per clip, 10 for MTAT).
        duration: seconds decoded from the start of a file in "first" mode (default: what
            ``num_segments`` needs).
        device: a ``torch.device`` or a name ("auto", "cpu", "cuda", ...).
        batch_size: segments per forward pass.
        precision: ``"fast"`` (float32, within 1e-4 of the reference; the default),
            ``"fp32"`` (evaluation's exact forward) or ``"bf16"`` (fastest, not faithful to
            float32): :func:`~resemul_core.model.inference.inference_model`.
        embedding_blocks: the blocks (1 = the first) whose pooled outputs make an embedding;
            default the last three.
    """

    def __init__(
        self,
        model: SampleCNN,
        tags: Sequence[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        segments: str = "whole",
        num_segments: int | None = None,
        duration: float | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        precision: str = "fast",
        embedding_blocks: Sequence[int] | None = None,
    ) -> None:
        if len(tags) != model.config.num_tags:
            raise ValueError(
                f"{len(tags)} tag names for a model with {model.config.num_tags} outputs"
            )
        segment_starts(1, 1, segments, num_segments)  # checks both
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = select_device(str(device))
        self.model = model.to(self.device).eval()
        self.precision = precision
        self._runner = inference_model(self.model, precision=precision)
        self.tags = list(tags)
        self.sample_rate = int(sample_rate)
        self.segment_length = model.config.segment_length
        self.segments = segments
        self.num_segments = num_segments or SEGMENTS_PER_CLIP
        self.duration = duration
        self.batch_size = batch_size
        num_blocks = model.config.num_blocks
        blocks = embedding_blocks or range(max(1, num_blocks - 2), num_blocks + 1)
        self.embedding_blocks = [int(b) for b in blocks]
        if not all(1 <= b <= num_blocks for b in self.embedding_blocks):
            raise ValueError(f"embedding blocks must lie in 1..{num_blocks}, got {blocks}")

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        variant: str | None = None,
        device: str = "auto",
        **options,
    ) -> Tagger:
        """A tagger for a checkpoint file, a run directory (its ``best.pt``), or one of the
        authors' Keras files (``.hdf5``/``.h5``, with ``variant``: converted once and cached,
        :func:`~resemul_core.model.keras_import.cached_keras_checkpoint`).

        Args:
            path: the checkpoint, run directory or Keras file.
            variant: the variant a Keras file holds (``"se-multi"``, ``"rese2-multi"``).
            device: "auto" (CUDA if present), "cpu", "cuda", ...
            **options: any other argument of :class:`Tagger`; ``num_segments`` and
                ``duration`` default to the training store's (checkpoints without audio
                settings get the paper's: 22,050 Hz, 10 segments of the first 29 s).
        """
        from resemul_core.training.run_dir import load_model

        path = Path(path)
        if path.suffix.lower() in (".hdf5", ".h5"):
            if variant is None:
                raise ValueError(
                    f"{path} is a Keras file: give the variant it holds "
                    "(--variant se-multi or rese2-multi)"
                )
            from resemul_core.model.keras_import import cached_keras_checkpoint

            path = cached_keras_checkpoint(path, variant=variant)
        torch_device = select_device(device)
        model, payload = load_model(path, map_location=torch_device)
        if variant is not None and model.config.variant != variant:
            raise ValueError(f"{path} holds {model.config.variant}, not {variant}")
        audio = payload.get("audio") or {}
        tags = payload.get("tags") or [f"tag{i}" for i in range(model.config.num_tags)]
        options.setdefault("sample_rate", audio.get("sample_rate", SAMPLE_RATE))
        options.setdefault("num_segments", audio.get("segments_per_clip", SEGMENTS_PER_CLIP))
        options.setdefault("duration", audio.get("duration"))
        return cls(model, tags, device=torch_device, **options)

    # --- the one path every call takes -----------------------------------------------------

    def analyse(
        self,
        audio: Audio,
        *,
        segments: str | None = None,
        num_segments: int | None = None,
        embeddings: bool = False,
    ) -> TagResult:
        """Tag some audio: per-segment probabilities (and embeddings), with their times.

        Args:
            audio: a file path (mp3, wav, flac, ogg; any rate, mono or multichannel), or a
                waveform at :attr:`sample_rate` in [-1, 1]: ``(samples,)`` or
                ``(channels, samples)`` (channels are averaged).
            segments, num_segments: this call's segment choice (default: the tagger's).
            embeddings: also compute each segment's embedding.
        """
        mode = segments or self.segments
        batches, plan = self.segment_batches(audio, segments=mode, num_segments=num_segments)
        source = str(audio) if isinstance(audio, (str, os.PathLike)) else "<waveform>"
        return self.result_from_batches(source, batches, plan, mode=mode, embeddings=embeddings)

    def result_from_batches(
        self,
        source: str,
        batches: Iterable[np.ndarray],
        plan: Callable[[], tuple[np.ndarray, float, str | None]],
        *,
        mode: str,
        embeddings: bool = False,
    ) -> TagResult:
        """Run the model over ``batches`` and assemble the result, once they are exhausted
        (``batches`` and ``plan`` as :meth:`segment_batches` returns them; they may come from
        another thread that decodes ahead, as in
        :func:`~resemul_core.interfaces.tag_files.tag_files`)."""
        probs, embeds = self._run(batches, embeddings=embeddings)
        starts, duration, note = plan()
        if note:
            logger.warning("%s: %s", source, note)
        return TagResult(
            source=source,
            tags=self.tags,
            starts=starts / self.sample_rate,
            probabilities=probs,
            embeddings=embeds,
            duration=duration,
            segment_seconds=self.segment_length / self.sample_rate,
            mode=mode,
            note=note,
        )

    def segment_batches(
        self, audio: Audio, *, segments: str | None = None, num_segments: int | None = None
    ) -> tuple[Iterator[np.ndarray], Callable[[], tuple[np.ndarray, float, str | None]]]:
        """The model inputs for some audio, decoded lazily in ``(b, L)`` float32 batches.

        Returns:
            ``(batches, plan)``: an iterator of batches, and a function to call once the
            iterator is exhausted, returning ``(starts in samples (S,), seconds of audio,
            note or None)``.
        """
        mode = segments or self.segments
        count = num_segments or self.num_segments
        length = self.segment_length
        if not isinstance(audio, (str, os.PathLike)):
            waveform = _as_waveform(audio)
            starts = segment_starts(waveform.size, length, mode, count)
            cut = _cut(waveform, starts, length)
            batches = iter(np.array_split(cut, max(1, math.ceil(len(cut) / self.batch_size))))
            info = (starts, waveform.size / self.sample_rate, _short_note(waveform.size, self))
            return batches, lambda: info
        path = Path(audio)
        if mode == "first":  # decoded in one piece, exactly as the store was
            duration = self.duration or math.ceil(count * length / self.sample_rate * 1e3) / 1e3
            waveform = load_audio(path, sample_rate=self.sample_rate, duration=duration)
            return self.segment_batches(waveform, segments="first", num_segments=count)
        state: dict = {}
        return _batched(self._stream(path, mode, count, state), self.batch_size), lambda: (
            state["starts"],
            state["samples"] / self.sample_rate,
            state.get("note") or _short_note(state["samples"], self),
        )

    def _stream(self, path: Path, mode: str, count: int, state: dict) -> Iterator[np.ndarray]:
        """Segments of a file in "whole" or "spread" mode, decoded block by block; fills
        ``state`` with the starts used and the number of samples decoded."""
        length, rate = self.segment_length, self.sample_rate
        if mode == "spread":
            expected = round(audio_duration(path) * rate)  # from the header: may be off a bit
            wanted: Iterable[int] = segment_starts(expected, length, mode, count).tolist()
        else:
            wanted = itertools.count(0, length)
        blocks = stream_audio(path, sample_rate=rate, block_seconds=_BLOCK_SECONDS)
        starts: list[int] = []
        buffer, offset = np.zeros(0, np.float32), 0  # buffer[0] is sample `offset` of the file
        pending = iter(wanted)
        start = next(pending, None)
        for block in blocks:
            buffer = np.concatenate([buffer, block])
            while start is not None and start + length <= offset + buffer.size:
                starts.append(start)
                yield buffer[start - offset : start - offset + length]
                start = next(pending, None)
            keep_from = (start if start is not None else offset + buffer.size) - offset
            keep_from = max(0, min(keep_from, buffer.size))
            buffer, offset = buffer[keep_from:], offset + keep_from
            if start is None:
                break
        samples = offset + buffer.size
        for block in blocks:  # only the length is still needed
            samples += block.size
        if not starts:  # shorter than one segment: zero-padded
            starts.append(0)
            padded = np.zeros(length, np.float32)
            padded[: buffer.size] = buffer[:length]
            yield padded
        state.update(starts=np.asarray(starts, dtype=np.int64), samples=samples)
        if mode == "spread" and len(starts) < min(count, samples // length):
            # a header (an MP3's without an Xing frame) that overstated the length
            state["note"] = (
                f"the file's header promised {expected / rate:.1f} s but it decoded to "
                f"{samples / rate:.1f} s: {len(starts)} of {count} spread segments were found"
            )

    def _run(
        self, batches: Iterable[np.ndarray], *, embeddings: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(S, T)`` probabilities and ``(S, F)`` embeddings (or None) of the batches."""
        probs, embeds = [], []
        blocks = [b - 1 for b in self.embedding_blocks]
        for out in run_model(
            self._runner,
            batches,
            device=self.device,
            precision=self._run_precision(),
            pooled=embeddings,
        ):
            probs.append(torch.sigmoid(out.logits).cpu().numpy())
            if embeddings:
                embeds.append(torch.cat([out.pooled[b] for b in blocks], dim=1).cpu().numpy())
        return (
            np.concatenate(probs).astype(np.float32, copy=False),
            np.concatenate(embeds).astype(np.float32, copy=False) if embeddings else None,
        )

    def _run_precision(self) -> str:
        """What :func:`run_model` applies around the model: a CPU's fast model carries its
        own precision; on a GPU "bf16" is bf16 autocast and "fast" the float32 model."""
        if self.precision == "bf16" and self.device.type != "cpu":
            return "bf16"
        return "fp32"

    # --- conveniences ----------------------------------------------------------------------

    def predict(self, audio: Audio, **choice) -> np.ndarray:
        """Clip-level tag probabilities: ``(T,)`` float32, the mean over the segments of
        their sigmoid outputs. ``audio`` and ``choice`` as in :meth:`analyse`."""
        return self.analyse(audio, **choice).clip_probabilities

    def tag(self, audio: Audio, *, top_k: int | None = 5, **choice) -> list[tuple[str, float]]:
        """The ``top_k`` most probable tags (all for ``None``) as ``(tag, probability)``
        pairs, most probable first."""
        return self.analyse(audio, **choice).top(top_k)

    def taggram(self, audio: Audio, **choice) -> pd.DataFrame:
        """Tag probabilities over time: a DataFrame indexed by each segment's start in
        seconds (``time``), one column per tag (:meth:`TagResult.taggram`)."""
        return self.analyse(audio, **choice).taggram()

    def embed(
        self, audio: Audio, *, per: Literal["segment", "file"] = "segment", **choice
    ) -> np.ndarray:
        """Embeddings: ``(S, F)`` float32 per segment, or ``(F,)`` for the file (the mean).

        ``F`` is the sum of the channels of :attr:`embedding_blocks` (1,024 for the last
        three blocks at the paper's width: 256 + 256 + 512)."""
        result = self.analyse(audio, embeddings=True, **choice)
        return result.embeddings if per == "segment" else result.embedding()


def _as_waveform(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    """A mono ``(samples,)`` float32 waveform from ``(samples,)`` or ``(channels, samples)``."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().numpy()
    waveform = np.asarray(audio, dtype=np.float32)
    if waveform.ndim == 2:
        if waveform.shape[0] > waveform.shape[1]:
            raise ValueError(
                f"expected a waveform of shape (channels, samples), found {waveform.shape}"
            )
        waveform = waveform.mean(axis=0)
    if waveform.ndim != 1 or waveform.size == 0:
        raise ValueError(
            f"expected a non-empty waveform (samples,) or (channels, samples), "
            f"found shape {waveform.shape}"
        )
    return waveform


def _cut(waveform: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``(S, length)`` float32 segments at ``starts``; one zero-padded if the audio is short."""
    if waveform.size < length:
        return segment_waveform(waveform, segment_length=length, max_segments=1, pad=True)
    return np.stack([waveform[s : s + length] for s in starts]).astype(np.float32, copy=False)


def _short_note(samples: int, tagger: Tagger) -> str | None:
    if samples >= tagger.segment_length:
        return None
    return (
        f"{samples / tagger.sample_rate:.2f} s of audio is shorter than one segment "
        f"({tagger.segment_length / tagger.sample_rate:.2f} s): zero-padded to one segment"
    )


def _batched(segments: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """``(b, L)`` batches of at most ``size`` segments, copied out of the decode buffer."""
    iterator = iter(segments)
    while batch := list(itertools.islice(iterator, size)):
        yield np.stack(batch)
