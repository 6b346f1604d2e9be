"""PyTorch datasets over a segment store: one item per segment (training) or per clip (evaluation).

Public: :class:`SegmentDataset`, :class:`ClipDataset`.

Both read the store's int16 memmap lazily in the process that indexes them, so they are safe
with ``DataLoader(num_workers>0)`` under fork and spawn alike. Every segment inherits its clip's
label vector (SPEC §1.1); clip-level predictions average over the clip's segments at evaluation.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import SegmentStore, dequantize, open_store

__all__ = ["SegmentDataset", "ClipDataset"]


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
