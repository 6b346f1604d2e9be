"""The benchmark suite: training throughput against a baseline, loaders, tagging, preprocessing.

Sections (``--sections``, default ``train,loader,infer``):

* ``train``: segments/s of forward + backward + SGD per variant (``train_speed.py``). Ours is
  the library's training step fed from the store at ``--precision`` (bf16 by default), with
  the backends ``configure_backends`` sets (TF32 and cuDNN autotuning on CUDA), in the modes
  ``eager+loader`` (int16 batches through a ``DataLoader``), ``eager+resident`` (the split held
  on the device) and, with ``--compile``, ``compiled+resident`` (``compile_model``: CUDA graphs
  on one GPU; dynamo is reset between variants and a compile failure is a failed row, never a
  silent fall-back to eager). The baseline, a plain fp32 eager loop reading one float32 ``.npy``
  per clip with ``loss.item()`` every step, runs afterwards in a fresh process of its own, so
  that it keeps PyTorch's default backend settings; the ratio is the fastest of ours over it;
* ``loader``: segments/s of the store's loaders and of the ``.npy`` baseline, beside what the
  model consumes (``data_speed.py``);
* ``infer``: seconds to tag a generated 30 s, 44.1 kHz wav with ``Tagger`` (se-multi) on the
  CPU, decoding and resampling included;
* ``prepare``: clips/s of ``prepare_store`` with 1 and all processes against a
  ``librosa.load`` loop, on generated MTAT-like mp3s (``data_speed.py``).

Usage::

    .venv/bin/python bench/run.py --quick                       # smoke run, seconds
    .venv/bin/python bench/run.py --device cuda --variants all --compile \\
        --json bench/out/gpu.json --markdown bench/out/gpu.md
    .venv/bin/python bench/run.py --sections prepare --prepare-clips 40

``bench/gpu_check.py`` measures the same modes on a GPU with every variant compiled in
parallel processes first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from data_speed import make_bench_data, make_clips, time_librosa, time_loaders, time_prepare
from train_speed import MODES, first_line, run_baseline_process, time_ours

from resemul_core.config import PRECISIONS, VARIANTS
from resemul_core.data.store import SegmentStore
from resemul_core.interfaces.tagger import Tagger
from resemul_core.model.sample_cnn import build_model
from resemul_core.runtime import select_device

SECTIONS = ("train", "loader", "infer", "prepare")
DEFAULT_VARIANTS = "basic,se-multi,res2,rese2-multi"


def time_tagging(*, width: float, repeats: int, folder: Path) -> dict:
    """Seconds to tag one 30 s wav on the CPU: the first call and the median of ``repeats``."""
    rate = 44_100
    t = np.arange(30 * rate) / rate
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(
        t.size
    )
    path = folder / "clip30s.wav"
    sf.write(path, audio.astype(np.float32), rate)
    torch.manual_seed(0)
    model = build_model("se-multi", width=width)
    tagger = Tagger(model, [f"tag{k}" for k in range(50)], device="cpu")
    started = time.perf_counter()
    tagger.tag(path)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tagger.tag(path)
        times.append(time.perf_counter() - started)
    return {"first_s": first, "median_s": statistics.median(times), "repeats": repeats}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="train,loader,infer", help=", ".join(SECTIONS))
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated, or all")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0)")
    parser.add_argument("--batch-size", type=int, default=23, help="segments per step (23)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--compile", action="store_true", help="also time compiled+resident (compile_model)"
    )
    parser.add_argument(
        "--data-on-device", action="store_true", help="time ours only with the split on device"
    )
    parser.add_argument(
        "--modes", help=f"ours' modes, comma-separated, overriding the two flags above: {MODES}"
    )
    parser.add_argument(
        "--precision", default="bf16", choices=PRECISIONS, help="ours' precision (bf16)"
    )
    parser.add_argument("--chunks", type=int, default=5, help="timed chunks; median (5)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    parser.add_argument("--clips", type=int, default=64, help="clips of 10 segments (64)")
    parser.add_argument("--loader-segments", type=int, default=4600, help="segments (4600)")
    parser.add_argument("--infer-width", type=float, default=1.0, help="tagger's width (1.0)")
    parser.add_argument("--infer-repeats", type=int, default=3, help="timed tag calls (3)")
    parser.add_argument("--prepare-clips", type=int, default=40, help="mp3 clips (40)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.infer_width, args.steps, args.warmup, args.clips = 1 / 16, 1 / 16, 2, 1, 8
        args.loader_segments, args.infer_repeats, args.prepare_clips = 230, 1, 4
        if args.variants == DEFAULT_VARIANTS:
            args.variants = "se-multi"
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    args.variants = [v.strip() for v in names if v.strip()]
    if args.modes is None:
        args.modes = [m for m in MODES[:2] if not (args.data_on_device and m == "eager+loader")]
        args.modes += ["compiled+resident"] if args.compile else []
    else:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(args.modes) - set(MODES))
    if bad or not args.modes:
        parser.error(f"unknown or no modes {bad}; valid: {', '.join(MODES)}")
    return args


def train_section(
    args: argparse.Namespace, device: torch.device, store: SegmentStore, npy: Path
) -> list[dict]:
    """Ours in every mode, variant by variant, then the baseline of all in its own process."""
    common = {
        "width": args.width,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": device,
        "num_workers": args.workers,
        "chunks": args.chunks,
    }
    rows = []
    for variant in args.variants:
        row: dict = {"variant": variant, "params": None, "precision": args.precision, "modes": {}}
        for mode in args.modes:
            try:
                figures = time_ours(
                    variant, store=store, mode=mode, precision=args.precision, **common
                )
                row["params"] = figures["params"]
            except Exception as err:  # a failed compile is a row marked failed, never eager
                figures = {"error": first_line(err)}
            row["modes"][mode] = figures
        rows.append(row)
        cells = ", ".join(f"{m} {_cell(f)}" for m, f in row["modes"].items())
        print(f"  ours {variant}: {cells}", flush=True)
    print("  baseline: all variants in a fresh process ...", flush=True)
    baseline = run_baseline_process(args.variants, store=store.path, npy=npy, **common)
    print(f"\n{'variant':<13}{'params':>11}" + "".join(f"{m:>19}" for m in args.modes), end="")
    print(f"{'baseline':>10}{'ratio':>7}")
    for row in rows:
        row["baseline"] = baseline[row["variant"]]
        ours = {m: f["segments_per_s"] for m, f in row["modes"].items() if "error" not in f}
        base = row["baseline"].get("segments_per_s")
        row["fastest_mode"] = max(ours, key=ours.get) if ours else None
        row["ratio"] = ours[row["fastest_mode"]] / base if ours and base else None
        print(
            f"{row['variant']:<13}{row['params'] or 0:>11,}"
            + "".join(f"{_cell(row['modes'][m]):>19}" for m in args.modes)
            + f"{_cell(row['baseline']):>10}{_ratio(row['ratio']):>7}",
            flush=True,
        )
    for row in rows:
        for mode, figures in [*row["modes"].items(), ("baseline", row["baseline"])]:
            if "error" in figures:
                print(f"FAILED {row['variant']} {mode}: {figures['error']}", flush=True)
    return rows


def _cell(figures: dict) -> str:
    return "failed" if "error" in figures else f"{figures['segments_per_s']:,.1f}"


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Every requested section; the figures as one JSON-ready dict, printed as they come."""
    device = select_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    figures: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{where or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "device": str(device),
        "settings": {
            k: getattr(args, k)
            for k in ("width", "batch_size", "steps", "warmup", "chunks", "modes", "precision")
        }
        | {"workers": args.workers, "clips": args.clips},
    }
    print(f"# {figures['machine']}; device {device}", flush=True)
    if "train" in args.sections or "loader" in args.sections:
        store, npy = make_bench_data(folder / "data", clips=args.clips)
    if "train" in args.sections:
        print(
            f"\n## training, width {args.width:g}, batch {args.batch_size}, segments/s "
            f"(ours {args.precision}; baseline fp32 eager in its own process)"
        )
        figures["train"] = train_section(args, device, store, npy)
    if "loader" in args.sections:
        print(f"\n## loaders, {args.loader_segments} shuffled segments, segments/s")
        loaders = time_loaders(store, npy, segments=args.loader_segments, num_workers=args.workers)
        for name, value in loaders.items():
            print(f"{name:<52} {value:>9.0f}", flush=True)
        figures["loader"] = loaders
    if "infer" in args.sections:
        print(f"\n## tagging a 30 s wav on the CPU, se-multi width {args.infer_width:g}")
        tagging = time_tagging(width=args.infer_width, repeats=args.infer_repeats, folder=folder)
        tagging["width"] = args.infer_width
        print(f"first call {tagging['first_s']:.3f} s, median {tagging['median_s']:.3f} s")
        figures["infer"] = tagging
    if "prepare" in args.sections:
        print(f"\n## preprocessing {args.prepare_clips} mp3 clips (29.1 s, 16 kHz), clips/s")
        table = make_clips(folder / "mp3", args.prepare_clips)
        cores = os.cpu_count() or 1
        prepare = {
            "prepare, 1 process": args.prepare_clips / time_prepare(table, folder / "s1", 1),
            f"prepare, {cores} processes": args.prepare_clips
            / time_prepare(table, folder / "sN", cores),
            "librosa.load loop (decode only)": args.prepare_clips / time_librosa(folder / "mp3"),
        }
        for name, value in prepare.items():
            print(f"{name:<52} {value:>9.1f}", flush=True)
        figures["prepare"] = prepare
    return figures


