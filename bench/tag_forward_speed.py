"""The forward pass of tagging on the CPU: the fp32 reference against the fast paths.

Tagging a 30 s clip runs the model on 10 segments of 59,049 samples, a 4-minute song on about
89. This script times, per variant and segment count, in one process and interleaved (each
repeat runs every option once, the order rotating from repeat to repeat, so that the load of
other jobs on a shared machine falls on every option alike):

* ``fp32``: the reference, ``run_model(model, ..., precision="fp32")``: the eager float32
  forward (channels-last maps on the CPU), as evaluation and the exact tagger run it;
* ``autocast``: the same loop at ``precision="bf16"`` (bf16 autocast of the eager forward);
* ``fast``: ``run_model`` over ``inference_model(model, precision="fast")`` (BatchNorm folded,
  in-place ReLUs, micro-batches; float32);
* ``bf16``: over ``inference_model(model, precision="bf16")``, the same in bfloat16.

Each option runs the segments in batches of ``--batch-size`` (the tagger's default, 16) and
is timed from the first batch to the last logits. Reported: the median and minimum seconds
over ``--repeats`` after one warm-up, the speed-up over ``fp32`` (ratio of medians), and the
largest absolute difference from ``fp32`` of the clip probabilities (mean over the segments of
the sigmoid outputs) and of the per-segment probabilities.

Also the one-off costs a command-line run pays, each option in a fresh process of its own
(``--fresh-calls``): building the model for it (``inference_model``; nothing for the eager
options) and the seconds of its first few calls on the first segment count. A fresh process
matters: its first calls set up oneDNN's kernels and the C library's memory pools. (The same
for the fast options in the benchmark's own process, after the calibration: ``one_off``.)

The model has paper width (``--width``) and random weights (``--seed``), with *trained-looking*
BatchNorm statistics: running means and variances are those of a few training-mode passes over
synthetic music (:func:`resemul_core.data.synth_audio.render_clip`), as training would leave
them. Without that (BN statistics 0 / 1) the maps grow from block to block and every output is
saturated, which hides rounding errors. The segments timed are cut from other synthetic songs.

Usage::

    .venv/bin/python bench/tag_forward_speed.py                      # se-multi, rese2-multi
    .venv/bin/python bench/tag_forward_speed.py --variants se-multi --segments 10 --repeats 9
    .venv/bin/python bench/tag_forward_speed.py --json bench/out/my_run.json

Writes ``bench/out/tag_forward_speed.json`` (every repeat's seconds) unless ``--json`` says
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from resemul_core.data.synth_audio import INSTRUMENTS, render_clip
from resemul_core.model.inference import inference_model, run_model
from resemul_core.model.sample_cnn import SampleCNN, build_model

OPTIONS = ("fp32", "autocast", "fast", "bf16")
SAMPLE_RATE = 22_050
CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Song:
    """What :func:`render_clip` needs of a song (its ``ClipContent`` protocol)."""

    instruments: frozenset[str]
    female: bool
    bpm: float
    level_db: float
    dynamics_db: float = field(default=12.0)


def synthetic_music(num_songs: int, segments: int, length: int, seed: int) -> torch.Tensor:
    """``(num_songs * segments, length)`` float32: consecutive segments of synthetic songs,
    each with 2-5 random instruments, a random tempo and an RMS level of -26 to -12 dBFS."""
    rng = np.random.default_rng(seed)
    out = []
    for song_seed in np.random.SeedSequence(seed).spawn(num_songs):
        chosen = rng.choice(len(INSTRUMENTS), size=int(rng.integers(2, 6)), replace=False)
        song = _Song(
            instruments=frozenset(INSTRUMENTS[i] for i in chosen),
            female=bool(rng.random() < 0.5),
            bpm=float(rng.uniform(70, 160)),
            level_db=float(rng.uniform(-26, -12)),
        )
        audio = render_clip(song, song_seed, SAMPLE_RATE, segments * length)
        out.append(torch.from_numpy(audio.astype(np.float32)).reshape(segments, length))
    return torch.cat(out)


@torch.no_grad()
def trained_looking_model(name: str, *, width: float, seed: int) -> SampleCNN:
    """A variant with random weights and BatchNorm statistics estimated, as a cumulative
    average, from training-mode passes over 48 segments of synthetic music; in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, width=width)
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            momenta[module] = module.momentum
            module.momentum = None  # an equal-weight average over the passes
    calibration = synthetic_music(8, 6, model.config.segment_length, seed=10_000 + seed)
    model.train()
    for batch in calibration.split(16):
        model(batch)
    for module, momentum in momenta.items():
        module.momentum = momentum
    return model.eval()


