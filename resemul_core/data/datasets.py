"""PyTorch datasets over a segment store: one item per segment (training) or per clip (evaluation).

Public: :class:`SegmentDataset`, :class:`SegmentBatches`, :class:`ClipDataset`,
:func:`dequantize_tensor`.

All read the store's int16 memmap lazily in the process that indexes them, so they are safe
with ``DataLoader(num_workers>0)`` under fork and spawn alike. Every segment inherits its clip's
label vector (specification §1.1); clip-level predictions average over the clip's segments at
evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from resemul_core.data.store import SegmentStore, dequantize, open_store

__all__ = ["SegmentDataset", "SegmentBatches", "ClipDataset", "dequantize_tensor"]


def _as_store(store: SegmentStore | str | os.PathLike) -> SegmentStore:
    return store if isinstance(store, SegmentStore) else open_store(store)


class SegmentDataset(Dataset):
    """Every stored segment of one split; item ``k`` → ``(waveform, labels)``.

    Args:
        store: an open :class:`SegmentStore` or its directory.
        split: 'train', 'valid' or 'test'.

    Items:
        ``waveform``: ``(L,)`` float32 tensor in [-1, 1); ``labels``: ``(num_tags,)`` float32 0/1
        tensor of the segment's clip. Items are ordered clip by clip, segment by segment; shuffle
        with the DataLoader.

    Attributes:
        clip_index: ``(len,)`` int64, the clip of each item; ``segment_index``: its slot.
    """

    def __init__(self, store: SegmentStore | str | os.PathLike, split: str) -> None:
        self.store = _as_store(store)
        self.split = split
        clips = self.store.split_indices(split)
        counts = self.store.clips["num_segments"].to_numpy()[clips]
        self.clip_index = np.repeat(clips, counts).astype(np.int64)
        starts = np.cumsum(counts) - counts
        self.segment_index = (np.arange(int(counts.sum())) - np.repeat(starts, counts)).astype(
            np.int64
        )
        self._labels = torch.from_numpy(self.store.labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.clip_index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = int(self.clip_index[k]), int(self.segment_index[k])
        waveform = torch.from_numpy(dequantize(self.store.segments[i, j]))
        return waveform, self._labels[i]


def dequantize_tensor(samples: torch.Tensor) -> torch.Tensor:
    """int16 samples → float32 ``q / 32768``, on the tensor's device.

    Bit-identical to :func:`~resemul_core.data.store.dequantize`: every int16 is exact in float32
    and the scale is a power of two, so the product is exact wherever it is computed.
    """
    return samples.float().mul_(1.0 / 32768.0)


class SegmentBatches(Dataset):
    """Whole batches of one split's segments, read in one go and left as int16.

    Item ``rows`` (a sequence of :class:`SegmentDataset` indices of the same split) →
    ``(samples, labels)``: ``(len(rows), L)`` int16 and ``(len(rows), num_tags)`` float32, in
    the order of ``rows``. Use it as ``DataLoader(batches, sampler=list_of_rows,
    batch_size=None)`` and dequantize on the device (:func:`dequantize_tensor`): one memmap
    read per batch instead of one per segment, and half the bytes of float32 to copy.

    Args:
        store: an open :class:`SegmentStore` or its directory.
        split: 'train', 'valid' or 'test'.
    """

    def __init__(self, store: SegmentStore | str | os.PathLike, split: str) -> None:
        self.items = SegmentDataset(store, split)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        clips = self.items.clip_index[rows]
        samples = self.items.store.segments[clips, self.items.segment_index[rows]]  # b, L
        return torch.from_numpy(samples), self.items._labels[clips]


class ClipDataset(Dataset):
    """Every clip of one split with all its segments; item ``k`` → ``(segments, labels, clip)``.

    Args:
        store: an open :class:`SegmentStore` or its directory.
        split: 'train', 'valid' or 'test'.

    Items:
        ``segments``: ``(num_segments_i, L)`` float32 tensor (10 × 59,049 for a full MTAT clip);
        ``labels``: ``(num_tags,)`` float32; ``clip``: the clip's index in the store (int).
        Clips may hold different numbers of segments, so batch with ``batch_size=None`` or a
        custom collate function.
    """

    def __init__(self, store: SegmentStore | str | os.PathLike, split: str) -> None:
        self.store = _as_store(store)
        self.split = split
        self.clip_index = self.store.split_indices(split)
        self._labels = torch.from_numpy(self.store.labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.clip_index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = int(self.clip_index[k])
        return torch.from_numpy(self.store.read_clip(i)), self._labels[i], i
