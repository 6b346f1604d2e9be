"""The run directory: its layout, and reading what a run left in it.

Public: :data:`BEST_CHECKPOINT`, :data:`LAST_CHECKPOINT`, :data:`RUN_LOG`, :data:`RUN_CONFIG`,
:func:`resolve_checkpoint`, :func:`load_model`, :func:`write_log_row`, :func:`write_metrics`,
:func:`read_metrics`, :func:`read_log`, :func:`run_summary`,
:func:`find_runs`, :func:`training_times`, :func:`time_ratio`.

A run directory holds::

    config.json   what the run was started with (for people; the checkpoints are authoritative)
    last.pt       the full training state, written every ``checkpoint_every`` steps and after
                  every epoch; training resumes from it
    best.pt       the model with the lowest validation loss of the current stage
    log.csv       one row per epoch: losses, learning rate, stage, time, throughput
    metrics.json  clip-level scores of ``best.pt`` on the test split (``metrics_<split>.json``
                  for the others), written by the evaluation
    predictions.npz  the clip-level probabilities and labels behind ``metrics.json``
                  (``predictions_<split>.npz``), from which the book's intervals are resampled

Several seeds of the same runs (``make book SEEDS="0 1 2"``) sit side by side as
``RUNS/seed0/<variant>``, ``RUNS/seed1/<variant>``, ... (:func:`find_runs_by_seed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from resemul_core.config import VARIANTS, ModelConfig, check_variants
from resemul_core.files import atomic_write, write_json
from resemul_core.model.checkpoint import load_checkpoint, read_checkpoint
from resemul_core.model.sample_cnn import SampleCNN

__all__ = [
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "RUN_CONFIG",
    "RUN_LOG",
    "metrics_filename",
    "read_metrics",
    "load_model",
    "resolve_checkpoint",
    "write_log_row",
    "write_metrics",
    "read_log",
    "run_summary",
    "find_runs",
    "find_runs_by_seed",
    "predictions_filename",
    "read_predictions",
    "write_predictions",
    "training_times",
    "time_ratio",
]

logger = logging.getLogger(__name__)

#: In a run directory: the model to use (best validation loss of the latest stage) ...
BEST_CHECKPOINT = "best.pt"
#: ... and the full training state to resume from (written every checkpoint interval).
LAST_CHECKPOINT = "last.pt"

#: Per-epoch metrics of a run, ``RUN_DIR/log.csv``.
RUN_LOG = "log.csv"
#: What the run was started with, for people.
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


def write_log_row(path: Path, row: Mapping[str, Any]) -> None:
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


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file given either itself or a run directory (then ``RUN_DIR/best.pt``)."""
    path = Path(path)
    if path.is_dir():
        best = path / BEST_CHECKPOINT
        if not best.is_file():
            raise FileNotFoundError(f"run directory {path} has no {BEST_CHECKPOINT} checkpoint yet")
        return best
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or run directory {path} does not exist")
    return path


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
        "variant": ModelConfig.from_dict(payload["model_config"]).variant,
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
    if not variants:
        return {v: runs_dir / v for v in VARIANTS if (runs_dir / v / RUN_LOG).is_file()}
    variants = check_variants(variants)
    missing = [v for v in variants if not (runs_dir / v / RUN_LOG).is_file()]
    if missing:
        raise FileNotFoundError(f"no run for {', '.join(missing)} under {runs_dir}")
    return {v: runs_dir / v for v in VARIANTS if v in set(variants)}