def _runner(
    model: SampleCNN, precision: str, batch_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``segments (N, L) -> logits (N, T)`` through :func:`run_model` in batches."""

    def run(segments: torch.Tensor) -> torch.Tensor:
        batches = torch.split(segments, batch_size)
        outputs = run_model(model, batches, device=CPU, precision=precision)
        return torch.cat([out.logits for out in outputs])

    return run


def _clip_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits).mean(dim=0)  # T


def measure(
    name: str, counts: list[int], *, width: float, seed: int, batch_size: int, repeats: int
) -> dict[str, dict]:
    """Every option's seconds, speed-up and error, for each segment count in ``counts``."""
    model = trained_looking_model(name, width=width, seed=seed)
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32": _runner(model, "fp32", batch_size),
        "autocast": _runner(model, "bf16", batch_size),
    }
    one_off: dict[str, dict[str, float]] = {}
    audio = synthetic_music(1, max(counts), model.config.segment_length, seed=20_000 + seed)
    for option in ("fast", "bf16"):
        started = time.perf_counter()
        fast = inference_model(model, precision=option)
        built = time.perf_counter()
        runners[option] = _runner(fast, "fp32", batch_size)
        runners[option](audio[: counts[0]])
        one_off[option] = {"build_s": built - started, "first_call_s": time.perf_counter() - built}

    results: dict[str, dict] = {}
    for count in counts:
        segments = audio[:count]
        logits = {option: run(segments) for option, run in runners.items()}  # also the warm-up
        reference = logits["fp32"]
        seconds: dict[str, list[float]] = {option: [] for option in runners}
        order = list(runners)
        for r in range(repeats):
            for option in order[r % len(order) :] + order[: r % len(order)]:
                started = time.perf_counter()
                runners[option](segments)
                seconds[option].append(time.perf_counter() - started)
        medians = {option: statistics.median(s) for option, s in seconds.items()}
        results[str(count)] = {
            option: {
                "median_s": medians[option],
                "min_s": min(seconds[option]),
                "seconds": seconds[option],
                "speedup": medians["fp32"] / medians[option],
                "clip_prob_max_abs_diff": float(
                    (_clip_probabilities(logits[option]) - _clip_probabilities(reference))
                    .abs()
                    .max()
                ),
                "segment_prob_max_abs_diff": float(
                    (torch.sigmoid(logits[option]) - torch.sigmoid(reference)).abs().max()
                ),
            }
            for option in runners
        }
        probabilities = torch.sigmoid(reference)
        results[str(count)]["reference"] = {
            "prob_min": float(probabilities.min()),
            "prob_max": float(probabilities.max()),
            "prob_mean": float(probabilities.mean()),
        }
    results["one_off"] = one_off
    return results


def fresh_process_calls(
    name: str, option: str, *, width: float, count: int, batch_size: int, threads: int, calls: int
) -> dict[str, float | list[float]]:
    """In this (fresh) process: seconds to build ``option``'s model and of its first ``calls``
    passes over ``count`` segments (random weights and audio: the time does not depend on
    them, and BatchNorm calibration would run the model first)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, width=width).eval()
    segments = torch.rand(count, model.config.segment_length) - 0.5
    started = time.perf_counter()
    precision = "fp32"
    if option in ("fast", "bf16"):
        model = inference_model(model, precision=option)
    elif option == "autocast":
        precision = "bf16"
    build = time.perf_counter() - started
    run = _runner(model, precision, batch_size)
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        run(segments)
        seconds.append(time.perf_counter() - started)
    return {"build_s": build, "calls_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="se-multi,rese2-multi")
    parser.add_argument("--segments", type=int, nargs="+", default=[10, 89])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after a warm-up")
    parser.add_argument("--batch-size", type=int, default=16, help="segments per forward call")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fresh-calls", type=int, default=3, help="calls timed per fresh process (0: none)"
    )
    parser.add_argument("--json", default="bench/out/tag_forward_speed.json")
    parser.add_argument("--fresh-process", help=argparse.SUPPRESS)  # one job, as JSON
    args = parser.parse_args()
    if args.fresh_process:
        job = json.loads(args.fresh_process)
        print(json.dumps(fresh_process_calls(job.pop("name"), job.pop("option"), **job)))
        return
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"width {args.width}, batch {args.batch_size}, {args.repeats} repeats after a warm-up, "
        f"interleaved; load average {load[0]:.2f}"
    )
    print(
        "| variant | segments | option | median s | min s | speed-up | clip prob max diff "
        "| segment prob max diff |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    results = {}
    for name in args.variants.replace(",", " ").split():
        result = measure(
            name,
            args.segments,
            width=args.width,
            seed=args.seed,
            batch_size=args.batch_size,
            repeats=args.repeats,
        )
        for count in args.segments:
            for option in OPTIONS:
                row = result[str(count)][option]
                print(
                    f"| {name} | {count} | {option} | {row['median_s']:.3f} | {row['min_s']:.3f} "
                    f"| {row['speedup']:.2f} | {row['clip_prob_max_abs_diff']:.2e} "
                    f"| {row['segment_prob_max_abs_diff']:.2e} |",
                    flush=True,
                )
        for option, cost in result["one_off"].items():
            print(
                f"{name} {option}, this process: inference_model {cost['build_s']:.2f} s, "
                f"first call on {args.segments[0]} segments {cost['first_call_s']:.2f} s"
            )
        if args.fresh_calls:
            fresh = {}
            for option in OPTIONS:
                job = {
                    "name": name,
                    "option": option,
                    "width": args.width,
                    "count": args.segments[0],
                    "batch_size": args.batch_size,
                    "threads": args.threads,
                    "calls": args.fresh_calls,
                }
                child = [sys.executable, __file__, "--fresh-process", json.dumps(job)]
                done = subprocess.run(child, capture_output=True, text=True, check=True)
                fresh[option] = json.loads(done.stdout.splitlines()[-1])
                calls = ", ".join(f"{s:.3f}" for s in fresh[option]["calls_s"])
                print(
                    f"{name} {option}, fresh process: build {fresh[option]['build_s']:.3f} s, "
                    f"calls on {args.segments[0]} segments {calls} s"
                )
            result["fresh_process"] = fresh
        results[name] = result
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "args": vars(args),
                "load_average": {"start": load, "end": os.getloadavg()},
                "results": results,
            },
            f,
            indent=1,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
