"""Training-step benchmarks of ``bench/run.py``: our training step against a plain baseline.

* :func:`time_ours`: the library's path, as :func:`~resemul_core.train.train` runs it: int16
  batches from the segment store (:func:`~resemul_core.train.device_batches`, through a
  ``DataLoader`` or gathered from a :class:`~resemul_core.train.ResidentSplit`), dequantized
  on the device, :func:`~resemul_core.train.train_step` under bf16 autocast with cuDNN
  autotuning and TF32 (:func:`~resemul_core.train.enable_cuda_speedups`), optionally
  ``torch.compile``; the loss is never read back.
* :func:`time_baseline`: a plain loop as peer repositories write it: per-item float32 ``.npy``
  loading (:class:`data_speed.NpyClips`), fp32, eager, ``loss.item()`` every step.

Both time forward + backward + Nesterov SGD with the data loading included, after untimed
warm-up steps, in segments per second.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from data_speed import NpyClips
from torch.utils.data import DataLoader

from resemul_core.datasets import SegmentBatches
from resemul_core.model import build_model, count_parameters
from resemul_core.store import SegmentStore
from resemul_core.train import (
    ResidentSplit,
    TrainConfig,
    bce_loss,
    build_optimizer,
    device_batches,
    enable_cuda_speedups,
    epoch_batches,
    train_step,
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(
    variant: str,
    *,
    store: SegmentStore,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compile: bool = False,
    data_on_device: bool = False,
    num_workers: int = 2,
) -> dict:
    """Our training step fed from the store; ``{"segments_per_s", "s_per_step", "params"}``."""
    torch.manual_seed(0)
    if device.type == "cuda":
        enable_cuda_speedups()
    model = build_model(variant, num_tags=store.num_tags, width=width).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(), stage=0)
    forward = torch.compile(model) if compile else model
    batches = SegmentBatches(store, "train")
    rows = epoch_batches(
        len(batches), batch_size=batch_size, num_steps=warmup + steps, seed=0, epoch=0
    )
    resident = ResidentSplit(batches, device) if data_on_device else None
    loader = device_batches(
        batches, rows, device=device, num_workers=num_workers, resident=resident
    )
    started = time.perf_counter()
    for step, (waveform, labels) in enumerate(loader):
        if step == warmup:
            _synchronize(device)
            started = time.perf_counter()
        train_step(forward, optimizer, waveform, labels, lr=0.01, autocast=True)
    _synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {
        "params": count_parameters(model),
        "s_per_step": seconds,
        "segments_per_s": batch_size / seconds,
    }


def time_baseline(
    variant: str,
    *,
    npy: Path,
    store: SegmentStore,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    num_workers: int = 2,
) -> dict:
    """The plain loop on the ``.npy`` files; ``{"segments_per_s", "s_per_step", "params"}``."""
    torch.manual_seed(0)
    model = build_model(variant, num_tags=store.num_tags, width=width).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dataset = NpyClips(
        npy, segments_per_clip=store.segments_per_clip, segment_length=store.segment_length
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,  # the bench's few clips would restart them often
    )
    running, step = 0.0, 0
    started = time.perf_counter()
    while step < warmup + steps:
        for waveform, labels in loader:
            if step == warmup:
                _synchronize(device)
                started = time.perf_counter()
            waveform, labels = waveform.to(device), labels.to(device)
            loss = bce_loss(model(waveform), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()  # the usual running-loss print: a host sync every step
            step += 1
            if step == warmup + steps:
                break
    seconds = (time.perf_counter() - started) / steps
    return {
        "params": count_parameters(model),
        "s_per_step": seconds,
        "segments_per_s": batch_size / seconds,
    }
