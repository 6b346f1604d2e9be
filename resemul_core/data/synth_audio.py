"""The synthetic dataset's audio: eight instruments playing one clip's music, mixed to a level.

Public: :func:`render_clip`, :class:`ClipContent`, :data:`INSTRUMENTS`.

:mod:`resemul_core.data.synth` plans each clip (which instruments, voice register, tempo, level)
and derives its tags from that plan; :func:`render_clip` turns a plan into samples, with numpy
alone.

Music: a random key (major or minor) and one of six four-chord progressions, one chord per bar
of four beats. Every instrument plays from the first to the last second, articulating notes on
every beat or half beat, so each tag's source (and the tempo, through the note rate) is present
in any 2.68-s window: piano (block chords; inharmonic decaying partials and a hammer click),
guitar (strummed Karplus-Strong strings, mildly driven), strings (bowed saw ensemble with
vibrato), flute (near-sine melody with breath noise and vibrato), bass (plucked low roots),
synth (detuned saw or square arpeggio), drums (pitched-sweep kick on every beat, noise snare on
2 and 4, hi-hat on eighths) and voice (a glottal source through vowel formants, a new vowel per
note, ±2.5 % vibrato). Each instrument is normalised to equal RMS and mixed with a gain from
U[-5, 0] dB, the voice 3 dB above that, as a lead vocal. Dynamics: the mix swells and fades
from one two-bar phrase to the next, the level at each phrase's middle drawn uniformly within
the plan's depth (``dynamics_db``, e.g. 12 dB: ±6 dB). The mix is then scaled to the planned
RMS level; a soft limiter keeps the peak below 0.9 (-0.9 dBFS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from resemul_core.data.audio import rms

__all__ = ["INSTRUMENTS", "ClipContent", "render_clip"]

#: The instruments, in the order their parts are rendered and mixed.
INSTRUMENTS = ("piano", "guitar", "strings", "flute", "bass", "synth", "drums", "voice")

_MIX_GAIN_DB = (-5.0, 0.0)
_LEAD_VOCAL_DB = 3.0  # the voice sits on top of the mix, as a lead vocal does
# Soft limiter: identity below the knee, tanh-saturating towards the ceiling above it.
_LIMIT_KNEE = 0.6
_LIMIT_CEILING = 0.9

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
# Scale degrees (0-based) of the four chords of a progression, one chord per bar.
_PROGRESSIONS = ((0, 4, 5, 3), (0, 3, 4, 0), (5, 3, 0, 4), (0, 5, 3, 4), (0, 3, 0, 4), (1, 4, 0, 0))
# Vowel formants (Hz) of an adult male voice; a female voice scales them by 1.17.
_VOWELS = (
    (730.0, 1090.0, 2440.0),
    (530.0, 1840.0, 2480.0),
    (270.0, 2290.0, 3010.0),
    (570.0, 840.0, 2410.0),
    (300.0, 870.0, 2240.0),
)
_FORMANT_WIDTH = (90.0, 110.0, 160.0)
_FORMANT_GAIN = (1.0, 0.5, 0.25)
_TABLE_SIZE = 2048
_DRUM_SECONDS = 0.35  # length of each drum sound


class ClipContent(Protocol):
    """What :func:`render_clip` reads of a clip's plan (``synth``'s clip spec has these fields)."""

    @property
    def instruments(self) -> frozenset[str]: ...  # names from INSTRUMENTS

    @property
    def female(self) -> bool: ...  # the voice's register; ignored without "voice"

    @property
    def bpm(self) -> float: ...  # beats per minute

    @property
    def level_db(self) -> float: ...  # RMS level of the clip, dBFS

    @property
    def dynamics_db(self) -> float: ...  # depth of the level changes within the clip, dB


# --- sound sources ------------------------------------------------------------------------
# Each returns a mono float64 note template of ``n`` samples; the arrangement code below
# overlap-adds templates at note onsets.


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _fade(x: np.ndarray, sr: int, *, attack: float, release: float) -> np.ndarray:
    """Apply a linear attack and release (seconds) in place, so notes start and end click-free."""
    a = min(x.size, max(1, int(attack * sr)))
    r = min(x.size, max(1, int(release * sr)))
    x[:a] *= np.linspace(0.0, 1.0, a, endpoint=False)
    x[x.size - r :] *= np.linspace(1.0, 0.0, r)
    return x


def _oscillator(amps: np.ndarray, freq: np.ndarray, sr: int, phase: float = 0.0) -> np.ndarray:
    """Wavetable oscillator: harmonic ``k`` (1-based) gets amplitude ``amps[k-1]``.

    ``freq`` is the per-sample fundamental in Hz; callers cap the harmonics below Nyquist.
    """
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)
    spectrum[1 : amps.size + 1] = -0.5j * _TABLE_SIZE * amps
    table = np.fft.irfft(spectrum, _TABLE_SIZE)
    table = np.append(table, table[0])
    pos = ((phase + np.cumsum(freq) / sr) % 1.0) * _TABLE_SIZE
    idx = pos.astype(np.int64)
    frac = pos - idx
    return table[idx] * (1.0 - frac) + table[idx + 1] * frac


def _harmonics(f0: float, sr: int, limit: int = 60) -> np.ndarray:
    """Harmonic numbers 1..K with K * f0 (plus 3 % vibrato headroom) under 0.45 * sr."""
    return np.arange(1, max(1, min(limit, int(0.45 * sr / (f0 * 1.03)))) + 1, dtype=float)


def _band_noise(rng: np.random.Generator, n: int, sr: int, low: float, high: float) -> np.ndarray:
    """White noise restricted to ``[low, high]`` Hz, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < low) | (freqs > high)] = 0.0
    out = np.fft.irfft(spec, n)
    return out / (rms(out) + 1e-12)


