"""Feeding training batches to the device: read from the store, or gathered on the device.

Public: :class:`ResidentSplit`, :func:`device_batches`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from resemul_core.data.datasets import SegmentBatches, dequantize_tensor

__all__ = ["ResidentSplit", "device_batches"]

logger = logging.getLogger(__name__)


class ResidentSplit:
    """A split's int16 segments and labels held on the device; batches are gathered there.

    Args:
        batches: the split (its store is read once, 64 clips at a time).
        device: where to hold it. MTAT's training split takes 18 GB as int16 (15,250 clips
            x 10 x 59,049 samples); under DDP every rank holds all of it.
    """

    def __init__(self, batches: SegmentBatches, device: torch.device) -> None:
        store = batches.items.store
        clips, local = np.unique(batches.items.clip_index, return_inverse=True)
        shape = (len(clips), store.segments_per_clip, store.segment_length)
        self.segments = torch.empty(shape, dtype=torch.int16, device=device)  # clips, S, L
        for start in range(0, len(clips), 64):  # 64 clips (75 MB for MTAT) of host memory at once
            part = np.ascontiguousarray(store.segments[clips[start : start + 64]])
            self.segments[start : start + 64].copy_(torch.from_numpy(part))
        self.clip = torch.from_numpy(local.astype(np.int64)).to(device)  # item -> row above
        self.slot = torch.from_numpy(batches.items.segment_index).to(device)  # item -> segment
        self.labels = torch.from_numpy(store.labels[clips].astype(np.float32)).to(device)
        logger.info("training split on %s: %.2f GB of int16", device, self.segments.nbytes / 1e9)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` float32 waveforms and ``(B, T)`` labels of items ``rows`` (on the device)."""
        clip = self.clip[rows]
        return dequantize_tensor(self.segments[clip, self.slot[rows]]), self.labels[clip]


def device_batches(
    batches: SegmentBatches,
    rows: np.ndarray,
    *,
    device: torch.device,
    num_workers: int = 0,
    resident: ResidentSplit | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches of a plan, on the device, one per row of ``rows``.

    Args:
        batches: the split.
        rows: ``(steps, B)`` item indices (:func:`epoch_batches`, or a rank's shard of it).
        device: where the batches go.
        num_workers: DataLoader worker processes reading the int16 batches.
        resident: gather from this copy of the split on the device instead of reading.

    Yields:
        ``(B, L)`` float32 waveforms and ``(B, T)`` labels on ``device``: gathered from
        ``resident``, or read as int16 by the DataLoader (into pinned memory on CUDA), copied
        without blocking and dequantized on the device. Both give the same values.
    """
    if resident is not None:
        for step_rows in torch.from_numpy(rows).to(device):  # the plan, copied once
            yield resident.batch(step_rows)
        return
    loader = DataLoader(
        batches,
        sampler=list(rows),
        batch_size=None,  # items are whole batches
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the loader off the global RNG
    )
    for samples, labels in loader:
        waveform = dequantize_tensor(samples.to(device, non_blocking=True))  # B, L
        yield waveform, labels.to(device, non_blocking=True)
