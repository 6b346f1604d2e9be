"""The schedule of the paper's recipe as small pure functions (specification §3).

Public: :class:`StageState`, :class:`StageUpdate`, :func:`update_stage`,
:func:`stage_learning_rate`, :func:`decayed_learning_rate`, :func:`steps_per_epoch`,
:func:`epoch_batches`, :func:`bce_loss`, :func:`build_optimizer`.

Five learning-rate stages 0.01 → 1.6e-5 (×0.2); each starts from the previous stage's
best-validation-loss weights with a fresh SGD optimizer (momentum 0.9, Nesterov, Keras time decay
1e-6 per step); a stage ends at the 3rd consecutive epoch without a lower validation loss. An
epoch is ``ceil(train segments / 23)`` steps of 23 random segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resemul_core.config import TrainConfig

__all__ = [
    "StageState",
    "StageUpdate",
    "bce_loss",
    "build_optimizer",
    "decayed_learning_rate",
    "epoch_batches",
    "stage_learning_rate",
    "steps_per_epoch",
    "update_stage",
]


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
    ``wait`` (specification §3), so with patience 2 the stage ends at the
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
    """``ceil(num_segments / batch_size)``, capped by ``max_steps_per_epoch``.

    On MTAT (10 segments per clip, batches of 23) this gives 6,628 steps under the ``paper``
    split policy (15,244 training clips: 152,440 segments) and 6,630 under ``resemul``
    (15,250 listed clips, of which the three zero-byte files fail to decode: 15,247 clips,
    152,470 segments). The official code's 6,631 (``ceil(152,500 / 23)``) comes from its
    hard-coded 15,250 training clips, which no store holds.
    """
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
        permutation per epoch is the equivalent (specification §3). Filling the last batch from
        the permutation's start (rather than a short batch) keeps every step at 23 segments
        and avoids a batch of one, which BatchNorm cannot normalise.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_items)
    return np.resize(order, num_steps * batch_size).reshape(num_steps, batch_size)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over tags and batch, computed in float32.

    Args:
        logits: ``(B, T)`` model outputs before the sigmoid.
        targets: ``(B, T)`` 0/1 labels.

    Note:
        Keras clips the sigmoid output to [1e-7, 1 - 1e-7] before the log (specification §3),
        which caps
        the per-tag loss at about 16.1 and zeroes its gradient for saturated outputs. This is
        PyTorch's numerically stable ``binary_cross_entropy_with_logits`` without that clip;
        the two agree unless a logit exceeds about ±16.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def build_optimizer(model: nn.Module, config: TrainConfig, *, stage: int) -> torch.optim.SGD:
    """A fresh SGD optimizer for a stage (momentum buffers empty, decay step count 0).

    Note:
        PyTorch's Nesterov update equals Keras' for a constant learning rate; with the 1e-6
        time decay the learning rate changes by < 1 % per 10,000 steps, so the forms agree
        to that order.

    Note:
        ``config.weight_decay`` is the official code's L2 kernel regulariser (specification
        §2.3): Keras adds ``wd * sum(w**2)`` of every *convolution kernel* to the loss, whose
        gradient is ``2 * wd * w``; biases, BatchNorm, SE and dense layers are not
        regularised. PyTorch's ``weight_decay=c`` adds ``c * w`` to the gradient, so the
        convolution kernels get ``c = 2 * wd`` in a group of their own and every other
        parameter ``c = 0``. With the default 0 there is one group, as there always was.
    """
    options = {
        "lr": stage_learning_rate(config, stage),
        "momentum": config.momentum,
        "nesterov": config.nesterov,
    }
    if config.weight_decay == 0:
        return torch.optim.SGD(model.parameters(), **options)
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv1d)]
    chosen = {id(p) for p in kernels}
    others = [p for p in model.parameters() if id(p) not in chosen]
    return torch.optim.SGD(
        [
            {"params": kernels, "weight_decay": 2 * config.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ],
        **options,
    )
