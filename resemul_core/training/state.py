"""The state of a run in progress: progress counters, checkpoints, resuming.

Public: :class:`TrainResult`, :class:`TrainingDiverged`, :func:`saved_run_config`,
:func:`check_fits_store`.

Resuming is exact: the data order of an epoch is a function of ``(seed, epoch)``, the step
within the epoch is saved, and so are the optimizer and all RNG states; a resumed CPU run ends
with bit-identical weights to an uninterrupted one. The RNG states themselves are
:mod:`resemul_core.training.rng`'s.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from resemul_core.config import ModelConfig, RunConfig, RuntimeConfig, TrainConfig
from resemul_core.data.store import SegmentStore
from resemul_core.files import write_json
from resemul_core.model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.training.distributed import Ranks
from resemul_core.training.init_from import start_from
from resemul_core.training.rng import rank_seed, rng_state, seed_everything
from resemul_core.training.run_dir import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RUN_CONFIG,
    RUN_LOG,
    write_log_row,
)
from resemul_core.training.schedule import (
    StageState,
    build_optimizer,
    stage_learning_rate,
    update_stage,
)

__all__ = [
    "TrainResult",
    "TrainingDiverged",
    "check_fits_store",
    "saved_run_config",
]

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


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
        config: the run's configuration (for a resumed run: the saved one with this call's
            runtime settings).
        device: the device this call trained on, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    run_dir: Path
    best_checkpoint: Path
    best_val_loss: float
    epochs: int
    global_step: int
    finished: bool
    config: RunConfig
    device: str


def _audio_info(store: SegmentStore) -> dict[str, Any]:
    """What the tagger needs to cut new audio exactly as the store was cut."""
    duration = store.manifest["params"].get("clip_duration")
    return {
        "sample_rate": store.sample_rate,
        "segment_length": store.segment_length,
        "segments_per_clip": store.segments_per_clip,
        "duration": float(duration) if isinstance(duration, (int, float)) else None,
    }


def saved_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The :class:`~resemul_core.config.RunConfig` stored in ``RUN_DIR/last.pt``.

    Raises:
        FileNotFoundError: there is no ``last.pt``; the message says whether ``run_dir`` holds
            a run that stopped before its first checkpoint, or no run at all.
        CheckpointError: ``last.pt`` is unreadable or holds no run config.
    """
    path = Path(run_dir) / LAST_CHECKPOINT
    if not path.is_file():
        raise _no_checkpoint_error(Path(run_dir))
    return _payload_config(read_checkpoint(path), path)


# The files a run writes into its directory (metrics and predictions come from evaluation).
_RUN_FILES = (BEST_CHECKPOINT, LAST_CHECKPOINT, RUN_LOG, RUN_CONFIG)


def _run_files(run_dir: Path) -> list[str]:
    """The names of the run files present in ``run_dir``."""
    return [name for name in _RUN_FILES if (run_dir / name).exists()]


def _before_first_checkpoint(run_dir: Path, present: list[str]) -> str:
    """Says that ``run_dir`` holds a run killed (or failed) before its first ``last.pt``."""
    return (
        f"run directory {run_dir} holds a run that stopped before its first checkpoint "
        f"({', '.join(present)}, no {LAST_CHECKPOINT}): there is nothing to resume; start it "
        "again with overwrite=True (--overwrite)"
    )


def _no_checkpoint_error(run_dir: Path) -> FileNotFoundError:
    """The error of a resume from ``run_dir`` that has no ``last.pt``, saying what is there."""
    present = _run_files(run_dir)
    if present:
        return FileNotFoundError(f"cannot resume: {_before_first_checkpoint(run_dir, present)}")
    return FileNotFoundError(
        f"cannot resume: {run_dir / LAST_CHECKPOINT} does not exist (no run in {run_dir}; "
        "start one without resume=True (--resume))"
    )