def markdown(figures: dict) -> str:
    """The figures as Markdown tables."""
    lines = [f"`{figures['command']}`", "", f"{figures['machine']}; device {figures['device']}"]
    if "train" in figures:
        modes = figures["settings"]["modes"]
        lines += [
            "",
            f"Ours at {figures['settings']['precision']}; the baseline fp32, eager, in its own "
            "process; ratio = fastest of ours / baseline; segments/s (median of chunks).",
            "",
            "| variant | params | " + " | ".join(modes) + " | baseline | ratio |",
            "|---|---:|" + "---:|" * (len(modes) + 2),
        ]
        for r in figures["train"]:
            cells = [_cell(r["modes"][m]) for m in modes] + [_cell(r["baseline"])]
            lines.append(
                f"| {r['variant']} | {r['params'] or 0:,} | "
                + " | ".join(cells)
                + f" | {_ratio(r['ratio'])} |"
            )
        failures = [
            f"* {r['variant']} {m}: {f['error']}"
            for r in figures["train"]
            for m, f in [*r["modes"].items(), ("baseline", r["baseline"])]
            if "error" in f
        ]
        lines += ["", "Failed:", "", *failures] if failures else []
    for section, unit in (("loader", "segments/s"), ("prepare", "clips/s")):
        if section in figures:
            lines += ["", f"| {section} | {unit} |", "|---|---:|"]
            lines += [f"| {k} | {v:,.1f} |" for k, v in figures[section].items()]
    if "infer" in figures:
        t = figures["infer"]
        lines += [
            "",
            f"Tagging a 30 s wav (se-multi, width {t['width']:g}, CPU): {t['median_s']:.3f} s "
            f"(median of {t['repeats']}; first call {t['first_s']:.3f} s)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="resemul_bench_") as tmp:
        figures = run(args, Path(tmp))
    for path, text in (
        (args.json, json.dumps(figures, indent=2) + "\n"),
        (args.markdown, markdown(figures) if args.markdown else ""),
    ):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


if __name__ == "__main__":
    main()
