"""Data-parallel training with PyTorch's own engine: process group, batch shards, synced BN.

Public: :class:`Ranks`, :func:`process_group`, :func:`requested_world_size`,
:func:`check_world_size`, :func:`shard`, :class:`SyncBatchNorm1d`, :func:`convert_sync_batchnorm`.

:func:`~resemul_core.training.loop.train` runs data-parallel when started by ``torchrun`` (or any
launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``)::

    torchrun --nproc_per_node 8 -m resemul_core.interfaces.cli train --variant se-multi ...

Each process joins the group (NCCL on CUDA, gloo on the CPU), drives the GPU ``cuda:LOCAL_RANK``
and takes its contiguous share of every global batch (:func:`shard`). The global batch stays
``TrainConfig.batch_size`` segments, whatever the number of processes.

Note:
    BatchNorm in training mode normalises with the statistics of the batch it sees. With
    ``TrainConfig.sync_bn`` (the default) those are the global batch's, as on the paper's single
    GPU (:func:`convert_sync_batchnorm`); without it each rank uses its own
    ``batch_size / world_size`` segments (23 over 8 GPUs: 2 or 3), a noisier estimate that
    changes what is trained. Dropout masks are drawn per rank either way.

Note:
    Speed: at batch 23 a step on one fast GPU takes milliseconds, and every synchronised
    BatchNorm layer adds two small all-reduces to it, so more GPUs pay off only for larger
    batches or slower GPUs. How many is measured by ``make gpu-check`` on a machine with two
    or more GPUs (``bench/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Ranks",
    "SyncBatchNorm1d",
    "check_world_size",
    "convert_sync_batchnorm",
    "data_parallel",
    "process_group",
    "requested_world_size",
    "shard",
]

logger = logging.getLogger(__name__)

# DDP's switch for broadcasting rank 0's buffers before every forward: `broadcast_buffers` until
# torch 2.12, `forward_sync_buffers` from 2.13 on (where the old name warns).
_DDP_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run; a single process is rank 0 of 1.

    Every method is a no-op (or the identity) in a single process, so that the training loop
    reads the same with one process or many. The collective methods must be called by every
    rank in the same order.

    Attributes:
        rank: global rank, 0 .. world_size - 1; rank 0 writes checkpoints and logs.
        world_size: number of processes.
        local_rank: rank on this machine; the CUDA device index.
        backend: "nccl" or "gloo"; None in a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here (after rank 0 has written a file the others read)."""
        if not self.distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BN running statistics) to every rank, in place."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def process_group(*, cuda: bool) -> Iterator[Ranks]:
    """Join the data-parallel process group described by the environment, if any.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun``). Without them, or
    with ``WORLD_SIZE=1``, yields a single-process :class:`Ranks` and does nothing. A group
    that the caller already initialised is used as it is and left open; one created here is
    destroyed on exit.

    Args:
        cuda: the run trains on CUDA: NCCL, and this process uses ``cuda:LOCAL_RANK``;
            otherwise gloo.
    """
    if dist.is_available() and dist.is_initialized():
        yield _current_ranks()
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Ranks()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if cuda else "gloo"
    options: dict[str, Any] = {}
    if cuda:
        torch.cuda.set_device(local_rank)
        options["device_id"] = torch.device("cuda", local_rank)  # binds NCCL to this GPU
    dist.init_process_group(backend=backend, **options)  # env:// rendezvous
    ranks = _current_ranks()
    logger.info("joined a %s group as rank %d of %d", backend, ranks.rank, ranks.world_size)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def requested_world_size() -> int:
    """The number of processes a run will have: the initialised group's, else ``WORLD_SIZE``
    (set by ``torchrun``), else 1. Known before any process joins the group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def check_world_size(world_size: int, *, batch_size: int, sync_bn: bool) -> None:
    """Refuse a number of processes that cannot share the global batch.

    Every rank needs at least one segment of each batch of ``batch_size``; without synchronised
    BatchNorm it needs two, since BatchNorm in training mode cannot normalise a single value
    per channel (the head's ``BatchNorm1d`` raises on it, mid-run, on some ranks only).
    Call it before joining the process group, so that every rank fails at once.

    Raises:
        ValueError: naming the batch, the number of processes and the largest that works.
    """
    if world_size > batch_size:
        raise ValueError(
            f"{world_size} processes cannot share a batch of {batch_size} segments "
            f"(each needs at least one); use at most {batch_size} processes"
        )
    if not sync_bn and batch_size // world_size < 2:
        raise ValueError(
            f"without synchronised BatchNorm every process normalises its own share of the "
            f"batch, but a batch of {batch_size} over {world_size} processes leaves some "
            f"{batch_size // world_size} segment; use at most {batch_size // 2} processes, "
            "or keep sync_bn"
        )


def _current_ranks() -> Ranks:
    backend = str(dist.get_backend())
    return Ranks(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend="nccl" if "nccl" in backend else "gloo",
    )


def shard(rows: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of every global batch.

    Args:
        rows: ``(steps, B)`` item indices, one global batch per row
            (:func:`~resemul_core.training.schedule.epoch_batches`).

    Returns:
        ``(steps, b)`` with ``b = B // world_size``, one more for the first
        ``B % world_size`` ranks (``numpy.array_split``); 23 over 2 ranks: 12 and 11.
    """
    batch = rows.shape[1]
    if batch < world_size:
        raise ValueError(f"a batch of {batch} segments cannot be split over {world_size} ranks")
    return np.array_split(rows, world_size, axis=1)[rank]


class _AllReduceSum(torch.autograd.Function):
    """``y = sum of x over the ranks``, differentiable: each rank's gradient is the sum of
    the gradients of ``y`` on all ranks."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are over the global batch of all ranks.

    In eval mode, or outside a process group, it is ``BatchNorm1d``. In training mode under
    DDP the mean and the biased variance are computed over every rank's items (two all-reduces,
    differentiable, so gradients flow through the statistics of the whole batch), the running
    statistics get the unbiased variance, as in PyTorch's BatchNorm. Works with gloo (CPU),
    where ``torch.nn.SyncBatchNorm`` does not run, and NCCL, where it makes no host sync.

    Shapes:
        input ``(B, C)`` or ``(B, C, L)``; output the same, in the input's dtype (the
        statistics are computed in float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0] if x.dim() == 2 else [0, 2]
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
        xf = x.float()
        local = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), local]))
        count = sums[-1]
        mean = sums[:-1] / count  # C
        centred = xf - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count  # C, biased
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative average, as in BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every ``BatchNorm1d`` in ``module`` normalise over the global batch, in place.

    The layers become :class:`SyncBatchNorm1d`, on every backend. It takes over the old layers'
    parameter and buffer tensors, so an optimizer built before the conversion still updates
    them and ``state_dict`` keys do not change.

    Returns:
        ``module`` (or its replacement, if ``module`` itself is a ``BatchNorm1d``).

    Note:
        Not ``torch.nn.SyncBatchNorm``, on CUDA either: its forward reads the gathered
        per-rank counts back to the host (a boolean mask that drops empty ranks), which
        synchronises the host with the GPU in every BatchNorm layer of every step. Here every
        rank holds part of every batch (:func:`check_world_size`), so two all-reduces suffice
        and the step stays asynchronous.
    """
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm1d:
        sync = SyncBatchNorm1d(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        return sync.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


def data_parallel(model: nn.Module, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """Wrap ``model`` for data-parallel training in the initialised process group.

    With ``sync_bn`` its BatchNorm layers are converted in place (:func:`convert_sync_batchnorm`)
    and DDP does not broadcast buffers: synced statistics keep them equal on every rank.
    """
    if sync_bn:
        convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{_DDP_BUFFER_SYNC: not sync_bn},
    )