def _payload_config(payload: Mapping[str, Any], path: Path) -> RunConfig:
    """The run config of a checkpoint's payload. Checkpoints of earlier versions kept the
    runtime settings inside ``train_config``; both config classes read that form."""
    try:
        train = payload["train_config"]
        return RunConfig(
            model=ModelConfig.from_dict(payload["model_config"]),
            train=TrainConfig.from_dict(train),
            runtime=RuntimeConfig.from_dict(payload.get("runtime_config", train)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds no usable run config ({err})") from err


def _differences(saved: RunConfig, requested: RunConfig) -> list[str]:
    """The model and recipe settings in which ``requested`` differs from ``saved``."""
    old, new = saved.flat(), requested.flat()
    return [
        f"{key} ({old[key]!r} -> {new[key]!r})"
        for key in old
        if not key.startswith("runtime.") and old[key] != new[key]
    ]


def _read_resume_state(
    run_dir: Path, store: SegmentStore, config: RunConfig | None
) -> tuple[dict[str, Any], RunConfig]:
    """Read and check ``last.pt`` against the store and the requested config; the config to
    continue with is the saved one with ``config``'s runtime (if given)."""
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise _no_checkpoint_error(run_dir)
    payload = read_checkpoint(path)
    try:
        if payload.get("kind") != "train-state":
            raise ValueError("it is not a training-state checkpoint")
        _Progress.from_dict(payload["progress"])
        payload["optimizer_state"], payload["rng"]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from err
    saved = _payload_config(payload, path)
    if payload["store_fingerprint"] != store.fingerprint:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained on a store with fingerprint "
            f"{payload['store_fingerprint'][:12]}, but {store.path} has {store.fingerprint[:12]}"
        )
    if config is None:
        return payload, saved
    if config.variant != saved.variant:
        raise CheckpointError(
            f"cannot resume from {path}: it trains {saved.variant!r}, not {config.variant!r}"
        )
    changed = _differences(saved, config)
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: the run was configured differently: {', '.join(changed)}"
        )
    return payload, replace(saved, runtime=config.runtime)


def _claim_run_dir(run_dir: Path, *, overwrite: bool, ranks: Ranks) -> None:
    """Refuse to start a fresh run over an existing one unless ``overwrite``.

    Every rank looks (so that all raise together); rank 0 alone clears the directory.
    """
    present = _run_files(run_dir)
    if present and not overwrite:
        if LAST_CHECKPOINT not in present:
            raise FileExistsError(_before_first_checkpoint(run_dir, present))
        raise FileExistsError(
            f"run directory {run_dir} already holds a run ({', '.join(present)}); continue it "
            "with resume=True (--resume), or replace it with overwrite=True (--overwrite)"
        )
    ranks.barrier()  # nobody looks any more when rank 0 deletes
    if ranks.is_main:
        for name in present:
            (run_dir / name).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    ranks.barrier()


