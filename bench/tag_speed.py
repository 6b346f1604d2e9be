"""Tagging speed and memory at paper width on the CPU: files end to end, beside the forward.

For a 30 s and a 4-minute file (44.1 kHz mono wav, so resampling is included) it times, in the
same invocation and interleaved round by round:

* ``tagger fast``: ``Tagger.predict`` with the default precision, decoding included;
* ``tagger fp32``: the same with ``precision="fp32"`` (evaluation's exact path);
* ``tagger bf16``: the same with ``precision="bf16"`` (fastest, not faithful to float32);
* ``fp32 eager forward``: the model alone in float32 on the same segments, already cut (the
  reference the issue asks for: what the network costs without any of the tagger);
* ``decode``: decoding and cutting alone.

It reports medians, the ratios to the fp32 eager forward, and the largest difference of the
clip-level probabilities (and of any segment's) of the fast and bf16 taggers from the fp32 one. The
model is ``bench/tag_forward_speed.py``'s: random weights with BatchNorm statistics gathered
from training-mode passes over synthetic music, so that the outputs spread like a trained
model's instead of sitting at 0.5.

With ``--hour`` it also tags a 60-minute file in a child process and reports that process's
peak resident memory, beside a child that only loads the tagger.

Usage::

    .venv/bin/python bench/tag_speed.py --rounds 7 --hour
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from resemul_core.data.audio import load_audio, segment_waveform
from resemul_core.interfaces.tagger import Tagger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tag_forward_speed import trained_looking_model  # noqa: E402  (the same model as there)

RATE = 44_100
OUT = Path(__file__).with_name("out")


def music_like(seconds: float, seed: int) -> np.ndarray:
    """Chords with a changing loudness and some noise: not silence, not pure noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    x = sum(0.15 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220, 277, 330, 440))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 0.1 * t)) + 0.03 * rng.standard_normal(t.size)
    return np.clip(x, -1, 1).astype(np.float32)


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_file(path: Path, model, tags, rounds: int) -> dict:
    fast = Tagger(model, tags, device="cpu")
    exact = Tagger(model, tags, device="cpu", precision="fp32")
    lossy = Tagger(model, tags, device="cpu", precision="bf16")
    waveform = load_audio(path, duration=None)
    segments = torch.from_numpy(segment_waveform(waveform, max_segments=None))  # S, L

    def eager() -> None:
        with torch.inference_mode():
            model(segments)

    jobs = {
        "tagger fast": lambda: fast.predict(path),
        "tagger fp32": lambda: exact.predict(path),
        "tagger bf16": lambda: lossy.predict(path),
        "fp32 eager forward": eager,
        "decode": lambda: segment_waveform(load_audio(path, duration=None), max_segments=None),
    }
    for job in jobs.values():  # warm-up: first-call costs (oneDNN primitives, page cache)
        job()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):  # interleaved, so that noise hits every job alike
        for name, job in jobs.items():
            times[name].append(seconds(job))
    reference = exact.analyse(path)
    medians = {name: statistics.median(t) for name, t in times.items()}
    eager_s = medians["fp32 eager forward"]
    result = {
        "file": path.name,
        "segments": len(segments),
        "median_s": medians,
        "ratio_to_fp32_eager_forward": {k: v / eager_s for k, v in medians.items()},
    }
    for name, tagger in (("fast", fast), ("bf16", lossy)):
        other = tagger.analyse(path)
        result[f"{name}: max abs difference from fp32"] = {
            "clip": float(np.abs(other.clip_probabilities - reference.clip_probabilities).max()),
            "segment": float(np.abs(other.probabilities - reference.probabilities).max()),
        }
    return {
        **result,
        "rounds": rounds,
    }


_CHILD = """
import sys, time
sys.path.insert(0, {bench!r})
from tag_forward_speed import trained_looking_model
from resemul_core.interfaces.tagger import Tagger


def status(field):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


model = trained_looking_model({variant!r}, width=1.0, seed=0)
tagger = Tagger(model, [f"t{{k}}" for k in range(50)], device="cpu")
tagger.predict({wav!r}, segments="spread", num_segments=3)  # warm: the model's working memory
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:  # the peak (VmHWM) starts again from here
    handle.write("5")
started = time.perf_counter()
result = tagger.analyse({wav!r})
print(before, status("VmHWM"), len(result.starts), time.perf_counter() - started)
"""


def hour_rss(folder: Path, variant: str) -> dict:
    """Resident memory of a process that tags a 60-minute file: before (model loaded and
    warm) and the peak while tagging, in MB."""
    wav = folder / "hour.wav"
    with sf.SoundFile(wav, "w", samplerate=RATE, channels=1, subtype="PCM_16") as out:
        for minute in range(60):
            out.write(music_like(60.0, minute))
    bench = str(Path(__file__).resolve().parent)
    code = _CHILD.format(bench=bench, variant=variant, wav=str(wav))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak, segments, seconds = done.stdout.split()
    return {
        "rss_before_mb": int(before) / 1024,
        "peak_rss_while_tagging_mb": int(peak) / 1024,
        "segments": int(segments),
        "seconds": float(seconds),
        "file_decoded_as_float32_mb": 60 * 60 * 22_050 * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="se-multi")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--hour", action="store_true", help="also the 60-minute peak RSS")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = trained_looking_model(args.variant, width=1.0, seed=0)
    tags = [f"t{k}" for k in range(model.config.num_tags)]
    results: dict = {"variant": args.variant, "threads": args.threads, "files": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seconds, name in ((30, "30s.wav"), (240, "4min.wav")):
            sf.write(folder / name, music_like(seconds, seconds), RATE)
            results["files"].append(time_file(folder / name, model, tags, args.rounds))
            print(json.dumps(results["files"][-1], indent=1))
        if args.hour:
            results["hour"] = hour_rss(folder, args.variant)
            print(json.dumps(results["hour"], indent=1))
    OUT.mkdir(exist_ok=True)
    target = OUT / f"tag_speed-{args.variant}.json"
    target.write_text(json.dumps(results, indent=1))
    print(f"wrote {target}")
    return results


if __name__ == "__main__":
    main()
