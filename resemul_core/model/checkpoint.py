"""Checkpoints: one self-describing file per model, loadable with ``weights_only=True``.

Public: :func:`save_checkpoint`, :func:`read_checkpoint`, :func:`load_checkpoint`,
:class:`CheckpointError`.

A checkpoint is a dict of plain Python values and tensors::

    {"format": "resemul-checkpoint", "version": 1,
     "model_config": {...ModelConfig fields...}, "model_state": {...state_dict...},
     "tags": ["guitar", ...] or None, ...anything the writer adds (training state)...}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from resemul_core.config import ModelConfig
from resemul_core.files import atomic_write
from resemul_core.model.sample_cnn import SampleCNN

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]


CHECKPOINT_FORMAT = "resemul-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: SampleCNN,
    tags: Sequence[str] | None = None,
    **extra: Any,
) -> Path:
    """Atomically save ``model`` with its config, tag names and any ``extra`` entries.

    ``extra`` values must be tensors or plain Python containers of str/int/float/bool/None
    so that the file loads with ``torch.load(..., weights_only=True)``.
    """
    if tags is not None and len(tags) != model.config.num_tags:
        raise ValueError(f"{len(tags)} tag names for a model with {model.config.num_tags} outputs")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model.config.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tags": list(tags) if tags is not None else None,
        **extra,
    }
    path = Path(path)
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    return path


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint's payload safely (``weights_only=True``) and check its format.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupted, or not a resemul checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch's unpickler fails on junk with many exception types
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated and cannot be read ({err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a resemul checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')}, "
            f"this library reads version {CHECKPOINT_VERSION}"
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[SampleCNN, dict]:
    """Rebuild the model stored in a checkpoint.

    Returns:
        ``(model, payload)``: the model in eval mode with its weights, and the full payload
        (config, tags and any training state).
    """
    path = Path(path)
    payload = read_checkpoint(path, map_location=map_location)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = SampleCNN(config)
        model.load_state_dict(payload["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its model config: {err}") from err
    return model.to(map_location).eval(), payload
