"""Run directories: choosing a profile, training idempotently, and reading what a run left.

Public: :func:`get_profile`, :func:`ensure_trained`, :func:`read_log`, :func:`run_summary`,
:func:`find_runs`, :func:`training_times`.

These are what the book's notebooks and ``make book`` call: rerunning them continues an
interrupted run and skips a finished one, so a rebuilt book never retrains for nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .checkpoint import LAST_CHECKPOINT, read_checkpoint
from .model import VARIANTS
from .store import SegmentStore
from .train import PROFILES, RUN_LOG, Profile, TrainResult, train

__all__ = [
    "get_profile",
    "ensure_trained",
    "read_log",
    "run_summary",
    "find_runs",
    "training_times",
    "time_ratio",
]

logger = logging.getLogger(__name__)


def get_profile(name: str) -> Profile:
    """The training profile called ``name``; a ``ValueError`` lists the valid names."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def ensure_trained(
    store: SegmentStore | str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    variant: str,
    profile: str = "demo",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train ``variant`` with a profile into ``run_dir``, or continue/skip an existing run.

    A run directory with a resume checkpoint is resumed (a finished run returns at once);
    otherwise a fresh run starts. The profile, seed and overrides must match a resumed run.

    Args:
        store: the segment store (or its directory).
        run_dir: the run directory.
        variant: a key of :data:`~resemul_core.model.VARIANTS`.
        profile: a key of :data:`~resemul_core.train.PROFILES`.
        seed: seeds weights, data order and dropout.
        device: "auto", "cpu", "cuda", ...
        **overrides: further :class:`~resemul_core.train.TrainConfig` fields.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    chosen = get_profile(profile)
    config = dataclasses.replace(chosen.config, seed=seed, device=device, **overrides)
    resume = (Path(run_dir) / LAST_CHECKPOINT).is_file()
    if resume:
        logger.info("%s holds a run of %s; resuming it", run_dir, variant)
    return train(
        store,
        run_dir,
        variant=variant,
        config=config,
        model_options=chosen.model,
        resume=resume,
        progress=progress,
    )


def read_log(run_dir: str | os.PathLike) -> pd.DataFrame:
    """A run's per-epoch log (``RUN_DIR/log.csv``) as a DataFrame, one row per epoch."""
    path = Path(run_dir) / RUN_LOG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: has the run finished an epoch yet?")
    return pd.read_csv(path)


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run cost and reached: variant, epochs, steps, seconds, segments/s, best loss.

    ``seconds`` counts training and validation time of every epoch (not start-up).
    """
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    payload = read_checkpoint(run_dir / LAST_CHECKPOINT)
    seconds = float(log["train_seconds"].sum() + log["val_seconds"].sum())
    batch = payload["train_config"]["batch_size"]
    return {
        "variant": f"{payload['model_config']['block']}"
        + ("-multi" if payload["model_config"]["multi"] else ""),
        "epochs": len(log),
        "stages": int(log["stage"].max()) + 1,
        "steps": int(log["steps"].sum()),
        "seconds": round(seconds, 1),
        "train_segments_per_s": round(
            float(log["steps"].sum() * batch / log["train_seconds"].sum()), 1
        ),
        "best_val_loss": float(log["val_loss"].min()),
        "width": payload["model_config"]["width"],
    }


def find_runs(
    runs_dir: str | os.PathLike, variants: Iterable[str] | str | None = None
) -> dict[str, Path]:
    """The run directories under ``runs_dir`` named after variants, in registry order.

    Args:
        runs_dir: a folder holding one run directory per variant (``runs_dir/se-multi``, ...).
        variants: which ones (names, or one space/comma-separated string); ``None`` or ``""``:
            every variant whose run directory has a log.

    Raises:
        ValueError: an unknown variant name.
        FileNotFoundError: a requested variant has no run there.
    """
    runs_dir = Path(runs_dir)
    if isinstance(variants, str):
        variants = [v for v in variants.replace(",", " ").split() if v]
    if not variants:
        return {v: runs_dir / v for v in VARIANTS if (runs_dir / v / RUN_LOG).is_file()}
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    missing = [v for v in variants if not (runs_dir / v / RUN_LOG).is_file()]
    if missing:
        raise FileNotFoundError(f"no run for {', '.join(missing)} under {runs_dir}")
    return {v: runs_dir / v for v in VARIANTS if v in set(variants)}


def training_times(runs: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """One row per run: variant, epochs, steps, seconds, seconds per step, segments/s."""
    rows = []
    for variant, run_dir in runs.items():
        summary = run_summary(run_dir)
        rows.append(
            {
                "variant": variant,
                "epochs": summary["epochs"],
                "steps": summary["steps"],
                "seconds": summary["seconds"],
                "ms_per_step": round(1000 * summary["seconds"] / max(1, summary["steps"]), 1),
                "segments_per_s": summary["train_segments_per_s"],
            }
        )
    return pd.DataFrame(rows)


def time_ratio(times: pd.DataFrame, *, numerator: str = "rese2", denominator: str = "se") -> float:
    """How much longer one block trains than another per step, over the heads present.

    The mean ``ms_per_step`` of the ``numerator`` block's variants (with and without
    ``-multi``) over that of the ``denominator`` block's. The paper reports ReSE-2 / SE = 1.7
    (GPU, full width; here the ratio is of whatever machine and width the runs used).
    """
    blocks = times["variant"].str.removesuffix("-multi")
    top = times.loc[blocks == numerator, "ms_per_step"]
    bottom = times.loc[blocks == denominator, "ms_per_step"]
    if top.empty or bottom.empty:
        raise ValueError(f"need runs of both {numerator!r} and {denominator!r} blocks")
    return float(top.mean() / bottom.mean())
