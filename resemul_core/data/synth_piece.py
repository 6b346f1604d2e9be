"""A generated long piece whose music changes section by section: a demo song to tag.

Public: :class:`Section`, :data:`DEMO_SECTIONS`, :func:`long_piece`.

The synthetic dataset's clips are 29 s of one arrangement each; a song that changes over
time shows what a taggram is for. :func:`long_piece` renders sections with the dataset's own
instruments (:func:`~resemul_core.data.synth_audio.render_clip`) and joins them with short
crossfades, so a model trained on the synthetic dataset has something to recognise in each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from resemul_core.data.audio import SAMPLE_RATE
from resemul_core.data.synth_audio import INSTRUMENTS, render_clip

__all__ = ["DEMO_SECTIONS", "Section", "long_piece"]

_CROSSFADE_S = 1.0


@dataclass(frozen=True)
class Section:
    """One section of a piece: what plays, how fast, how loud.

    Attributes:
        name: a label for tables and plots.
        instruments: names from :data:`~resemul_core.data.synth_audio.INSTRUMENTS`.
        bpm: beats per minute.
        level_db: RMS level in dBFS.
        female: the voice's register (without "voice", ignored).
        dynamics_db: depth of the level's swells within the section, dB.
    """

    name: str
    instruments: frozenset[str]
    bpm: float
    level_db: float
    female: bool = False
    dynamics_db: float = 6.0

    def __post_init__(self) -> None:
        unknown = set(self.instruments) - set(INSTRUMENTS)
        if unknown:
            raise ValueError(
                f"unknown instruments {sorted(unknown)}; valid: {', '.join(INSTRUMENTS)}"
            )


#: The book's demo song: four contrasting sections in the synthetic dataset's vocabulary.
DEMO_SECTIONS: tuple[Section, ...] = (
    Section("quiet chamber music", frozenset({"piano", "strings", "flute"}), 70.0, -36.0),
    Section(
        "loud rock with a male voice", frozenset({"guitar", "bass", "drums", "voice"}), 162.0, -16.0
    ),
    Section("techno", frozenset({"synth", "bass", "drums"}), 132.0, -18.0),
    Section(
        "slow ambient synth with a female voice",
        frozenset({"synth", "voice"}),
        66.0,
        -30.0,
        female=True,
    ),
)


def long_piece(
    sections: Sequence[Section] = DEMO_SECTIONS,
    *,
    section_seconds: float = 40.0,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Render a piece of ``len(sections)`` sections of ``section_seconds`` each.

    Args:
        sections: what each section plays, in order.
        section_seconds: length of each section in seconds (> 2, for the crossfades).
        sample_rate: Hz of the result.
        seed: the same seed gives the same samples.

    Returns:
        ``(waveform, table)``: ``(samples,)`` float32 in [-1, 1], and one row per section with
        ``start`` and ``end`` (seconds), ``section`` (its name), ``instruments``, ``bpm`` and
        ``level_db``. Neighbouring sections overlap by a 1 s crossfade around each boundary.
    """
    if not sections:
        raise ValueError("a piece needs at least one section")
    if section_seconds <= 2 * _CROSSFADE_S:
        raise ValueError(f"section_seconds must exceed {2 * _CROSSFADE_S:g}, got {section_seconds}")
    length = round(section_seconds * sample_rate)
    fade = round(_CROSSFADE_S * sample_rate)
    total = length * len(sections)
    piece = np.zeros(total, dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, fade)
    rows = []
    seeds = np.random.SeedSequence(seed).spawn(len(sections))
    for k, (section, section_seed) in enumerate(zip(sections, seeds, strict=True)):
        # each section runs half a crossfade into its neighbours, faded in and out there
        audio = render_clip(section, section_seed, sample_rate, length + fade).astype(np.float64)
        if k > 0:
            audio[:fade] *= ramp
        audio[-fade:] *= ramp[::-1]
        start = k * length - fade // 2
        lo, hi = max(start, 0), min(start + audio.size, total)
        piece[lo:hi] += audio[lo - start : hi - start]
        rows.append(
            {
                "start": k * section_seconds,
                "end": (k + 1) * section_seconds,
                "section": section.name,
                "instruments": ", ".join(i for i in INSTRUMENTS if i in section.instruments),
                "bpm": section.bpm,
                "level_db": section.level_db,
            }
        )
    waveform = np.clip(piece[:total], -1.0, 1.0).astype(np.float32)
    return waveform, pd.DataFrame(rows)
