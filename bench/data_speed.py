"""Data pipeline speed: preprocessing clips/s and store random-access segments/s.

Generates its own clips (29.1 s, 16 kHz mono mp3 like MTAT's; a few tones plus noise), then
times:

* ``prepare_store`` with one process and with every core (decode mp3 → 22,050 Hz with soxr →
  10 segments of 59,049 samples → int16 slot, fsync'ed, journaled);
* a plain ``librosa.load(path, sr=22050, duration=29)`` loop over the same files (decoding and
  resampling only, nothing written), the usual baseline;
* random single-segment reads through :class:`~resemul_core.datasets.SegmentDataset` (shuffled
  order, store in the page cache) and a ``DataLoader`` with workers.

Usage::

    .venv/bin/python bench/data_speed.py                    # 40 clips
    .venv/bin/python bench/data_speed.py --clips 200 --workers 8 --json bench/out/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from resemul_core.datasets import SegmentDataset
from resemul_core.prepare import prepare_store
from resemul_core.sources import read_table


def make_clips(folder: Path, count: int, *, seconds: float = 29.1, rate: int = 16_000) -> Path:
    """``count`` mp3 clips and a table listing them (80/10/10 random split)."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    for k in range(count):
        rng = np.random.default_rng(k)
        freqs = rng.uniform(110, 1760, 3)
        audio = sum(np.sin(2 * np.pi * f * t) for f in freqs) / 6 + rng.normal(0, 0.02, t.size)
        sf.write(folder / f"clip{k:04d}.mp3", audio.astype(np.float32), rate)
    names = [f"clip{k:04d}.mp3" for k in range(count)]
    table = folder / "clips.csv"
    pd.DataFrame({"path": names, "tags": ["x"] * count}).to_csv(table, index=False)
    return table


def time_prepare(table: Path, out: Path, workers: int) -> float:
    start = time.perf_counter()
    prepare_store(read_table(table), out, workers=workers, progress=False)
    return time.perf_counter() - start


def time_librosa(folder: Path) -> float:
    import librosa

    paths = sorted(folder.glob("*.mp3"))
    librosa.load(paths[0], sr=22_050, mono=True, duration=29.0)  # lazy imports, not decoding
    start = time.perf_counter()
    for path in paths:
        librosa.load(path, sr=22_050, mono=True, duration=29.0)
    return time.perf_counter() - start


def time_reads(store_dir: Path, reads: int) -> tuple[float, float]:
    """Segments/s of shuffled single reads, in-process and through a 2-worker DataLoader."""
    dataset = SegmentDataset(store_dir, "train")
    order = np.random.default_rng(0).integers(0, len(dataset), reads)
    for k in order[:100]:  # warm the page cache
        dataset[int(k)]
    start = time.perf_counter()
    for k in order:
        dataset[int(k)]
    direct = reads / (time.perf_counter() - start)
    loader = DataLoader(dataset, batch_size=23, shuffle=True, num_workers=2)
    start, seen = time.perf_counter(), 0
    while seen < reads:
        for waveforms, _ in loader:
            seen += len(waveforms)
            if seen >= reads:
                break
    return direct, seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="clips to generate (40)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="all cores")
    parser.add_argument("--reads", type=int, default=5000, help="random segment reads (5000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="data_speed_") as tmp:
        tmp = Path(tmp)
        table = make_clips(tmp / "clips", args.clips)
        one = time_prepare(table, tmp / "store1", workers=1)
        many = time_prepare(table, tmp / "storeN", workers=args.workers)
        baseline = time_librosa(tmp / "clips")
        same = all(
            (tmp / "store1" / n).read_bytes() == (tmp / "storeN" / n).read_bytes()
            for n in ("segments.npy", "clips.csv", "labels.npy", "manifest.json")
        )
        direct, loader = time_reads(tmp / "store1", args.reads)
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clips": args.clips,
        "prepare_1_process_clips_per_s": round(args.clips / one, 2),
        f"prepare_{args.workers}_processes_clips_per_s": round(args.clips / many, 2),
        "librosa_load_loop_clips_per_s": round(args.clips / baseline, 2),
        "stores_identical": same,
        "random_segment_reads_per_s": round(direct),
        "dataloader_2_workers_segments_per_s": round(loader),
    }
    for key, value in figures.items():
        print(f"{key:40s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