def _vibrato(n: int, sr: int, rate: float, depth: float, phase: float, onset: float) -> np.ndarray:
    """Relative pitch factor ``1 + depth * sin(...)`` whose depth grows in over ``onset`` s."""
    t = np.arange(n) / sr
    return 1.0 + depth * np.minimum(t / onset, 1.0) * np.sin(2 * np.pi * rate * t + phase)


def _piano(midi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = _hz(midi)
    t = np.arange(n) / sr
    out = np.zeros(n)
    decay = 1.6 * min(2.0, (262.0 / f0) ** 0.5)  # low strings ring longer, seconds
    for k in _harmonics(f0, sr, limit=12):
        fk = k * f0 * math.sqrt(1.0 + 4e-4 * k * k)  # string stiffness stretches the partials
        if fk >= 0.45 * sr:
            break
        out += k**-1.3 * np.exp(-t * (1.0 + 0.7 * (k - 1)) / decay) * np.sin(2 * np.pi * fk * t)
    click = _band_noise(rng, min(n, int(0.006 * sr)), sr, 500.0, 4000.0)
    out[: click.size] += 0.15 * click * np.linspace(1.0, 0.0, click.size)
    return _fade(out, sr, attack=0.002, release=0.05)


def _guitar(midi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong: a noise burst recirculating through a delay line with an averaging loss."""
    f0 = _hz(midi)
    period = max(2, round(sr / f0 - 0.5))  # the two-point average adds half a sample of delay
    loss = math.exp(math.log(1e-3) / (2.5 * f0))  # per period, for a 2.5-s decay to -60 dB
    y = np.zeros(n + 1)  # y[0] is the silent sample before the pluck
    burst = rng.uniform(-1.0, 1.0, period)
    y[1 : period + 1] = 0.5 * (burst + np.roll(burst, 1))
    start = period + 1
    while start < y.size:  # each block depends only on the previous one, so it vectorises
        stop = min(start + period, y.size)
        y[start:stop] = (
            0.5
            * loss
            * (y[start - period : stop - period] + y[start - period - 1 : stop - period - 1])
        )
        start = stop
    out = np.tanh(2.0 * y[1:]) / np.tanh(2.0)
    return _fade(out, sr, attack=0.001, release=0.04)


def _strings(midi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = _hz(midi)
    k = _harmonics(f0, sr)
    amps = 1.0 / k / (1.0 + (k * f0 / 2500.0) ** 2)  # a bowed saw, darkened by the body
    out = np.zeros(n)
    for cents in (-6.0, 6.0):  # two desks, slightly out of tune, for an ensemble sound
        vib = _vibrato(n, sr, rng.uniform(5.0, 6.0), 0.004, rng.uniform(0, 2 * np.pi), 0.2)
        out += _oscillator(amps, f0 * 2 ** (cents / 1200) * vib, sr, rng.random())
    return _fade(out, sr, attack=0.05, release=0.1)  # a dip between bow strokes


def _flute(midi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = _hz(midi)
    amps = np.array([1.0, 0.35, 0.12, 0.05])[: _harmonics(f0, sr).size]
    vib = _vibrato(n, sr, rng.uniform(4.5, 5.5), 0.005, rng.uniform(0, 2 * np.pi), 0.15)
    t = np.arange(n) / sr
    tremolo = 1.0 + 0.1 * np.sin(2 * np.pi * 5.0 * t)
    out = _oscillator(amps, f0 * vib, sr, rng.random()) * tremolo
    breath = _band_noise(rng, n, sr, 1500.0, 7000.0)
    out += (0.06 + 0.25 * np.exp(-t / 0.03)) * breath  # steady breath plus an attack "chiff"
    return _fade(out, sr, attack=0.04, release=0.05)


def _bass(midi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = _hz(midi)
    k = _harmonics(f0, sr, limit=10)
    t = np.arange(n) / sr
    out = _oscillator(k**-1.5, np.full(n, f0), sr, rng.random()) * np.exp(-t / 0.6)
    return _fade(out, sr, attack=0.004, release=0.03)


def _synth(midi: float, n: int, sr: int, rng: np.random.Generator, *, square: bool) -> np.ndarray:
    f0 = _hz(midi)
    k = _harmonics(f0, sr)
    amps = np.where(k % 2 == 1, 1.0 / k, 0.0) if square else 1.0 / k
    out = sum(
        _oscillator(amps, np.full(n, f0 * 2 ** (c / 1200)), sr, rng.random()) for c in (-9, 9)
    )
    t = np.arange(n) / sr
    out *= 0.75 + 0.25 * np.exp(-t / 0.08)  # decay to a steady sustain
    return _fade(out, sr, attack=0.005, release=0.02)


def _voice(
    midi: float, n: int, sr: int, rng: np.random.Generator, *, vowel: int, female: bool
) -> np.ndarray:
    """A glottal source (harmonics falling as 1/k) shaped by three vowel formants."""
    f0 = _hz(midi)
    k = _harmonics(f0, sr)
    scale = 1.17 if female else 1.0
    envelope = np.full(k.size, 0.01)
    for centre, width, gain in zip(_VOWELS[vowel], _FORMANT_WIDTH, _FORMANT_GAIN, strict=True):
        envelope += gain / np.sqrt(1.0 + ((k * f0 - centre * scale) / (width / 2)) ** 2)
    vib = _vibrato(n, sr, rng.uniform(5.0, 6.0), 0.025, rng.uniform(0, 2 * np.pi), 0.25)
    out = _oscillator(envelope / k, f0 * vib, sr, rng.random())
    out += 0.03 * _band_noise(rng, n, sr, 2000.0, 6000.0)  # breathiness
    return _fade(out, sr, attack=0.06, release=0.08)


def _drum_kit(sr: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kick (pitch sweep 145 -> 45 Hz), snare (noise + 185 Hz body), closed hi-hat (noise)."""
    t = np.arange(int(_DRUM_SECONDS * sr)) / sr
    sweep = 45.0 + 100.0 * np.exp(-t / 0.04)
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / sr) * np.exp(-t / 0.15)
    t = t[: int(0.25 * sr)]
    snare = 0.6 * _band_noise(rng, t.size, sr, 1000.0, 7500.0) * np.exp(-t / 0.06)
    snare += 0.7 * np.sin(2 * np.pi * 185.0 * t) * np.exp(-t / 0.05)
    t = t[: int(0.06 * sr)]
    hat = 0.4 * _band_noise(rng, t.size, sr, 5000.0, 7900.0) * np.exp(-t / 0.015)
    kit = {"kick": kick, "snare": snare, "hat": hat}
    # Zero-padded to one length, so that the kit fits the fixed-length template player.
    length = int(_DRUM_SECONDS * sr)
    return {
        k: np.pad(_fade(x, sr, attack=0.001, release=0.01), (0, length - x.size))
        for k, x in kit.items()
    }


# --- arrangement: which notes each instrument plays when ----------------------------------


@dataclass
class _Score:
    """The harmonic grid shared by all instruments of one clip."""

    sr: int
    n: int
    beat: float  # seconds per beat
    scale: tuple[int, ...]  # pitch classes of the key
    chords: list[tuple[int, int, int]]  # pitch classes of the chord sounding at each beat

    def onsets(self, step: float) -> np.ndarray:
        """Note start times (s) every ``step`` beats from 0 to the end of the clip."""
        return np.arange(0.0, self.n / self.sr, step * self.beat)

    def chord_at(self, time_s: float) -> tuple[int, int, int]:
        return self.chords[min(len(self.chords) - 1, int(time_s / self.beat + 1e-9))]


def _place(low: int, high: int, pitch_classes: tuple[int, ...]) -> list[int]:
    """The MIDI notes in ``[low, low + 12)`` with the given pitch classes, clipped to ``high``."""
    notes = sorted(low + (pc - low) % 12 for pc in pitch_classes)
    return [m if m <= high else m - 12 for m in notes]


def _melody(score: _Score, rng: np.random.Generator, low: int, high: int, step: float) -> list:
    """A random walk over the scale that lands on chord tones; one (time, midi) per onset."""
    pitches = [m for m in range(low, high + 1) if m % 12 in score.scale]
    pos = int(rng.integers(len(pitches)))
    notes = []
    for onset in score.onsets(step):
        chord = score.chord_at(onset)
        if rng.random() < 0.6:  # leap to the nearest chord tone
            tones = [i for i, m in enumerate(pitches) if m % 12 in chord]
            pos = min(tones, key=lambda i: (abs(i - pos), rng.random()))
        else:
            pos = int(np.clip(pos + rng.choice([-2, -1, 1, 2]), 0, len(pitches) - 1))
        notes.append((onset, pitches[pos]))
    return notes


def _render_events(
    score: _Score,
    rng: np.random.Generator,
    events: list[tuple[float, Hashable, float]],
    make: Callable[[Any, int], np.ndarray],
    hold: float,
) -> np.ndarray:
    """Overlap-add a note template at each ``(time s, note, velocity)`` event.

    ``make(note, samples)`` builds the template of a note (a MIDI pitch, or any hashable
    description); ``hold`` is its length in seconds. Repeated notes reuse their template.
    """
    out = np.zeros(score.n)
    cache: dict[Hashable, np.ndarray] = {}
    length = max(2, int(hold * score.sr))
    for time_s, note, velocity in events:
        if note not in cache:
            cache[note] = make(note, length)
        start = max(0, int((time_s + rng.normal(0.0, 0.004)) * score.sr))  # human timing
        stop = min(score.n, start + length)
        if start < stop:
            out[start:stop] += velocity * cache[note][: stop - start]
    return out


def _part(name: str, spec: ClipContent, score: _Score, rng: np.random.Generator) -> np.ndarray:
    """Render one instrument's part for the whole clip."""
    sr, beat = score.sr, score.beat

    def vel() -> float:
        return float(rng.uniform(0.8, 1.0))

    if name == "drums":
        kit = _drum_kit(sr, rng)
        events = [
            (t, hit, vel())
            for i, t in enumerate(score.onsets(0.5))
            for hit in ["hat"] + ["kick"] * (i % 2 == 0) + ["snare"] * (i % 4 == 2)
        ]
        return _render_events(score, rng, events, lambda hit, n: kit[hit][:n], _DRUM_SECONDS)
    if name == "piano":
        events = [
            (t, m, vel())
            for t in score.onsets(1.0)
            for m in _place(57, 72, score.chord_at(t)) + _place(45, 56, score.chord_at(t)[:1])
        ]
        return _render_events(score, rng, events, lambda m, n: _piano(m, n, sr, rng), beat + 0.15)
    if name == "guitar":
        events = []
        for i, t in enumerate(score.onsets(0.5)):
            chord = score.chord_at(t)
            notes = _place(40, 51, chord[:1]) + _place(52, 67, chord)
            up = i % 2 == 1
            for j, m in enumerate(reversed(notes) if up else notes):  # strum across the strings
                events.append((t + 0.008 * j, m, (0.65 if up else 1.0) * vel()))
        hold = 0.5 * beat + 0.3
        return _render_events(score, rng, events, lambda m, n: _guitar(m, n, sr, rng), hold)
    if name == "strings":
        events = [
            (t, m, vel()) for t in score.onsets(1.0) for m in _place(55, 76, score.chord_at(t))
        ]
        return _render_events(score, rng, events, lambda m, n: _strings(m, n, sr, rng), 0.92 * beat)
    if name == "flute":
        events = [(t, m, vel()) for t, m in _melody(score, rng, 72, 88, 0.5)]
        hold = 0.5 * beat + 0.03
        return _render_events(score, rng, events, lambda m, n: _flute(m, n, sr, rng), hold)
    if name == "bass":
        octave = rng.random() < 0.5  # root-octave pattern instead of repeated roots
        events = [
            (t, _place(31, 42, score.chord_at(t)[:1])[0] + (12 if octave and i % 2 else 0), vel())
            for i, t in enumerate(score.onsets(0.5))
        ]
        return _render_events(score, rng, events, lambda m, n: _bass(m, n, sr, rng), 0.5 * beat)
    if name == "synth":
        square = bool(rng.random() < 0.5)
        pattern = (0, 1, 2, 1)
        events = [
            (t, _place(60, 76, score.chord_at(t))[pattern[i % 4]], vel())
            for i, t in enumerate(score.onsets(0.5))
        ]
        return _render_events(
            score, rng, events, lambda m, n: _synth(m, n, sr, rng, square=square), 0.5 * beat
        )
    if name == "voice":
        low, high = (64, 77) if spec.female else (48, 60)
        events = [
            (t, (m, int(rng.integers(len(_VOWELS)))), vel())  # a fresh vowel on every note
            for t, m in _melody(score, rng, low, high, 1.0)
        ]

        def sing(note: tuple[int, int], n: int) -> np.ndarray:
            return _voice(note[0], n, sr, rng, vowel=note[1], female=spec.female)

        return _render_events(score, rng, events, sing, beat + 0.08)
    raise ValueError(f"unknown instrument {name!r}")


def _dynamics(score: _Score, rng: np.random.Generator, depth_db: float) -> np.ndarray:
    """The clip's gain curve: a level uniform in +-``depth_db / 2`` dB at the middle of every
    two-bar phrase, swelling and fading linearly from one phrase to the next."""
    phrase = 8 * score.beat
    centres = np.arange(-0.5 * phrase, score.n / score.sr + phrase, phrase)
    levels_db = rng.uniform(-0.5 * depth_db, 0.5 * depth_db, centres.size)
    curve_db = np.interp(np.arange(score.n) / score.sr, centres, levels_db)
    return 10.0 ** (curve_db / 20.0)


def render_clip(spec: ClipContent, seed: np.random.SeedSequence, sr: int, n: int) -> np.ndarray:
    """The clip's audio: ``(n,)`` float32 at ``sr`` Hz with RMS ``spec.level_db`` dBFS.

    ``seed`` decides everything ``spec`` leaves open (key, progression, notes, timing, timbre);
    the same arguments give the same samples.
    """
    rng = np.random.default_rng(seed)
    key = int(rng.integers(12))
    scale = tuple((key + d) % 12 for d in (_MINOR if rng.random() < 0.5 else _MAJOR))
    progression = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]
    beat = 60.0 / spec.bpm
    chords = []
    for b in range(int(n / sr / beat) + 2):
        degree = progression[(b // 4) % 4]
        chords.append(tuple(scale[(degree + j) % 7] for j in (0, 2, 4)))
    score = _Score(sr, n, beat, scale, chords)
    mix = np.zeros(n)
    for name in INSTRUMENTS:
        if name in spec.instruments:
            part = _part(name, spec, score, rng)
            gain_db = rng.uniform(*_MIX_GAIN_DB) + (_LEAD_VOCAL_DB if name == "voice" else 0.0)
            gain = 10.0 ** (gain_db / 20.0)
            mix += gain * part / (rms(part) + 1e-12)
    mix *= _dynamics(score, rng, spec.dynamics_db)
    _fade(mix, sr, attack=0.005, release=0.005)  # no click where the last notes are cut
    mix *= 10.0 ** (spec.level_db / 20.0) / (rms(mix) + 1e-12)
    over = np.abs(mix) > _LIMIT_KNEE
    if over.any():
        room = _LIMIT_CEILING - _LIMIT_KNEE
        mix[over] = np.sign(mix[over]) * (
            _LIMIT_KNEE + room * np.tanh((np.abs(mix[over]) - _LIMIT_KNEE) / room)
        )
    return mix.astype(np.float32)
