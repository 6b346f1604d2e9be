"""The training loop of the paper's recipe: epochs of steps, validation, stages, checkpoints.

Public: :func:`train`, :func:`train_step`, :func:`validation_loss`, :func:`log_progress`.

:func:`train` reads as one loop (``_fit``); the recipe's pure functions are in
:mod:`resemul_core.training.schedule` (specification §3), the run's bookkeeping (progress,
checkpoints, resuming) in :mod:`resemul_core.training.state`, the run directory's layout in
:mod:`resemul_core.training.run_dir`, and the device and precision rules in
:mod:`resemul_core.runtime`. Resuming is exact: a resumed CPU run ends with bit-identical
weights to an uninterrupted one.

Under ``torchrun`` the same call trains data-parallel (:mod:`resemul_core.training.distributed`):
every rank takes its contiguous share of each global batch of ``batch_size`` segments (the rows
of :func:`~resemul_core.training.schedule.epoch_batches`), weights its loss by its share so that
DDP's gradient average is the global batch mean, and BatchNorm statistics are over the global
batch (``sync_bn``); rank 0 writes the checkpoints and the log while the others wait. The data
order, and hence resuming, do not depend on the number of processes.

On CUDA the loop lets cuDNN choose its kernels, copies int16 batches from pinned memory without
blocking, dequantizes them on the GPU, and reads the loss back only every ``_LOSS_CHECK_EVERY``
steps: a steady-state step makes no host synchronisation. ``data_on_device`` keeps the whole
training split on the GPU; ``compile`` compiles the forward and backward passes, on a single GPU
as CUDA graphs (:func:`~resemul_core.runtime.compile_model`), which removes the per-kernel launch
cost that limits small-batch training on a fast GPU.

Progress is reported twice over: tqdm bars (``progress=True``, for a terminal) and log lines of
the ``resemul_core.training`` loggers at INFO: one at least every :data:`PROGRESS_EVERY_S`
seconds within an epoch (step, running loss, learning rate, speed), one per epoch (losses) and
one per stage. The command line shows them; :func:`log_progress` shows them in a notebook,
where a tqdm bar would store every redraw in the executed notebook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from resemul_core.config import RunConfig
from resemul_core.data.datasets import SegmentBatches, SegmentDataset
from resemul_core.data.store import SegmentStore, open_store
from resemul_core.locks import directory_lock
from resemul_core.model.inference import run_model
from resemul_core.runtime import (
    autocast,
    compile_model,
    configure_backends,
    deterministic_algorithms,
    select_device,
)
from resemul_core.training.distributed import (
    check_world_size,
    data_parallel,
    process_group,
    requested_world_size,
    shard,
)
from resemul_core.training.feeding import ResidentSplit, device_batches
from resemul_core.training.init_from import check_init_from, freeze, train_mode
from resemul_core.training.rng import set_rng_state
from resemul_core.training.run_dir import LAST_CHECKPOINT
from resemul_core.training.schedule import (
    bce_loss,
    decayed_learning_rate,
    epoch_batches,
    stage_learning_rate,
    steps_per_epoch,
)
from resemul_core.training.state import (
    TrainResult,
    _Run,
    _start_run,
    check_fits_store,
    saved_run_config,
)

__all__ = ["PROGRESS_EVERY_S", "log_progress", "train", "train_step", "validation_loss"]

logger = logging.getLogger(__name__)


# How often (in steps) the loss is copied off the accelerator to be checked for NaN/inf: every
# step would synchronise the GPU every step.
_LOSS_CHECK_EVERY = 50

#: Seconds between two progress lines within an epoch (logged when the losses are read back,
#: so a line costs no extra host synchronisation).
PROGRESS_EVERY_S = 120.0


@contextlib.contextmanager
def log_progress(stream=None, *, level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Print the training loggers' progress lines to ``stream`` (default: stdout) meanwhile.

    For notebooks: ``with log_progress(): fit(...)`` shows a line per stage, per epoch and at
    least every :data:`PROGRESS_EVERY_S` seconds within an epoch, few enough to keep in an
    executed notebook. The handler and the logger's level are restored afterwards.
    """
    target = logging.getLogger("resemul_core.training")
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.setLevel(level)
    before = target.level
    target.addHandler(handler)
    if target.getEffectiveLevel() > level:
        target.setLevel(level)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(before)


