"""Data benchmarks of ``bench/run.py``: preprocessing clips/s and training loaders segments/s.

* :func:`make_clips`, :func:`time_prepare`, :func:`time_librosa`: ``prepare_store`` on
  generated mp3 clips (29.1 s, 16 kHz mono like MTAT's) with one process and with every core,
  against a plain ``librosa.load(path, sr=22050, duration=29)`` loop (decoding and resampling
  only, the usual baseline).
* :func:`make_bench_data`, :func:`write_npy_clips`, :func:`time_loaders`: a segment store of
  random clips and the same clips as one decoded float32 ``.npy`` file each (how peer
  repositories feed their models),
  then segments/s of the loaders: :class:`~resemul_core.data.datasets.SegmentDataset` read by
  read, through a ``DataLoader``, :class:`~resemul_core.data.datasets.SegmentBatches` (one int16
  read per batch), and the per-item ``.npy`` baseline (:class:`NpyClips`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from resemul_core.data.datasets import SegmentBatches, SegmentDataset
from resemul_core.data.prepare import prepare_store
from resemul_core.data.sources import read_table
from resemul_core.data.store import SegmentStore, write_store_from_arrays
from resemul_core.training.schedule import epoch_batches


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
    """Seconds for ``prepare_store`` of the clips in ``table`` with ``workers`` processes."""
    start = time.perf_counter()
    prepare_store(read_table(table), out, workers=workers, progress=False)
    return time.perf_counter() - start


def time_librosa(folder: Path) -> float:
    """Seconds for ``librosa.load`` of every mp3 in ``folder`` (22,050 Hz, first 29 s)."""
    import librosa

    paths = sorted(folder.glob("*.mp3"))
    librosa.load(paths[0], sr=22_050, mono=True, duration=29.0)  # lazy imports, not decoding
    start = time.perf_counter()
    for path in paths:
        librosa.load(path, sr=22_050, mono=True, duration=29.0)
    return time.perf_counter() - start


def make_bench_data(
    folder: Path,
    *,
    clips: int,
    segments_per_clip: int = 10,
    segment_length: int = 59_049,
    num_tags: int = 50,
) -> tuple[SegmentStore, Path]:
    """Random clips as a store (all in 'train') and as one float32 ``.npy`` per clip.

    Returns:
        The store, and the folder of ``clip{i}.npy`` files (``(segments_per_clip *
        segment_length,)`` float32 each, the decoded clip) with ``labels.npy``
        ``(clips, num_tags)`` float32.
    """
    rng = np.random.default_rng(0)
    waveforms = [
        (0.3 * rng.standard_normal((segments_per_clip, segment_length))).clip(-1, 1)
        for _ in range(clips)
    ]
    labels = (rng.random((clips, num_tags)) < 0.1).astype(np.uint8)
    store = write_store_from_arrays(
        folder / "store",
        waveforms=waveforms,
        labels=labels,
        splits=["train"] * clips,
        tags=[f"tag{k}" for k in range(num_tags)],
    )
    return store, write_npy_clips(store, folder / "npy")


def write_npy_clips(store: SegmentStore, folder: Path, *, split: str = "train") -> Path:
    """The clips of a store's split as the baseline reads them: ``clip{i}.npy``, the decoded
    float32 clip ``(segments_per_clip * segment_length,)`` of the split's ``i``-th clip, and
    ``labels.npy`` ``(clips, num_tags)`` float32. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = store.split_indices(split)
    for i, index in enumerate(indices):
        np.save(folder / f"clip{i}.npy", store.read_clip(int(index)).reshape(-1))
    np.save(folder / "labels.npy", np.asarray(store.labels)[indices].astype(np.float32))
    return folder


class NpyClips(Dataset):
    """The baseline loader: item ``k`` loads clip ``k // S``'s whole ``.npy`` file and cuts
    segment ``k % S`` from it, as float32 ``(L,)``, with the clip's ``(T,)`` labels."""

    def __init__(self, folder: Path, *, segments_per_clip: int, segment_length: int) -> None:
        self.folder = folder
        self.labels = torch.from_numpy(np.load(folder / "labels.npy"))
        self.segments_per_clip = segments_per_clip
        self.segment_length = segment_length

    def __len__(self) -> int:
        return len(self.labels) * self.segments_per_clip

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        clip, segment = divmod(k, self.segments_per_clip)
        audio = np.load(self.folder / f"clip{clip}.npy")
        start = segment * self.segment_length
        return torch.from_numpy(audio[start : start + self.segment_length]), self.labels[clip]


def _drain(loader: DataLoader, segments: int) -> float:
    """Segments/s of iterating ``loader`` (restarted as needed) until ``segments`` are seen;
    the first batch (worker start-up) is not timed."""
    seen, started = 0, None
    while seen < segments:
        for waveforms, _ in loader:
            if started is None:
                started = time.perf_counter()
                continue
            seen += len(waveforms)
            if seen >= segments:
                break
    return seen / (time.perf_counter() - started)


def time_loaders(
    store: SegmentStore,
    npy: Path,
    *,
    segments: int,
    batch_size: int = 23,
    num_workers: int = 2,
) -> dict[str, float]:
    """Segments/s of each loader over shuffled training segments (files in the page cache).

    Returns:
        ``{name: segments per second}`` for ``SegmentDataset`` read by read in this process,
        ``SegmentDataset`` through a ``DataLoader``, ``SegmentBatches`` (bulk int16) through
        a ``DataLoader``, and the per-item ``.npy`` baseline through a ``DataLoader``.
    """
    items = SegmentDataset(store, "train")
    order = np.random.default_rng(0).integers(0, len(items), segments)
    for k in order[:100]:  # warm the page cache and the memmap
        items[int(k)]
    start = time.perf_counter()
    for k in order:
        items[int(k)]
    figures = {"SegmentDataset, read by read": segments / (time.perf_counter() - start)}
    per_item = {"batch_size": batch_size, "shuffle": True, "num_workers": num_workers}
    figures[f"SegmentDataset + DataLoader ({num_workers} workers)"] = _drain(
        DataLoader(items, **per_item), segments
    )
    steps = -(-segments // batch_size) + 1
    rows = epoch_batches(len(items), batch_size=batch_size, num_steps=steps, seed=0, epoch=0)
    bulk = DataLoader(
        SegmentBatches(store, "train"), sampler=list(rows), batch_size=None, num_workers=num_workers
    )
    figures[f"SegmentBatches int16 + DataLoader ({num_workers} workers)"] = _drain(bulk, segments)
    baseline = NpyClips(
        npy, segments_per_clip=store.segments_per_clip, segment_length=store.segment_length
    )
    figures[f"baseline: one .npy per clip ({num_workers} workers)"] = _drain(
        DataLoader(baseline, **per_item), segments
    )
    return figures
