"""SegmentDataset / ClipDataset: items, ordering, labels, DataLoader workers, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from resemul_core.data.datasets import ClipDataset, SegmentDataset
from resemul_core.data.store import write_store_from_arrays


@pytest.fixture
def store(tmp_path):
    # sample value = clip + segment / 16 + position / 1024: each item identifies itself
    counts = [3, 1, 2, 2, 1]
    waveforms = [
        np.array([[(c + s / 16 + p / 1024) / 8 for p in range(6)] for s in range(n)], np.float32)
        for c, n in enumerate(counts)
    ]
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    return write_store_from_arrays(
        tmp_path / "store",
        waveforms=waveforms,
        labels=labels,
        splits=["train", "test", "train", "valid", "train"],
        tags=["a", "b", "c"],
    )


def identify(waveform: torch.Tensor) -> tuple[int, int]:
    value = float(waveform[0]) * 8
    return int(value), round((value % 1) * 16)


def test_segment_dataset_has_one_item_per_stored_segment(store):
    train = SegmentDataset(store, "train")
    assert len(train) == 3 + 2 + 1
    assert [identify(train[k][0]) for k in range(len(train))] == [
        (0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (4, 0),
    ]  # fmt: skip
    waveform, labels = train[4]
    assert waveform.dtype == torch.float32 and waveform.shape == (6,)
    assert labels.dtype == torch.float32 and labels.tolist() == [0, 0, 1]
    # the int16 store: 2**-15 steps, so values land within 2**-16 of the written ones
    expected = torch.tensor([(2 + 1 / 16 + p / 1024) / 8 for p in range(6)])
    assert torch.abs(waveform - expected).max() <= 2**-16
    assert len(SegmentDataset(store.path, "valid")) == 2
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SegmentDataset(store, "dev")


def test_clip_dataset_returns_all_segments_of_a_clip(store):
    clips = ClipDataset(store, "train")
    assert len(clips) == 3
    segments, labels, index = clips[1]
    assert index == 2 and segments.shape == (2, 6) and labels.tolist() == [0, 0, 1]
    assert [identify(s) for s in segments] == [(2, 0), (2, 1)]
    assert ClipDataset(store, "test")[0][0].shape == (1, 6)


def test_worker_processes_and_pickling_read_the_same_items(store):
    train = SegmentDataset(store, "train")
    train[0]  # opens the memmap in this process before the workers fork
    single = [identify(w) for w, _ in DataLoader(train, batch_size=None)]
    loader = DataLoader(train, batch_size=2, num_workers=2)
    batches = [(w, y) for w, y in loader]
    assert [identify(w) for b, _ in batches for w in b] == single
    assert batches[0][1].shape == (2, 3)
    clone = pickle.loads(pickle.dumps(train))
    assert clone.store._segments is None  # the mapping is reopened, not shipped
    assert identify(clone[5][0]) == (4, 0)