def train(
    store: SegmentStore | str | os.PathLike,
    run_dir: str | os.PathLike,
    config: RunConfig | None = None,
    *,
    resume: bool | Literal["auto"] = False,
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one variant on a segment store with the staged recipe; resumable at any step.

    Args:
        store: a :class:`SegmentStore` or its directory; uses its 'train' and 'valid' splits.
        run_dir: where checkpoints and the log go (see the module docstring).
        config: the model, recipe and runtime (:func:`resemul_core.profiles.resolve_config`),
            required for a fresh run; its model must fit the store (tags, segment length). On
            resume it may be left out (the saved one is used); if given, its model and recipe
            must equal the saved ones and its runtime (device, workers, ...) is used.
        resume: ``True``: continue the run in ``run_dir`` from ``last.pt``; ``"auto"``: continue
            it if there is one, else start afresh; ``False``: start afresh.
        overwrite: start afresh even if ``run_dir`` holds a run (its files are replaced).
        max_steps: stop after this many optimizer steps of this call, saving ``last.pt``
            (to split a run over time-limited sessions; resume continues identically).
        progress: show tqdm progress bars.

    Returns:
        A :class:`TrainResult`; the final model is ``RUN_DIR/best.pt``.

    Raises:
        FileExistsError: a fresh run into a directory holding one, without ``overwrite``.
        CheckpointError: on resume, ``last.pt`` is unreadable or belongs to another store,
            variant or config; nothing in ``run_dir`` is written. For a fresh run, its
            ``init_from`` is damaged or does not fit the model
            (:mod:`resemul_core.training.init_from`).
        TrainingDiverged: the training or validation loss became NaN/inf.
        FileNotFoundError: a fresh run's ``init_from`` does not exist.
        ValueError: the store's segment length does not fit the model, or a split is empty.

    Note:
        As in the official code, ``best.pt`` keeps the best epoch of the *current* stage (Keras'
        ModelCheckpoint restarts from +inf each stage), so the final model is the last stage's
        best even if an earlier stage reached a lower validation loss.

    Note:
        Started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), every process
        calls this and they train one model data-parallel (see the module docstring and
        :mod:`resemul_core.training.distributed`); the store and ``run_dir`` must be visible to
        every
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
    run_dir = Path(run_dir)
    if resume == "auto":
        resume = (run_dir / LAST_CHECKPOINT).is_file() and not overwrite
        if resume:
            logger.info("%s holds a run; resuming it", run_dir)
    requested = config if config is not None or not resume else saved_run_config(run_dir)
    if requested is None:
        raise ValueError("a fresh run needs a config (resemul_core.profiles.resolve_config)")
    # before any process joins a group or loads the split: fail on every rank, not hang
    check_world_size(
        requested_world_size(),
        batch_size=requested.train.batch_size,
        sync_bn=requested.runtime.sync_bn,
    )
    device = select_device(requested.runtime.device)  # resolved once, here
    if not resume:  # before the run directory is created (or cleared)
        check_fits_store(requested.model, store)
        check_init_from(requested, run_dir)
    # the audio this run reads, against its digests: a damaged store must not train silently
    store.verify_clips(
        np.concatenate([store.split_indices("train"), store.split_indices("valid")]),
        progress=progress and _is_main_process(),
    )
    with _run_dir_lock(run_dir), process_group(cuda=device.type == "cuda") as ranks:
        run = _start_run(
            store,
            run_dir,
            config,
            device=device,
            resume=bool(resume),
            overwrite=overwrite,
            ranks=ranks,
        )
        with deterministic_algorithms(run.config.runtime.deterministic):
            return _fit(run, train_set, val_set, max_steps=max_steps, progress=progress)


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a plain process (known before the group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_dir_lock(run_dir: Path) -> contextlib.AbstractContextManager:
    """The run directory's lock, held by rank 0 (or the only process) while it trains: a
    second ``train`` into the same directory stops at once instead of mixing its checkpoints
    with this one's (:mod:`resemul_core.locks`)."""
    return directory_lock(run_dir, "train") if _is_main_process() else contextlib.nullcontext()


def _fit(
    run: _Run,
    train_set: SegmentBatches,
    val_set: Dataset,
    *,
    max_steps: int | None,
    progress: bool,
) -> TrainResult:
    """The loop of :func:`train`: epochs of steps, validation, stage changes, checkpoints."""
    state, model, device, ranks = run.state, run.model, run.device, run.ranks
    config, runtime = run.config.train, run.config.runtime
    configure_backends(device, config.precision)
    if config.val_segments is not None and config.val_segments < len(val_set):
        val_set = Subset(val_set, range(config.val_segments))
    num_steps = steps_per_epoch(len(train_set), config)
    freeze(model, config.freeze_blocks)  # before DDP registers its gradient hooks
    net = data_parallel(model, device, sync_bn=runtime.sync_bn) if ranks.distributed else model
    forward = (
        compile_model(net, device=device, distributed=ranks.distributed) if runtime.compile else net
    )
    resident = ResidentSplit(train_set, device) if runtime.data_on_device else None
    if run.saved_rng is not None:
        set_rng_state(run.saved_rng, device)  # after everything that draws random numbers
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
        train_mode(model, config.freeze_blocks)  # the frozen blocks stay in eval mode
        pending: list[torch.Tensor] = []  # losses still on the device
        started = time.perf_counter()
        reported, reported_step = started, state.step
        for waveform, labels in device_batches(
            train_set, rows, device=device, num_workers=runtime.num_workers, resident=resident
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
            checkpoint_now = state.step % runtime.checkpoint_every == 0 and state.step < num_steps
            if len(pending) >= _LOSS_CHECK_EVERY or checkpoint_now or stop_now:
                run.record_losses(pending)
                bar.set_postfix(loss=f"{state.loss_sum / state.step:.4f}", lr=f"{lr:.2e}")
                now = time.perf_counter()
                if ranks.is_main and now - reported >= PROGRESS_EVERY_S:
                    logger.info(
                        "stage %d epoch %d: step %d/%d, train loss %.4f, lr %.2e, %.1f steps/s",
                        state.stage.stage,
                        state.epoch,
                        state.step,
                        num_steps,
                        state.loss_sum / state.step,
                        lr,
                        (state.step - reported_step) / (now - reported),
                    )
                    reported, reported_step = now, state.step
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
            num_workers=runtime.num_workers,
            progress=progress and ranks.is_main,
            distributed=ranks.distributed,
        )
        last_lr = decayed_learning_rate(stage_lr, state.stage_step - 1, decay=config.lr_decay)
        run.end_epoch(
            val_loss, lr=last_lr, num_steps=num_steps, val_seconds=time.perf_counter() - started
        )
    logger.info("run %s finished after %d epochs; model: %s", run.dir, state.epoch, run.best_path)
    return run.result()


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
        precision: "fp32", "tf32" or "bf16" (:mod:`resemul_core.runtime`).
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

    The forward passes are :func:`~resemul_core.model.inference.run_model`'s.

    Args:
        model: maps ``(B, L)`` waveforms to ``(B, T)`` logits; on ``device``.
        dataset: items ``(waveform (L,), labels (T,))``, e.g. a :class:`SegmentDataset`.
        batch_size: segments per forward pass; does not change the value.
        device: a ``torch.device`` or a name for :func:`select_device` ("auto", "cpu", ...).
        precision: "fp32", "tf32" or "bf16" (:mod:`resemul_core.runtime`); training's.
        distributed: every rank of the initialised process group calls this with the same
            model weights and dataset; each scores its contiguous share and the sums of the
            losses and of the segment counts are all-reduced, so all get the same value.

    Returns:
        The mean over segments of the per-segment BCE (mean over tags).

    Note:
        The official validation averages 665 batch means of 23 segments from a looping reader
        that over-reads 5 segments (specification §3); this is the exact mean over the segments.
    """
    device = select_device(str(device))
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
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for out in run_model(
        model, loader, device=device, precision=precision, progress=progress, desc="validation"
    ):
        logits, (labels,) = out.logits, out.extra
        labels = labels.to(device, non_blocking=True)  # B, T
        per_segment = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(
            dim=1
        )  # B
        total += per_segment.sum(dtype=torch.float64)
        count += labels.shape[0]
    if distributed:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        total, count = sums[0], int(sums[1].item())
    if count == 0:
        raise ValueError("the validation set holds no segments")
    return float(total.item() / count)