@dataclass
class _Run:
    """A run in progress: its directory, data, model, optimizer and progress.

    Holds the bookkeeping (checkpoints, log, stage changes) so that :func:`train` shows only
    the loop.
    """

    dir: Path
    store: SegmentStore
    config: RunConfig
    model: SampleCNN
    optimizer: torch.optim.SGD
    state: _Progress
    device: torch.device
    ranks: Ranks = field(default_factory=Ranks)
    saved_rng: dict[str, Any] | None = None  # to restore right before the first step
    init: dict[str, Any] | None = None  # the InitReport of a run started from init_from

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
            "train_config": self.config.train.to_dict(),
            "runtime_config": self.config.runtime.to_dict(),
            "store_fingerprint": self.store.fingerprint,
            "store_path": str(self.store.path),
            "audio": _audio_info(self.store),
            **({"init": self.init} if self.init is not None else {}),
        }

    def save_last(self) -> None:
        """Write ``last.pt`` (rank 0) with every rank's RNG states; the others wait."""
        rng = self.ranks.gather_objects(rng_state(self.device))
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

    def _last_saved(self) -> str:
        """Where a diverged run stands: its last checkpoint, or that it has none yet."""
        if self.last_path.is_file():
            return f"the last checkpoint {self.last_path} predates it"
        return f"no checkpoint was written yet ({self.last_path} does not exist)"

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
                    f"{self.state.stage.stage}, epoch {self.state.epoch}); {self._last_saved()}"
                )
            self.state.loss_sum += value
        pending.clear()

    def end_epoch(self, val_loss: float, *, lr: float, num_steps: int, val_seconds: float) -> None:
        """Early stopping, best model, log row, stage change; then checkpoint the new epoch."""
        state = self.state
        if not math.isfinite(val_loss):
            raise TrainingDiverged(
                f"validation loss is {val_loss} after epoch {state.epoch} (global step "
                f"{state.global_step}); {self._last_saved()}"
            )
        update = update_stage(
            state.stage,
            val_loss,
            epoch=state.epoch,
            patience=self.config.train.patience,
            max_epochs=self.config.train.max_epochs_per_stage,
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
        segments = num_steps * self.config.train.batch_size
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
        if update.stage_over and state.stage.stage + 1 >= self.config.train.num_stages:
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
            write_log_row(self.dir / RUN_LOG, row)

    def next_stage(self) -> None:
        """Restart from this stage's best weights with a fresh optimizer (specification §3)."""
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
        self.optimizer = build_optimizer(self.model, self.config.train, stage=stage + 1)
        logger.info(
            "stage %d: lr %.2e, from the weights of epoch %d",
            stage + 1,
            stage_learning_rate(self.config.train, stage + 1),
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
            config=self.config,
            device=str(self.device),
        )


def _start_run(
    store: SegmentStore,
    run_dir: Path,
    config: RunConfig | None,
    *,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    ranks: Ranks,
) -> _Run:
    """Set up a fresh run, or rebuild a resumed one from ``last.pt`` (writing nothing), on
    ``device`` (resolved by the caller from the run's runtime settings)."""
    if resume:
        saved, config = _read_resume_state(run_dir, store, config)
        last = run_dir / LAST_CHECKPOINT
        model = SampleCNN(config.model)
        device = _rank_device(device, ranks)
        try:
            model.load_state_dict(saved["model_state"])
            model.to(device)
            state = _Progress.from_dict(saved["progress"])
            optimizer = build_optimizer(model, config.train, stage=state.stage.stage)
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
            torch.manual_seed(rank_seed(config.train.seed, ranks.rank, state.global_step))
            rng = {**rng_state(device), "numpy": rng["numpy"], "python": rng["python"]}
        logger.info(
            "resuming %s at stage %d, epoch %d, step %d",
            run_dir,
            state.stage.stage,
            state.epoch,
            state.step,
        )
        init = saved.get("init")  # not init_from's file: it is not needed, and may be gone
        return _Run(run_dir, store, config, model, optimizer, state, device, ranks, rng, init)
    if config is None:
        raise ValueError("a fresh run needs a config (resemul_core.profiles.resolve_config)")
    check_fits_store(config.model, store)
    device = _rank_device(device, ranks)
    _claim_run_dir(run_dir, overwrite=overwrite, ranks=ranks)
    seed_everything(config.train.seed)  # the same initial weights on every rank
    model = SampleCNN(config.model)
    init = start_from(model, config.train, store.tags)  # fine-tuning: init_from's weights
    model.to(device)
    optimizer = build_optimizer(model, config.train, stage=0)
    if ranks.rank > 0:  # but each rank its own dropout masks
        torch.manual_seed(rank_seed(config.train.seed, ranks.rank, 0))
    run = _Run(run_dir, store, config, model, optimizer, _Progress(), device, ranks, init=init)
    if ranks.is_main:
        write_json(run_dir / RUN_CONFIG, {**run.info(), "model_config": config.model.to_dict()})
    return run


def check_fits_store(model: ModelConfig, store: SegmentStore) -> None:
    """Raise a ``ValueError`` unless ``model`` takes the store's segments and predicts its tags."""
    if model.segment_length != store.segment_length:
        raise ValueError(
            f"store {store.path} holds segments of {store.segment_length} samples but a model "
            f"with num_blocks={model.num_blocks} takes {model.segment_length}"
        )
    if model.num_tags != len(store.tags):
        raise ValueError(
            f"store {store.path} has {len(store.tags)} tags but the model predicts {model.num_tags}"
        )


def _rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: ``device``, but ``cuda:LOCAL_RANK`` for CUDA under DDP; a CUDA
    device always with its index (its RNG state is saved and restored by index)."""
    if device.type != "cuda":
        return device
    if ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
