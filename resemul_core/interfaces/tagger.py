"""Tag audio files with a trained model: decode, cut into segments, average the predictions.

Public: :class:`Tagger`.

New audio is decoded and cut the way the store's audio was prepared
(:func:`~resemul_core.data.audio.load_audio` then
:func:`~resemul_core.data.audio.segment_waveform`), with the sample rate, segment length and
segments per clip recorded in the checkpoint, with one difference: the segments stay float32,
whereas the store keeps its segments as 16-bit integers (a rounding of at most half a step of
1/32,768). The clip-level prediction is the mean of the segments' sigmoid outputs (the test
protocol, specification §3): the forward loop and the clip average are
:mod:`resemul_core.model.inference`'s.

Public: :class:`TagTable` too, the DataFrame :func:`tag_store_clips` returns, which displays
its tag lists in full.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from resemul_core.data.audio import SAMPLE_RATE, SEGMENTS_PER_CLIP, load_audio, segment_waveform
from resemul_core.data.store import SegmentStore
from resemul_core.model.inference import clip_average, run_model
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.runtime import select_device
from resemul_core.training.run_dir import load_model

__all__ = ["TagTable", "Tagger", "tag_store_clips"]

logger = logging.getLogger(__name__)


class Tagger:
    """Predict tag probabilities for audio files or waveforms of any length.

    Args:
        model: a trained :class:`~resemul_core.model.sample_cnn.SampleCNN`.
        tags: its ``num_tags`` tag names, in output order.
        sample_rate: Hz the model was trained at (audio is resampled to it).
        segments_per_clip: segments taken from the start of the audio, as in preprocessing
            (10 for MTAT); ``None`` uses every whole segment of the file.
        duration: seconds decoded from the start of a file; ``None`` decodes what
            ``segments_per_clip`` needs (the whole file if that is ``None``).
        device: where to run the model: a ``torch.device`` or a name for
            :func:`~resemul_core.runtime.select_device` ("auto", "cpu", "cuda", ...).
        batch_size: segments per forward pass.

    Note:
        Audio shorter than one segment (2.68 s at the paper's settings) is zero-padded to one
        segment; the official pipeline would have skipped such a clip. The tail after the last
        whole segment is ignored, as in preprocessing.
    """

    def __init__(
        self,
        model: SampleCNN,
        tags: Sequence[str],
        *,
        sample_rate: int = SAMPLE_RATE,
        segments_per_clip: int | None = SEGMENTS_PER_CLIP,
        duration: float | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
    ) -> None:
        if len(tags) != model.config.num_tags:
            raise ValueError(
                f"{len(tags)} tag names for a model with {model.config.num_tags} outputs"
            )
        if segments_per_clip is not None and segments_per_clip < 1:
            raise ValueError(f"segments_per_clip must be >= 1 or None, got {segments_per_clip}")
        self.device = select_device(str(device))
        self.model = model.to(self.device).eval()
        self.tags = list(tags)
        self.sample_rate = int(sample_rate)
        self.segment_length = model.config.segment_length
        self.segments_per_clip = segments_per_clip
        if duration is None and segments_per_clip is not None:
            # whole milliseconds, rounded up, so the decoded audio holds every needed sample
            needed = segments_per_clip * self.segment_length / self.sample_rate
            duration = math.ceil(needed * 1000) / 1000
        self.duration = duration
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        segments_per_clip: int | None | Literal["checkpoint"] = "checkpoint",
        batch_size: int = 32,
    ) -> Tagger:
        """A tagger for a checkpoint file or run directory, cutting audio as its store did.

        Args:
            path: a checkpoint or a run directory (its ``best.pt``).
            device: "auto" (CUDA if present), "cpu", "cuda", ...
            segments_per_clip: ``"checkpoint"`` (the training store's value), an int, or
                ``None`` for every whole segment.

        Note:
            Checkpoints without audio settings (not written by
            :func:`~resemul_core.training.loop.train`) get the paper's: 22,050 Hz, 10 segments.
        """
        torch_device = select_device(device)
        model, payload = load_model(path, map_location=torch_device)
        audio = payload.get("audio") or {}
        tags = payload.get("tags") or [f"tag{i}" for i in range(model.config.num_tags)]
        if segments_per_clip == "checkpoint":
            segments_per_clip = audio.get("segments_per_clip", SEGMENTS_PER_CLIP)
        return cls(
            model,
            tags,
            sample_rate=audio.get("sample_rate", SAMPLE_RATE),
            segments_per_clip=segments_per_clip,
            duration=audio.get("duration"),
            device=torch_device,
            batch_size=batch_size,
        )

    def segments(self, audio: str | os.PathLike | np.ndarray | torch.Tensor) -> np.ndarray:
        """The model inputs for some audio: ``(num_segments, segment_length)`` float32.

        Args:
            audio: a file path (mp3, wav, flac, ogg; any rate, mono or multichannel), or a
                waveform at :attr:`sample_rate` in [-1, 1]: ``(samples,)`` or
                ``(channels, samples)`` (channels are averaged).
        """
        if isinstance(audio, (str, os.PathLike)):
            waveform = load_audio(Path(audio), sample_rate=self.sample_rate, duration=self.duration)
        else:
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
        return segment_waveform(
            waveform,
            segment_length=self.segment_length,
            max_segments=self.segments_per_clip,
            pad=True,
        )

    def predict(self, audio: str | os.PathLike | np.ndarray | torch.Tensor) -> np.ndarray:
        """Tag probabilities of some audio: ``(num_tags,)`` float32, the mean over its segments
        of the sigmoid outputs, computed in float32 (as in evaluation). ``audio`` as in
        :meth:`segments`."""
        segments = torch.from_numpy(self.segments(audio))  # S, L
        batches = torch.split(segments, self.batch_size)
        probs = torch.cat(
            [
                torch.sigmoid(out.logits).cpu()  # s, T
                for out in run_model(self.model, batches, device=self.device, precision="fp32")
            ]
        )  # S, T
        return clip_average(probs, [len(probs)])[0].numpy()  # T

    def tag(
        self, audio: str | os.PathLike | np.ndarray | torch.Tensor, *, top_k: int | None = 5
    ) -> list[tuple[str, float]]:
        """The ``top_k`` most probable tags (all for ``None``) as ``(tag, probability)`` pairs,
        most probable first. ``audio`` as in :meth:`segments`."""
        probs = self.predict(audio)
        order = np.argsort(-probs, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        return [(self.tags[k], float(probs[k])) for k in order]


# pandas display options under which no cell and no column is left out
_IN_FULL = ("display.max_colwidth", None, "display.max_columns", None, "display.width", 0)


class TagTable(pd.DataFrame):
    """A DataFrame that displays every cell in full: no column is cut short with "...".

    pandas shortens text cells to ``display.max_colwidth`` (50 characters) when it shows a
    frame; a list of five tags with their probabilities is longer. This frame shows them whole
    (in HTML the cells wrap at the page width); everything else is a plain DataFrame.
    """

    @property
    def _constructor(self):
        return TagTable

    def _repr_html_(self) -> str | None:
        with pd.option_context(*_IN_FULL):
            return super()._repr_html_()

    def __repr__(self) -> str:
        with pd.option_context(*_IN_FULL):
            return super().__repr__()


def tag_store_clips(
    tagger: Tagger, store: SegmentStore, indices: Sequence[int], *, top_k: int = 5
) -> TagTable:
    """Tag the original audio files of some clips of a store, beside their true tags.

    The files are decoded again (the path any user's audio takes), not read from the store.

    Returns:
        A :class:`TagTable` (a DataFrame that shows its cells in full) with columns
        ``clip_id``, ``file``, ``predicted`` (the ``top_k`` tags as "tag (probability)", most
        probable first) and ``true`` (the clip's labelled tags).
    """
    rows = []
    for i in indices:
        path = store.audio_path(int(i))
        predicted = tagger.tag(path, top_k=top_k)
        rows.append(
            {
                "clip_id": store.clips["clip_id"].iat[int(i)],
                "file": path.name,
                "predicted": ", ".join(f"{tag} ({p:.2f})" for tag, p in predicted),
                "true": ", ".join(
                    t for t, on in zip(store.tags, store.labels[int(i)], strict=True) if on
                ),
            }
        )
    return TagTable(rows, columns=["clip_id", "file", "predicted", "true"])
