"""What the integrity checks cost: opening a store, and reading every clip against its digest.

``train`` checks the clips of the splits it reads before its first step and ``evaluate`` those
it scores (:mod:`resemul_core.data.integrity`); ``resemul data verify`` checks them all. The
baseline is the cheapest way to touch the same bytes, reading the memory-mapped array clip by
clip without hashing, in the same invocation and interleaved round by round. The store is
written once to a temporary folder (``--clips`` clips of ten 59,049-sample segments: 1.18 MB
each) and read from the page cache, so the figures are CPU cost, not disk speed.

Usage::

    .venv/bin/python bench/verify_speed.py --clips 400 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from resemul_core.data.store import open_store, write_store_from_arrays

MTAT_CLIPS = 21_105  # train + valid + test of the paper's split
SEGMENTS, LENGTH = 10, 59_049


def make_store(path: Path, clips: int) -> None:
    rng = np.random.default_rng(0)

    class Clips:  # made on demand: memory holds one clip at a time
        def __len__(self) -> int:
            return clips

        def __getitem__(self, i: int) -> np.ndarray:
            if i >= clips:
                raise IndexError(i)
            return rng.uniform(-0.5, 0.5, (SEGMENTS, LENGTH)).astype(np.float32)

    write_store_from_arrays(
        path,
        waveforms=Clips(),
        labels=np.zeros((clips, 1), dtype=np.uint8),
        splits=["train"] * clips,
        tags=["t"],
    )


def read_plain(path: Path) -> float:
    started = time.perf_counter()
    store = open_store(path)
    total = 0
    for i in range(store.num_clips):
        total += int(store.segments[i, :, ::4096].sum())  # touch every page
        store.segments[i].tobytes()
    return time.perf_counter() - started


def read_verified(path: Path) -> float:
    started = time.perf_counter()
    open_store(path).verify_clips()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        make_store(path, args.clips)
        opens, plain, verified = [], [], []
        read_plain(path)  # warm the page cache
        for _ in range(args.rounds):
            started = time.perf_counter()
            open_store(path)
            opens.append(time.perf_counter() - started)
            plain.append(read_plain(path))
            verified.append(read_verified(path))
    mb = args.clips * SEGMENTS * LENGTH * 2 / 1e6
    p, v = statistics.median(plain), statistics.median(verified)
    print(f"store: {args.clips} clips, {mb:,.0f} MB; medians of {args.rounds} rounds")
    print(f"open_store (manifest, index, labels, header, size): {statistics.median(opens):.3f} s")
    print(f"read every clip, no hashing (baseline): {p:.2f} s ({mb / p:,.0f} MB/s)")
    print(f"verify every clip (digest + zero padding): {v:.2f} s ({mb / v:,.0f} MB/s)")
    print(f"ratio verify / baseline: {v / p:.2f}")
    mtat = MTAT_CLIPS * SEGMENTS * LENGTH * 2 / 1e6
    seconds = mtat / (mb / v)
    print(f"MTAT's {MTAT_CLIPS:,} clips ({mtat / 1e3:.1f} GB) at this rate: {seconds:.0f} s")


if __name__ == "__main__":
    main()
