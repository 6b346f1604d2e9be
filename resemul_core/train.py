"""Training with the paper's recipe: staged Nesterov SGD, early stopping, resumable runs (SPEC §3).

Public: :class:`TrainConfig`, :class:`Profile`, :data:`PROFILES`, :func:`train`,
:class:`TrainResult`, :class:`TrainingDiverged`, :class:`StageState`, :class:`StageUpdate`,
:func:`update_stage`, :func:`stage_learning_rate`, :func:`decayed_learning_rate`,
:func:`steps_per_epoch`, :func:`epoch_batches`, :func:`bce_loss`, :func:`build_optimizer`,
:func:`train_step`, :func:`compile_model`, :func:`device_batches`, :class:`ResidentSplit`,
:func:`validation_loss`, :func:`select_device`,
:func:`saved_train_config`, :func:`num_blocks_for`, :data:`RUN_LOG`, :data:`RUNTIME_FIELDS`.

The recipe (``R:train.py``): five learning-rate stages 0.01 → 1.6e-5 (×0.2); each starts from
the previous stage's best-validation-loss weights with a fresh SGD optimizer (momentum 0.9,
Nesterov, Keras time decay 1e-6 per step); a stage ends at the 3rd consecutive epoch without a
lower validation loss. An epoch is ``ceil(train segments / 23)`` steps of 23 random segments.

A run directory holds::

    config.json   what the run was started with (for people; the checkpoints are authoritative)
    last.pt       the full training state, written every ``checkpoint_every`` steps and after
                  every epoch; ``train(..., resume=True)`` continues from it
    best.pt       the model with the lowest validation loss of the current stage
    log.csv       one row per epoch: losses, learning rate, stage, time, throughput

Resuming is exact: the data order of an epoch is a function of ``(seed, epoch)``, the step
within the epoch is saved, and so are the optimizer and all RNG states; a resumed CPU run ends
with bit-identical weights to an uninterrupted one.

Under ``torchrun`` the same call trains data-parallel (DDP, :mod:`resemul_core.distributed`):
every rank takes its contiguous share of each global batch of ``batch_size`` segments (the rows
of :func:`epoch_batches`), weights its loss by its share so that DDP's gradient average is the
global batch mean, and BatchNorm statistics are over the global batch (``sync_bn``); rank 0
writes the checkpoints and the log while the others wait. The data order, and hence resuming,
do not depend on the number of processes.

Numerical precision is one setting of the recipe, ``TrainConfig.precision`` (``"fp32"``, the
paper's and the ``paper`` profile's; ``"tf32"``; ``"bf16"``, the ``demo`` and ``tiny`` profiles'),
recorded in every checkpoint (:mod:`resemul_core.precision`).

On CUDA the loop lets cuDNN choose its kernels, copies int16 batches from pinned memory without
blocking, dequantizes them on the GPU, and reads the loss back only every ``_LOSS_CHECK_EVERY``
steps: a steady-state step makes no host synchronisation. ``data_on_device`` keeps the whole
training split on the GPU; ``compile`` compiles the forward and backward passes, on a single GPU
as CUDA graphs (:func:`compile_model`), which removes the per-kernel launch cost that limits
small-batch training on a fast GPU.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    CheckpointError,
    read_checkpoint,
    save_checkpoint,
)
from .config import DictConfig
from .datasets import SegmentBatches, SegmentDataset, dequantize_tensor
from .distributed import (
    Ranks,
    check_world_size,
    convert_sync_batchnorm,
    process_group,
    requested_world_size,
    shard,
)
from .files import atomic_write, write_json
from .model import ModelConfig, SampleCNN, model_config
from .precision import autocast, check_precision, configure_backends
from .store import SegmentStore, open_store

__all__ = [
    "PROFILES",
    "RUNTIME_FIELDS",
    "RUN_LOG",
    "Profile",
    "ResidentSplit",
    "StageState",
    "StageUpdate",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "bce_loss",
    "build_optimizer",
    "compile_model",
    "decayed_learning_rate",
    "device_batches",
    "epoch_batches",
    "num_blocks_for",
    "saved_train_config",
    "select_device",
    "stage_learning_rate",
    "steps_per_epoch",
    "train",
    "train_step",
    "update_stage",
    "validation_loss",
]

logger = logging.getLogger(__name__)

#: Per-epoch metrics of a run, ``RUN_DIR/log.csv``.
RUN_LOG = "log.csv"
RUN_CONFIG = "config.json"
LOG_COLUMNS = (
    "epoch",
    "stage",
    "lr",
    "train_loss",
    "val_loss",
    "best_val_loss",
    "improved",
    "steps",
    "global_step",
    "train_seconds",
    "val_seconds",
    "segments_per_s",
)

# DDP's switch for broadcasting rank 0's buffers before every forward: `broadcast_buffers` until
# torch 2.12, `forward_sync_buffers` from 2.13 on (where the old name warns).
_DDP_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)

# How often (in steps) the loss is copied off the accelerator to be checked for NaN/inf: every
# step would synchronise the GPU every step.
_LOSS_CHECK_EVERY = 50


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Every number of the training recipe; stored in every checkpoint.

    The defaults are the paper's (``R:train.py``, SPEC §3). The fields in
    :data:`RUNTIME_FIELDS` only decide where and how fast the run goes and may change on resume.

    Note:
        Keras' ``fit(epochs=100, initial_epoch=...)`` with epoch numbers continuing across
        stages caps the epoch *index* at 100, so the official code left later stages fewer
        than 100 epochs; here every stage may run ``max_epochs_per_stage`` epochs. With
        patience 2 neither cap is reached on MTAT.

    Note:
        Data-parallel runs (``torchrun``) keep ``batch_size`` as the *global* batch. With
        ``sync_bn`` (the default) BatchNorm normalises over the global batch as the paper's
        single GPU did, and a run matches a single-process run up to float rounding, except
        that dropout masks are drawn per rank. Without it every rank normalises its own
        ``batch_size / world_size`` segments: faster, but a different (noisier) model.
    """

    learning_rate: float = 0.01  # lr of the first stage (SPEC §3, R:train.py:21)
    lr_factor: float = 0.2  # lr multiplier from one stage to the next (SPEC §3, R:train.py:28-30)
    num_stages: int = 5  # learning-rate stages: 0.01, 0.002, 4e-4, 8e-5, 1.6e-5 (SPEC §3)
    momentum: float = 0.9  # SGD momentum (SPEC §3, R:train.py:22)
    nesterov: bool = True  # Nesterov momentum (SPEC §3, R:train.py:106)
    lr_decay: float = 1e-6  # Keras time decay per step: lr_t = lr / (1 + decay t) (SPEC §3)
    weight_decay: float = 0.0  # L2 coefficient; official default 0 (SPEC §2.3, R:train.py:26)
    batch_size: int = 23  # segments per optimizer step (SPEC §3, R:train.py:20)
    patience: int = 2  # Keras 2.0.5 EarlyStopping patience: stop at 3rd bad epoch (SPEC §3)
    max_epochs_per_stage: int = 100  # epochs per stage at most (SPEC §3, R:train.py:70)
    max_steps_per_epoch: int | None = None  # cap on steps; None: ceil(segments/batch) (SPEC §3)
    val_segments: int | None = None  # validate on the first N segments; None: all (SPEC §3)
    val_batch_size: int = 230  # segments per validation forward pass (no effect on the value)
    seed: int = 0  # seeds weights, data order and dropout (not in the paper)
    precision: str = "fp32"  # "fp32" (the paper's), "tf32" or "bf16" (resemul_core.precision)
    checkpoint_every: int = 1000  # optimizer steps between resume checkpoints (runtime)
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1" (runtime)
    compile: bool = False  # torch.compile forward + backward; CUDA graphs on one GPU (runtime)
    deterministic: bool = False  # deterministic CUDA kernels, no autotuning: slower (runtime)
    num_workers: int = 0  # DataLoader worker processes; 0 = load in the main process (runtime)
    data_on_device: bool = False  # hold the training split on the device as int16 (runtime)
    sync_bn: bool = True  # under DDP, BN statistics over the global batch, not per rank (runtime)

    def __post_init__(self) -> None:
        positive = ("learning_rate", "batch_size", "num_stages", "max_epochs_per_stage")
        for name in positive + ("val_batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps_per_epoch", "val_segments"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0 or None, got {value}")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ValueError(f"TrainConfig.lr_factor must lie in (0, 1], got {self.lr_factor}")
        if self.patience < 0 or self.lr_decay < 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ValueError("patience, lr_decay, weight_decay and momentum must be >= 0")
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig.num_workers must be >= 0, got {self.num_workers}")
        check_precision(self.precision)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`; also reads checkpoints written before ``precision``
        existed (their ``autocast: true`` was bf16, ``false`` fp32)."""
        data = dict(data)
        if "autocast" in data and "precision" not in data:
            data["precision"] = "bf16" if data.pop("autocast") else "fp32"
        return super().from_dict(data)


#: TrainConfig fields that do not change the result and may differ when a run is resumed.
RUNTIME_FIELDS = frozenset(
    {
        "checkpoint_every",
        "device",
        "compile",
        "deterministic",
        "num_workers",
        "data_on_device",
        "sync_bn",
    }
)


@dataclass(frozen=True)
class Profile:
    """A named training budget: a :class:`TrainConfig` and the model options it implies.

    Smaller profiles change sizes and budgets only (width, stages, epochs, steps per epoch),
    never the algorithm.

    Note:
        ``paper`` trains in float32 as the paper did; ``demo`` and ``tiny`` use bf16 autocast
        (``precision="bf16"``, also on the CPU), which makes the book's CPU runs faster and
        their numbers slightly different from float32 ones (the measured difference is on the
        book's training page).

    Note:
        ``demo`` and ``tiny`` also shorten the horizon of BatchNorm's running averages
        (``bn_momentum`` 0.1 instead of Keras' 0.01, i.e. ~10 steps instead of ~100). This
        leaves training itself unchanged (train-mode BN uses batch statistics; the training
        losses are identical) and only lets the inference-time statistics keep up with
        weights that move fast over a few hundred steps. With the paper's 0.01, a 540-step
        ``demo`` run of se-multi on the synthetic data scored test ROC-AUC 0.58; with 0.1, 0.75
        (MTAT epochs of 6,631 steps make the horizon irrelevant for ``paper``).
    """

    name: str
    description: str
    config: TrainConfig
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. width


#: The training profiles: the paper's recipe, the book on a CPU and on a GPU, a smoke run.
PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        description=(
            "The paper's recipe at full width in float32: 5 stages, up to 100 epochs each, "
            "6,631 steps of 23 segments per MTAT epoch."
        ),
        config=TrainConfig(num_workers=6),
        model={"width": 1.0},
    ),
    "demo": Profile(
        name="demo",
        description=(
            "Sized for the book on 2 CPU cores (1-3 minutes per variant in bf16): width 1/16, "
            "2 stages of at most 3 epochs of 120 steps (<= 720 steps of 23 segments), "
            "validation on <= 230 segments, BN averaging horizon ~10 steps."
        ),
        config=TrainConfig(
            num_stages=2,
            max_epochs_per_stage=3,
            max_steps_per_epoch=120,
            val_segments=230,
            precision="bf16",
            checkpoint_every=120,
        ),
        model={"width": 0.0625, "bn_momentum": 0.1},
    ),
    "gpu": Profile(
        name="gpu",
        description=(
            "The book on one GPU: the paper's width in bf16, 2 stages of at most 3 epochs of "
            "1,000 steps (<= 6,000 steps of 23 segments), validation on <= 2,300 segments, "
            "the training split held on the GPU."
        ),
        config=TrainConfig(
            num_stages=2,
            max_epochs_per_stage=3,
            max_steps_per_epoch=1000,
            val_segments=2300,
            precision="bf16",
            checkpoint_every=1000,
            data_on_device=True,
        ),
        model={"width": 1.0},
    ),
    "tiny": Profile(
        name="tiny",
        description=(
            "A smoke test in seconds: width 1/16, bf16, 2 stages of at most 3 epochs of 10 steps."
        ),
        config=TrainConfig(
            num_stages=2,
            max_epochs_per_stage=3,
            max_steps_per_epoch=10,
            val_segments=230,
            precision="bf16",
            checkpoint_every=5,
        ),
        model={"width": 1 / 16, "bn_momentum": 0.1},
    ),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


# --- schedule: small pure functions ---------------------------------------------------------


@dataclass(frozen=True)
class StageState:
    """Where a run stands within its learning-rate stage (the Keras callbacks' state).

    Attributes:
        stage: 0-based stage index; the learning rate is ``lr * lr_factor ** stage``.
        best_loss: lowest validation loss of this stage (``inf`` before its first epoch).
        best_epoch: global epoch index of ``best_loss`` (-1 before the first epoch).
        wait: Keras EarlyStopping's counter of non-improving epochs.
        epochs: epochs completed in this stage.
    """

    stage: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    epochs: int = 0


class StageUpdate(NamedTuple):
    """The outcome of one epoch's validation: new state, whether it improved, whether the
    stage is over."""

    state: StageState
    improved: bool
    stage_over: bool


def update_stage(
    state: StageState, val_loss: float, *, epoch: int, patience: int, max_epochs: int
) -> StageUpdate:
    """Advance the stage state by one epoch's validation loss (Keras 2.0.5 semantics).

    An epoch improves when ``val_loss < best_loss`` (min_delta 0; NaN never improves). On a
    non-improving epoch Keras 2.0.5 first checks ``wait >= patience`` and only then increments
    ``wait`` (``K205:keras/callbacks.py:490-503``), so with patience 2 the stage ends at the
    3rd consecutive epoch without improvement. A stage also ends after ``max_epochs`` epochs.

    Args:
        state: the state before this epoch.
        val_loss: this epoch's validation loss.
        epoch: this epoch's global index (recorded as ``best_epoch`` on improvement).
        patience: Keras patience (2 in the paper).
        max_epochs: epochs per stage at most.
    """
    epochs = state.epochs + 1
    if val_loss < state.best_loss:
        new = replace(state, best_loss=float(val_loss), best_epoch=epoch, wait=0, epochs=epochs)
        return StageUpdate(new, True, epochs >= max_epochs)
    patience_out = state.wait >= patience
    new = replace(state, wait=state.wait + 1, epochs=epochs)
    return StageUpdate(new, False, patience_out or epochs >= max_epochs)


def stage_learning_rate(config: TrainConfig, stage: int) -> float:
    """The initial learning rate of a stage: ``learning_rate * lr_factor ** stage``."""
    return config.learning_rate * config.lr_factor**stage


def decayed_learning_rate(stage_lr: float, step: int, *, decay: float) -> float:
    """Keras time-based decay: ``stage_lr / (1 + decay * step)``.

    Args:
        stage_lr: the stage's initial learning rate.
        step: optimizer steps already taken by this stage's optimizer (0 for the first step).
        decay: decay per step (1e-6 in the paper).
    """
    return stage_lr / (1.0 + decay * step)


def steps_per_epoch(num_segments: int, config: TrainConfig) -> int:
    """``ceil(num_segments / batch_size)`` (6,631 for MTAT), capped by ``max_steps_per_epoch``."""
    if num_segments <= 0:
        raise ValueError("the training split holds no segments")
    steps = math.ceil(num_segments / config.batch_size)
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return steps


def epoch_batches(
    num_items: int, *, batch_size: int, num_steps: int, seed: int, epoch: int
) -> np.ndarray:
    """The training batches of one epoch: a random permutation, reproducible from (seed, epoch).

    Returns:
        ``(num_steps, batch_size)`` int64 item indices. The permutation is repeated cyclically
        when the steps need more items than there are, so every batch is full.

    Note:
        The official pipeline streams full batches of 23 from a shuffle buffer; a full
        permutation per epoch is the spec's equivalent (SPEC §3). Filling the last batch from
        the permutation's start (rather than a short batch) keeps every step at 23 segments
        and avoids a batch of one, which BatchNorm cannot normalise.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_items)
    return np.resize(order, num_steps * batch_size).reshape(num_steps, batch_size)


# --- model, loss, optimizer -----------------------------------------------------------------


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over tags and batch, computed in float32.

    Args:
        logits: ``(B, T)`` model outputs before the sigmoid.
        targets: ``(B, T)`` 0/1 labels.

    Note:
        Keras clips the sigmoid output to [1e-7, 1 - 1e-7] before the log (SPEC §3), which caps
        the per-tag loss at about 16.1 and zeroes its gradient for saturated outputs. This is
        PyTorch's numerically stable ``binary_cross_entropy_with_logits`` without that clip;
        the two agree unless a logit exceeds about ±16.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    waveform: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    precision: str = "fp32",
    loss_weight: float = 1.0,
) -> torch.Tensor:
    """One optimizer step on one batch; the loss stays on the device (no host sync).

    Args:
        model: maps ``(B, L)`` waveforms to ``(B, T)`` logits; a :class:`SampleCNN`, its
            DDP wrapper or :func:`compile_model`'s compiled forward.
        optimizer: updated in place, every parameter group at learning rate ``lr``.
        waveform: ``(B, L)`` float32 samples on the model's device.
        labels: ``(B, T)`` 0/1 float32 on the model's device.
        lr: this step's learning rate. A Python float: the optimizer step runs eagerly (a few
            multi-tensor kernels), so a new value each step costs neither a recompilation nor
            a host sync.
        precision: "fp32", "tf32" or "bf16" (:mod:`resemul_core.precision`).
        loss_weight: factor on the loss before the backward pass; under DDP, ``B * world_size
            / global batch`` so that DDP's gradient average is the mean over the global batch.

    Returns:
        The batch's mean loss (unweighted), a detached 0-dim float32 tensor on the device.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(waveform.device, precision):
        logits = model(waveform)  # B, T
    loss = bce_loss(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_weight if loss_weight != 1.0 else loss).backward()
    optimizer.step()
    return loss.detach()


def build_optimizer(model: nn.Module, config: TrainConfig, *, stage: int) -> torch.optim.SGD:
    """A fresh SGD optimizer for a stage (momentum buffers empty, decay step count 0).

    Note:
        PyTorch's Nesterov update equals Keras' for a constant learning rate; with the 1e-6
        time decay the learning rate changes by < 1 % per 10,000 steps, so the forms agree
        to that order.
    """
    return torch.optim.SGD(
        model.parameters(),
        lr=stage_learning_rate(config, stage),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def num_blocks_for(segment_length: int) -> int:
    """The number of blocks whose input is ``segment_length = 3 ** (num_blocks + 1)`` samples."""
    n = round(math.log(segment_length, 3)) - 1
    if n < 3 or 3 ** (n + 1) != segment_length:
        raise ValueError(
            f"segment length {segment_length} is not 3**(n + 1) for n >= 3 blocks "
            "(59049 = 3**10 for the paper's 9 blocks)"
        )
    return n


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; otherwise as named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 230,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    distributed: bool = False,
) -> float:
    """Segment-level BCE over a validation set, model in eval mode (dropout off, BN frozen).

    Args:
        model: maps ``(B, L)`` waveforms to ``(B, T)`` logits.
        dataset: items ``(waveform (L,), labels (T,))``, e.g. a :class:`SegmentDataset`.
        batch_size: segments per forward pass; does not change the value.
        precision: "fp32", "tf32" or "bf16" (:mod:`resemul_core.precision`); training's.
        distributed: every rank of the initialised process group calls this with the same
            model weights and dataset; each scores its contiguous share and the sums of the
            losses and of the segment counts are all-reduced, so all get the same value.

    Returns:
        The mean over segments of the per-segment BCE (mean over tags).

    Note:
        The official validation averages 665 batch means of 23 segments from a looping reader
        that over-reads 5 segments (SPEC §3); this is the exact mean over the segments.
    """
    device = torch.device(device)
    if distributed:
        share = np.array_split(np.arange(len(dataset)), dist.get_world_size())[dist.get_rank()]
        dataset = Subset(dataset, share.tolist())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for waveform, labels in tqdm(loader, desc="validation", leave=False, disable=not progress):
        waveform = waveform.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(waveform)
        per_segment = F.binary_cross_entropy_with_logits(
            logits.float(), labels, reduction="none"
        ).mean(dim=1)
        total += per_segment.sum(dtype=torch.float64)
        count += labels.shape[0]
    model.train(was_training)
    if distributed:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        total, count = sums[0], int(sums[1].item())
    if count == 0:
        raise ValueError("the validation set holds no segments")
    return float(total.item() / count)


# --- run state ------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Everything besides weights, optimizer and RNGs that says where a run stands."""

    stage: StageState = field(default_factory=StageState)
    epoch: int = 0  # global epoch index, continues across stages
    step: int = 0  # optimizer steps completed in this epoch
    stage_step: int = 0  # steps taken by this stage's optimizer (Keras decay counter t)
    global_step: int = 0
    loss_sum: float = 0.0  # sum of this epoch's batch losses so far
    train_seconds: float = 0.0  # training time spent in this epoch so far
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Progress:
        values = dict(data)
        values["stage"] = StageState(**values["stage"])
        return cls(**values)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run directory.
        best_checkpoint: ``RUN_DIR/best.pt``.
        best_val_loss: lowest validation loss of the current (final, when finished) stage.
        epochs: epochs completed in total.
        global_step: optimizer steps taken in total.
        finished: False when stopped early by ``max_steps``; resume to continue.
    """

    run_dir: Path
    best_checkpoint: Path
    best_val_loss: float
    epochs: int
    global_step: int
    finished: bool


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a run draws from: torch's CPU one, the run device's CUDA one
    (only that one: the other visible GPUs are not the run's, and may be absent on resume),
    numpy's and Python's."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        # numpy and python states as plain lists so that weights_only loading accepts them
        "numpy": [
            str(np_state[0]),
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore :func:`_rng_state`'s generators; the CUDA one only on a CUDA device."""
    torch.set_rng_state(state["torch"])
    cuda = saved_cuda_rng_state(state["cuda"], device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def saved_cuda_rng_state(
    saved: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor | None:
    """The saved CUDA generator state to restore on ``device``, or None.

    Args:
        saved: a checkpoint's ``rng["cuda"]``: empty (saved on the CPU), the run device's one
            state, or, in checkpoints of earlier versions, one state per GPU visible then.
        device: the device the resumed run uses; ``cuda`` devices must carry their index.

    Returns:
        None on the CPU or when nothing was saved (a CPU run resumed on a GPU: the CUDA
        generator keeps the seed it has). Otherwise the one saved state, or from a per-GPU list the
        entry of ``device``'s index, or the first when that GPU was not visible then (a
        change of visible GPUs continues correctly, though with other dropout masks).
    """
    if device.type != "cuda" or len(saved) == 0:
        return None
    if len(saved) == 1:
        return saved[0]
    index = device.index or 0
    return saved[index] if index < len(saved) else saved[0]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _audio_info(store: SegmentStore) -> dict[str, Any]:
    """What the tagger needs to cut new audio exactly as the store was cut."""
    duration = store.manifest["params"].get("clip_duration")
    return {
        "sample_rate": store.sample_rate,
        "segment_length": store.segment_length,
        "segments_per_clip": store.segments_per_clip,
        "duration": float(duration) if isinstance(duration, (int, float)) else None,
    }


def _model_config(
    store: SegmentStore, variant: str, options: Mapping[str, Any] | None
) -> ModelConfig:
    options = dict(options or {})
    expected = num_blocks_for(store.segment_length)
    blocks = options.setdefault("num_blocks", expected)
    if blocks != expected:
        raise ValueError(
            f"store {store.path} holds segments of {store.segment_length} samples but a model "
            f"with num_blocks={blocks} takes {3 ** (blocks + 1)}"
        )
    options.pop("num_tags", None)
    return model_config(variant, num_tags=len(store.tags), **options)


def saved_train_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` stored in ``RUN_DIR/last.pt`` (to resume with changed runtime
    fields)."""
    path = Path(run_dir) / LAST_CHECKPOINT
    payload = read_checkpoint(path)
    try:
        return TrainConfig.from_dict(payload["train_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds no usable training config ({err})") from err


def _read_resume_state(
    run_dir: Path,
    store: SegmentStore,
    *,
    variant: str | None,
    config: TrainConfig | None,
    model_options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], TrainConfig, ModelConfig]:
    """Read and check ``last.pt`` against the store and the requested settings."""
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    payload = read_checkpoint(path)
    try:
        if payload.get("kind") != "train-state":
            raise ValueError("it is not a training-state checkpoint")
        saved_config = TrainConfig.from_dict(payload["train_config"])
        saved_model = ModelConfig.from_dict(payload["model_config"])
        _Progress.from_dict(payload["progress"])
        payload["optimizer_state"], payload["rng"]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from err
    if payload["store_fingerprint"] != store.fingerprint:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained on a store with fingerprint "
            f"{payload['store_fingerprint'][:12]}, but {store.path} has {store.fingerprint[:12]}"
        )
    if variant is not None and variant != saved_model.variant:
        raise CheckpointError(
            f"cannot resume from {path}: it trains {saved_model.variant!r}, not {variant!r}"
        )
    for key, value in (model_options or {}).items():
        if getattr(saved_model, key, object()) != value:
            raise CheckpointError(
                f"cannot resume from {path}: model option {key}={value!r} differs from the "
                f"checkpoint's {getattr(saved_model, key, None)!r}"
            )
    if config is None:
        return payload, saved_config, saved_model
    changed = [
        f"{f.name} ({getattr(saved_config, f.name)!r} -> {getattr(config, f.name)!r})"
        for f in fields(TrainConfig)
        if f.name not in RUNTIME_FIELDS and getattr(saved_config, f.name) != getattr(config, f.name)
    ]
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: training config differs in {', '.join(changed)}"
        )
    return payload, config, saved_model


def _claim_run_dir(run_dir: Path, *, overwrite: bool, ranks: Ranks) -> None:
    """Refuse to start a fresh run over an existing one unless ``overwrite``.

    Every rank looks (so that all raise together); rank 0 alone clears the directory.
    """
    ours = [BEST_CHECKPOINT, LAST_CHECKPOINT, RUN_LOG, RUN_CONFIG]
    present = [name for name in ours if (run_dir / name).exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"run directory {run_dir} already holds a run ({', '.join(present)}); "
            "resume it, or overwrite it explicitly"
        )
    ranks.barrier()  # nobody looks any more when rank 0 deletes
    if ranks.is_main:
        for name in present:
            (run_dir / name).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    ranks.barrier()


def _write_log_row(path: Path, row: Mapping[str, Any]) -> None:
    """Add an epoch's row to the CSV log, atomically; a re-run epoch replaces its old row."""
    rows: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < row["epoch"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    writer.writerow({k: row[k] for k in LOG_COLUMNS})
    with atomic_write(path, mode="w") as handle:
        handle.write(buffer.getvalue())


@dataclass
class _Run:
    """A run in progress: its directory, data, model, optimizer and progress.

    Holds the bookkeeping (checkpoints, log, stage changes) so that :func:`train` shows only
    the loop.
    """

    dir: Path
    store: SegmentStore
    config: TrainConfig
    model: SampleCNN
    optimizer: torch.optim.SGD
    state: _Progress
    device: torch.device
    ranks: Ranks = field(default_factory=Ranks)
    saved_rng: dict[str, Any] | None = None  # to restore right before the first step

    @property
    def last_path(self) -> Path:
        return self.dir / LAST_CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.dir / BEST_CHECKPOINT

    def info(self) -> dict[str, Any]:
        """What every checkpoint of the run carries besides the model."""
        return {
            "variant": self.model.config.variant,
            "train_config": self.config.to_dict(),
            "store_fingerprint": self.store.fingerprint,
            "store_path": str(self.store.path),
            "audio": _audio_info(self.store),
        }

    def save_last(self) -> None:
        """Write ``last.pt`` (rank 0) with every rank's RNG states; the others wait."""
        rng = self.ranks.gather_objects(_rng_state(self.device))
        if self.ranks.is_main:
            save_checkpoint(
                self.last_path,
                model=self.model,
                tags=self.store.tags,
                kind="train-state",
                **self.info(),
                progress=self.state.to_dict(),
                optimizer_state=self.optimizer.state_dict(),
                rng=rng[0],
                **({"rank_rng": rng} if self.ranks.distributed else {}),
            )
        self.ranks.barrier()

    def record_losses(self, pending: list[torch.Tensor]) -> None:
        """Add the pending batch losses to the epoch's sum; stop on a NaN/inf, naming its step.

        Under DDP each entry is a rank's share of its global batch's loss; the sum over ranks
        (one all-reduce for all pending steps) is the global batch mean.
        """
        values = self.ranks.all_reduce_sum(torch.stack(pending)).cpu().tolist() if pending else []
        for i, value in enumerate(values):
            if not math.isfinite(value):
                step = self.state.global_step - len(values) + i + 1
                raise TrainingDiverged(
                    f"training loss is {value} at global step {step} (stage "
                    f"{self.state.stage.stage}, epoch {self.state.epoch}); the last checkpoint "
                    f"{self.last_path} predates it"
                )
            self.state.loss_sum += value
        pending.clear()

    def end_epoch(self, val_loss: float, *, lr: float, num_steps: int, val_seconds: float) -> None:
        """Early stopping, best model, log row, stage change; then checkpoint the new epoch."""
        state = self.state
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"validation loss is {val_loss} after epoch {state.epoch} (global step "
                f"{state.global_step}); the last checkpoint {self.last_path} predates it"
            )
        update = update_stage(
            state.stage,
            val_loss,
            epoch=state.epoch,
            patience=self.config.patience,
            max_epochs=self.config.max_epochs_per_stage,
        )
        if update.improved and self.ranks.is_main:
            save_checkpoint(
                self.best_path,
                model=self.model,
                tags=self.store.tags,
                kind="model",
                **self.info(),
                stage=state.stage.stage,
                epoch=state.epoch,
                val_loss=val_loss,
            )
        train_loss = state.loss_sum / num_steps
        segments = num_steps * self.config.batch_size
        self._write_log_row(
            {
                "epoch": state.epoch,
                "stage": state.stage.stage,
                "lr": f"{lr:.6g}",
                "train_loss": f"{train_loss:.6f}",
                "val_loss": f"{val_loss:.6f}",
                "best_val_loss": f"{update.state.best_loss:.6f}",
                "improved": int(update.improved),
                "steps": num_steps,
                "global_step": state.global_step,
                "train_seconds": f"{state.train_seconds:.2f}",
                "val_seconds": f"{val_seconds:.2f}",
                "segments_per_s": f"{segments / max(state.train_seconds, 1e-9):.1f}",
            },
        )
        self.ranks.barrier()  # best.pt is written before any rank reads it (next_stage)
        logger.info(
            "epoch %d (stage %d, lr %.2e): train loss %.4f, val loss %.4f%s",
            state.epoch,
            state.stage.stage,
            lr,
            train_loss,
            val_loss,
            " (best)" if update.improved else "",
        )
        state.stage = update.state
        if update.stage_over and state.stage.stage + 1 >= self.config.num_stages:
            state.done = True
        elif update.stage_over:
            self.next_stage()
        state.epoch += 1
        state.step = 0
        state.loss_sum = 0.0
        state.train_seconds = 0.0
        self.save_last()

    def _write_log_row(self, row: Mapping[str, Any]) -> None:
        if self.ranks.is_main:
            _write_log_row(self.dir / RUN_LOG, row)

    def next_stage(self) -> None:
        """Restart from this stage's best weights with a fresh optimizer (``R:train.py:59-62``)."""
        stage, epoch = self.state.stage.stage, self.state.stage.best_epoch
        payload = read_checkpoint(self.best_path)
        if (
            payload.get("stage") != stage
            or payload.get("epoch") != epoch
            or payload.get("store_fingerprint") != self.store.fingerprint
        ):
            raise CheckpointError(
                f"{self.best_path} is not this run's best model of stage {stage} (epoch {epoch}); "
                f"it holds stage {payload.get('stage')}, epoch {payload.get('epoch')}"
            )
        self.model.load_state_dict(payload["model_state"])
        self.state.stage = StageState(stage=stage + 1)
        self.state.stage_step = 0
        self.optimizer = build_optimizer(self.model, self.config, stage=stage + 1)
        logger.info(
            "stage %d: lr %.2e, from the weights of epoch %d",
            stage + 1,
            stage_learning_rate(self.config, stage + 1),
            epoch,
        )

    def result(self) -> TrainResult:
        best = self.state.stage.best_loss
        if self.state.done:  # the final stage's best, also when resuming a finished run
            best = float(read_checkpoint(self.best_path).get("val_loss", math.nan))
        return TrainResult(
            self.dir,
            self.best_path,
            best,
            self.state.epoch,
            self.state.global_step,
            finished=self.state.done,
        )


def _start_run(
    store: SegmentStore,
    run_dir: Path,
    *,
    variant: str | None,
    config: TrainConfig | None,
    model_options: Mapping[str, Any] | None,
    resume: bool,
    overwrite: bool,
    ranks: Ranks,
) -> _Run:
    """Set up a fresh run, or rebuild a resumed one from ``last.pt`` (writing nothing)."""
    if resume:
        saved, config, mconfig = _read_resume_state(
            run_dir, store, variant=variant, config=config, model_options=model_options
        )
        last = run_dir / LAST_CHECKPOINT
        model = SampleCNN(mconfig)
        device = _rank_device(config.device, ranks)
        try:
            model.load_state_dict(saved["model_state"])
            model.to(device)
            state = _Progress.from_dict(saved["progress"])
            optimizer = build_optimizer(model, config, stage=state.stage.stage)
            optimizer.load_state_dict(saved["optimizer_state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot resume from {last}: {err}") from err
        if ranks.is_main:
            for stale in run_dir.glob(".*.pt.*.tmp"):  # left by a write that a kill interrupted
                stale.unlink(missing_ok=True)
        rng = saved["rng"]
        rank_rng = saved.get("rank_rng") or [rng]
        if len(rank_rng) == ranks.world_size:
            rng = rank_rng[ranks.rank]  # each rank continues its own dropout stream
        elif ranks.rank > 0:  # another number of processes: continue, though not bit-exactly
            torch.manual_seed(_rank_seed(config.seed, ranks.rank, state.global_step))
            rng = {**_rng_state(device), "numpy": rng["numpy"], "python": rng["python"]}
        logger.info(
            "resuming %s at stage %d, epoch %d, step %d",
            run_dir,
            state.stage.stage,
            state.epoch,
            state.step,
        )
        return _Run(run_dir, store, config, model, optimizer, state, device, ranks, rng)
    if variant is None:
        raise ValueError("a fresh run needs a variant")
    config = config or PROFILES["paper"].config
    mconfig = _model_config(store, variant, model_options)
    device = _rank_device(config.device, ranks)
    _claim_run_dir(run_dir, overwrite=overwrite, ranks=ranks)
    _seed_everything(config.seed)  # the same initial weights on every rank
    model = SampleCNN(mconfig).to(device)
    optimizer = build_optimizer(model, config, stage=0)
    if ranks.rank > 0:  # but each rank its own dropout masks
        torch.manual_seed(_rank_seed(config.seed, ranks.rank, 0))
    run = _Run(run_dir, store, config, model, optimizer, _Progress(), device, ranks)
    if ranks.is_main:
        write_json(run_dir / RUN_CONFIG, {**run.info(), "model_config": mconfig.to_dict()})
    return run


def _rank_device(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank: as configured, but ``cuda:LOCAL_RANK`` for CUDA under DDP;
    a CUDA device always with its index (its RNG state is saved and restored by index)."""
    device = select_device(name)
    if device.type != "cuda":
        return device
    if ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed (CPU and CUDA) of rank ``rank`` > 0 from ``step`` on: dropout masks
    independent of rank 0's."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# --- the loop -------------------------------------------------------------------------------


def train(
    store: SegmentStore | str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    config: TrainConfig | None = None,
    model_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one variant on a segment store with the staged recipe; resumable at any step.

    Args:
        store: a :class:`SegmentStore` or its directory; uses its 'train' and 'valid' splits.
        run_dir: where checkpoints and the log go (see the module docstring).
        variant: one of :data:`~resemul_core.model.VARIANTS`; required for a fresh run.
        config: the recipe; default ``PROFILES["paper"].config`` for a fresh run and the saved
            one on resume (then only :data:`RUNTIME_FIELDS` may differ from the saved config).
        model_options: :class:`~resemul_core.model.ModelConfig` overrides (``width``, ...).
            ``num_blocks`` follows from the store's segment length; ``num_tags`` from its tags.
        resume: continue the run in ``run_dir`` from ``last.pt``.
        overwrite: start afresh even if ``run_dir`` holds a run (its files are replaced).
        max_steps: stop after this many optimizer steps of this call, saving ``last.pt``
            (to split a run over time-limited sessions; resume continues identically).
        progress: show tqdm progress bars.

    Returns:
        A :class:`TrainResult`; the final model is ``RUN_DIR/best.pt``.

    Raises:
        FileExistsError: a fresh run into a directory holding one, without ``overwrite``.
        CheckpointError: on resume, ``last.pt`` is unreadable or belongs to another store,
            variant or config; nothing in ``run_dir`` is written.
        TrainingDiverged: the training or validation loss became NaN/inf.
        ValueError: the store's segment length does not fit the model, or a split is empty.

    Note:
        As in the official code, ``best.pt`` keeps the best epoch of the *current* stage (Keras'
        ModelCheckpoint restarts from +inf each stage), so the final model is the last stage's
        best even if an earlier stage reached a lower validation loss.

    Note:
        Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), every process
        calls this and they train one model data-parallel (see the module docstring and
        :mod:`resemul_core.distributed`); the store and ``run_dir`` must be visible to every
        rank. A DDP run resumed with the same number of processes continues exactly; with
        another number it continues correctly but with other dropout masks.
    """
    store = store if isinstance(store, SegmentStore) else open_store(store)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    train_set = SegmentBatches(store, "train")
    val_set: Dataset = SegmentDataset(store, "valid")
    for name, split in (("train", train_set), ("valid", val_set)):
        if len(split) == 0:
            raise ValueError(f"store {store.path} has no segments in its {name!r} split")
    requested = _requested_config(Path(run_dir), config, resume=resume)
    # before any process joins a group or loads the split: fail on every rank, not hang
    check_world_size(
        requested_world_size(), batch_size=requested.batch_size, sync_bn=requested.sync_bn
    )
    cuda = select_device(requested.device).type == "cuda"
    with process_group(cuda=cuda) as ranks:
        run = _start_run(
            store,
            Path(run_dir),
            variant=variant,
            config=config,
            model_options=model_options,
            resume=resume,
            overwrite=overwrite,
            ranks=ranks,
        )
        with deterministic_algorithms(run.config.deterministic):
            return _fit(run, train_set, val_set, max_steps=max_steps, progress=progress)


def _fit(
    run: _Run,
    train_set: SegmentBatches,
    val_set: Dataset,
    *,
    max_steps: int | None,
    progress: bool,
) -> TrainResult:
    """The loop of :func:`train`: epochs of steps, validation, stage changes, checkpoints."""
    config, state, model, device, ranks = run.config, run.state, run.model, run.device, run.ranks
    configure_backends(device, config.precision)
    if config.val_segments is not None and config.val_segments < len(val_set):
        val_set = Subset(val_set, range(config.val_segments))
    num_steps = steps_per_epoch(len(train_set), config)
    net: nn.Module = model
    if ranks.distributed:
        if config.sync_bn:
            convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **{_DDP_BUFFER_SYNC: not config.sync_bn},  # synced BN keeps them equal everywhere
        )
    forward = (
        compile_model(net, device=device, distributed=ranks.distributed) if config.compile else net
    )
    resident = ResidentSplit(train_set, device) if config.data_on_device else None
    if run.saved_rng is not None:
        _set_rng_state(run.saved_rng, device)  # after everything that draws random numbers
    steps_this_call = 0
    while not state.done:
        batches = epoch_batches(
            len(train_set),
            batch_size=config.batch_size,
            num_steps=num_steps,
            seed=config.seed,
            epoch=state.epoch,
        )
        rows = shard(batches[state.step :], rank=ranks.rank, world_size=ranks.world_size)
        share = rows.shape[1] / config.batch_size  # of the global batch; 1 in one process
        stage_lr = stage_learning_rate(config, state.stage.stage)
        bar = tqdm(
            total=num_steps,
            initial=state.step,
            desc=f"stage {state.stage.stage} epoch {state.epoch}",
            disable=not (progress and ranks.is_main),
            leave=False,
        )
        model.train()
        pending: list[torch.Tensor] = []  # losses still on the device
        started = time.perf_counter()
        for waveform, labels in device_batches(
            train_set, rows, device=device, num_workers=config.num_workers, resident=resident
        ):
            lr = decayed_learning_rate(stage_lr, state.stage_step, decay=config.lr_decay)
            loss = train_step(
                forward,
                run.optimizer,
                waveform,  # B, L
                labels,  # B, T
                lr=lr,
                precision=config.precision,
                loss_weight=share * ranks.world_size,
            )
            pending.append(loss * share if ranks.distributed else loss)
            state.step += 1
            state.stage_step += 1
            state.global_step += 1
            steps_this_call += 1
            bar.update()
            stop_now = max_steps is not None and steps_this_call >= max_steps
            checkpoint_now = state.step % config.checkpoint_every == 0 and state.step < num_steps
            if len(pending) >= _LOSS_CHECK_EVERY or checkpoint_now or stop_now:
                run.record_losses(pending)
                bar.set_postfix(loss=f"{state.loss_sum / state.step:.4f}", lr=f"{lr:.2e}")
            if checkpoint_now or stop_now:
                state.train_seconds += time.perf_counter() - started
                started = time.perf_counter()
                run.save_last()
            if stop_now:
                bar.close()
                logger.info("stopped after %d steps as asked; resume to continue", max_steps)
                return run.result()
        run.record_losses(pending)
        bar.close()
        state.train_seconds += time.perf_counter() - started
        started = time.perf_counter()
        ranks.broadcast_buffers(model)  # per-rank BN statistics (no sync_bn): rank 0's
        val_loss = validation_loss(
            model,
            val_set,
            batch_size=config.val_batch_size,
            device=device,
            precision=config.precision,
            num_workers=config.num_workers,
            progress=progress and ranks.is_main,
            distributed=ranks.distributed,
        )
        last_lr = decayed_learning_rate(stage_lr, state.stage_step - 1, decay=config.lr_decay)
        run.end_epoch(
            val_loss, lr=last_lr, num_steps=num_steps, val_seconds=time.perf_counter() - started
        )
    logger.info("run %s finished after %d epochs; model: %s", run.dir, state.epoch, run.best_path)
    return run.result()


def compile_model(
    net: nn.Module, *, device: torch.device, distributed: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` a training model: forward and backward as fused kernels.

    On one CUDA device the compiled graphs are replayed as CUDA graphs
    (``mode="reduce-overhead"``): at batch 23 an eager step issues hundreds of small kernels
    and the host, not the GPU, limits the speed; a graph replay is one launch. Under DDP the
    default mode is used (DDP's gradient hooks run between the graphs). The loss, the
    optimizer step and the learning rate stay outside, eager, so the per-step learning rate
    is a plain float that neither recompiles nor syncs.

    Args:
        net: the model (or its DDP wrapper) in training mode; its ``state_dict`` keys are
            unchanged (save the model, not the returned callable).
        device: where it runs.
        distributed: whether ``net`` is a DDP wrapper.

    Returns:
        ``forward(waveform (B, L)) -> logits (B, T)``. Shapes stay fixed during training (every
        batch is full), so it compiles once per process, plus once per train/eval switch.
    """
    cuda_graphs = device.type == "cuda" and not distributed
    compiled = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def forward(waveform: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: reuse the graph's memory
        return compiled(waveform)

    return forward


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, and only if ``enabled``, PyTorch uses deterministic kernels only.

    For bitwise-reproducible CUDA runs (and resumes): cuDNN and cuBLAS pick deterministic
    algorithms and :func:`~resemul_core.precision.configure_backends` turns autotuning off.
    Slower; CPU runs are reproducible without it. The previous setting is restored on exit.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    # cuBLAS reads this when its handle is made; without it deterministic mode raises
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _requested_config(run_dir: Path, config: TrainConfig | None, *, resume: bool) -> TrainConfig:
    """The config a run will use, known before the run is set up (to pick the DDP backend and
    check the number of processes): the given one, the saved one on resume, or the paper's."""
    if config is not None:
        return config
    if resume and (run_dir / LAST_CHECKPOINT).is_file():
        with contextlib.suppress(CheckpointError):
            return saved_train_config(run_dir)
    return PROFILES["paper"].config


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