def find_runs_by_seed(
    runs_dir: str | os.PathLike, variants: Iterable[str] | str | None = None
) -> dict[str, dict[str, Path]]:
    """The runs under ``runs_dir`` grouped by training seed.

    Returns:
        One ``{variant: run_dir}`` dict per seed folder, keyed ``seed0``, ``seed1``, ... in
        numeric order, when ``runs_dir`` holds
        ``seed<N>`` folders, each as :func:`find_runs` reads it; otherwise one group named
        ``""``: ``{"": find_runs(runs_dir, variants)}``.

    Raises:
        FileNotFoundError: a requested variant has no run in some seed's folder, or no seed
            folder holds any run.
    """
    runs_dir = Path(runs_dir)
    seeds = sorted(
        (p for p in runs_dir.glob("seed*") if p.is_dir() and re.fullmatch(r"seed\d+", p.name)),
        key=lambda p: int(p.name[4:]),
    )
    if not seeds:
        return {"": find_runs(runs_dir, variants)}
    groups = {p.name: find_runs(p, variants) for p in seeds}
    if not variants:  # every seed must hold the same variants, or the comparison is unpaired
        common = set.intersection(*(set(g) for g in groups.values()))
        uneven = sorted({v for g in groups.values() for v in g} - common)
        if uneven:
            logger.warning("left out, not trained for every seed: %s", ", ".join(uneven))
        groups = {name: {v: p for v, p in g.items() if v in common} for name, g in groups.items()}
    if not any(groups.values()):
        raise FileNotFoundError(f"no finished run in the seed folders of {runs_dir}")
    return groups


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
    blocks = times["variant"].map(lambda name: VARIANTS[name].block)
    top = times.loc[blocks == numerator, "ms_per_step"]
    bottom = times.loc[blocks == denominator, "ms_per_step"]
    if top.empty or bottom.empty:
        raise ValueError(f"need runs of both {numerator!r} and {denominator!r} blocks")
    return float(top.mean() / bottom.mean())


def metrics_filename(split: str) -> str:
    """``metrics.json`` for the test split, ``metrics_<split>.json`` for the others."""
    return "metrics.json" if split == "test" else f"metrics_{split}.json"


def predictions_filename(split: str) -> str:
    """``predictions.npz`` for the test split, ``predictions_<split>.npz`` for the others."""
    return "predictions.npz" if split == "test" else f"predictions_{split}.npz"


def write_predictions(
    out_dir: str | os.PathLike,
    split: str,
    *,
    scores: np.ndarray,
    labels: np.ndarray,
    clip_index: np.ndarray,
    tags: Iterable[str],
) -> Path:
    """Atomically write the clip-level predictions an evaluation scored.

    Args:
        scores: ``(K, T)`` probabilities; labels: ``(K, T)`` 0/1; clip_index: ``(K,)`` store
            indices of the clips; tags: the ``T`` names.
    """
    scores, labels = np.asarray(scores, dtype=np.float32), np.asarray(labels, dtype=np.uint8)
    clip_index, tags = np.asarray(clip_index, dtype=np.int64), np.asarray(list(tags), dtype=str)
    if scores.shape != labels.shape or scores.shape != (len(clip_index), len(tags)):
        raise ValueError(
            f"predictions of shape {scores.shape}, labels {labels.shape}, {len(clip_index)} "
            f"clips and {len(tags)} tags do not fit together"
        )
    path = Path(out_dir) / predictions_filename(split)
    with atomic_write(path) as handle:
        np.savez(handle, scores=scores, labels=labels, clip_index=clip_index, tags=tags)
    return path


def read_predictions(source: str | os.PathLike, split: str = "test") -> dict[str, np.ndarray]:
    """What :func:`write_predictions` wrote, from the file or its run directory.

    Returns:
        ``{"scores", "labels", "clip_index", "tags"}`` arrays.

    Raises:
        FileNotFoundError: no predictions file (evaluate the run first).
        ValueError: the file is damaged.
    """
    path = Path(source)
    if path.is_dir():
        path = path / predictions_filename(split)
    if not path.is_file():
        raise FileNotFoundError(f"no predictions file {path}; run 'resemul evaluate' first")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in ("scores", "labels", "clip_index", "tags")}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a readable predictions file: {err}") from err


def load_model(
    source: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[SampleCNN, dict]:
    """The model of a checkpoint file or of a run directory (its ``best.pt``), in eval mode,
    and the checkpoint's payload (:func:`~resemul_core.model.checkpoint.load_checkpoint`)."""
    return load_checkpoint(resolve_checkpoint(source), map_location=map_location)


def write_metrics(result: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Atomically write an evaluation result (its ``split`` key names the file) as
    ``OUT/metrics.json`` or ``OUT/metrics_<split>.json``."""
    path = Path(out_dir) / metrics_filename(str(result["split"]))
    write_json(path, dict(result))
    return path


def read_metrics(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    """An evaluation result: given as a dict, a metrics file, or a run directory (its test
    ``metrics.json``)."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / metrics_filename("test")
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}; run 'resemul evaluate' first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
