"""The pipeline: prepare, fit, evaluate, analyse; the one front door of the CLI and the book."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from resemul_core.config import get_profile, get_variant
from resemul_core.data.store import SegmentStore
from resemul_core.training.loop import train
from resemul_core.training.run_dir import LAST_CHECKPOINT
from resemul_core.training.state import TrainResult

logger = logging.getLogger(__name__)


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
    get_variant(variant)
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
