"""Checkpoints: one self-describing file per model, loadable with ``weights_only=True``.

Public: :func:`save_checkpoint`, :func:`save_payload`, :func:`read_checkpoint`,
:func:`load_checkpoint`, :func:`upgrade_state_dict`, :func:`content_checksum`,
:class:`CheckpointError`.

A checkpoint is a dict of plain Python values and tensors::

    {"format": "resemul-checkpoint", "version": 3,
     "model_config": {...ModelConfig fields...}, "model_state": {...state_dict...},
     "tags": ["guitar", ...] or None, ...anything the writer adds (training state)...,
     "checksum": "<sha256 of everything else>"}

Integrity: torch's zip container has CRCs that its reader never checks, so one flipped bit
in a weight loads silently. Version 3 therefore carries a sha256 of its whole content
(:func:`content_checksum`: every tensor's dtype, shape and bytes, every other value's type
and ``repr``), and every read recomputes it: a damaged file is a :class:`CheckpointError`
naming it, never a model with one wrong weight.

Versions: 3 adds the checksum; 2 names the model's layers (``stem.conv``, ``blocks.3.conv1``,
``head.fc2``, ...); 1 numbered them as ``nn.Sequential`` entries (``stem.0``,
``blocks.3.main.0``, ``head.0``). Files of versions 1 and 2 have no checksum to verify.
Version 1 files are read by renaming their ``model_state`` keys (:func:`upgrade_state_dict`);
the parameter order is the same in both, so an optimizer state saved with version 1 (keyed by
parameter index) still fits.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resemul_core.config import ModelConfig
from resemul_core.files import atomic_write
from resemul_core.model.sample_cnn import SampleCNN

__all__ = [
    "CheckpointError",
    "content_checksum",
    "save_checkpoint",
    "save_payload",
    "read_checkpoint",
    "load_checkpoint",
    "upgrade_state_dict",
]


CHECKPOINT_FORMAT = "resemul-checkpoint"
CHECKPOINT_VERSION = 3
#: Versions :func:`read_checkpoint` reads; older ones are upgraded to the current one.
READABLE_VERSIONS = (1, 2, 3)
#: The first version that carries a checksum.
CHECKSUM_VERSION = 3

# Version 1 state-dict names (nn.Sequential indices) -> version 2 names.
_V1_KEY = re.compile(
    r"(?P<module>stem|head|blocks\.\d+\.main|blocks\.\d+\.shortcut)\.(?P<index>\d+)\."
)
_V1_NAMES = {
    "stem": {0: "stem.conv", 1: "stem.bn"},
    "head": {0: "head.fc1", 1: "head.bn", 4: "head.fc2"},
    "shortcut": {0: "shortcut.conv", 1: "shortcut.bn"},
    "main 2": {0: "conv1", 1: "bn1", 4: "conv2", 5: "bn2"},
    "main 1": {0: "conv1", 1: "bn1"},
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"{{{len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float, bool, None (what a weights-only load can hold besides tensors)
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def content_checksum(payload: Mapping[str, Any]) -> str:
    """sha256 over a checkpoint payload's content, its ``checksum`` entry left out.

    Independent of where tensors live (CPU or GPU) and of the order of dict entries.
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != "checksum"})
    return digest.hexdigest()


def upgrade_state_dict(state: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Rename a version-1 ``model_state`` (``nn.Sequential`` indices) to the current names.

    ``stem.0/1`` -> ``stem.conv/bn``; ``blocks.i.main.0/1/4/5`` -> ``blocks.i.conv1/bn1/
    conv2/bn2`` (two-conv blocks) or ``blocks.i.main.0/1`` -> ``blocks.i.conv1/bn1``
    (one-conv blocks); ``blocks.i.shortcut.0/1`` -> ``blocks.i.shortcut.conv/bn``;
    ``head.0/1/4`` -> ``head.fc1/bn/fc2``. Other keys, current names included, are kept, as
    is the order of the entries.

    Args:
        state: a state dict of a :class:`SampleCNN` built from ``config``.
        config: the model's config (it tells one-conv from two-conv residual blocks).

    Returns:
        A new dict with the same values under the current keys.

    Raises:
        KeyError: a numbered key that no version-1 model has.
    """
    main = _V1_NAMES["main 2" if config.num_convs == 2 else "main 1"]
    upgraded: dict[str, Any] = {}
    for key, value in state.items():
        match = _V1_KEY.match(key)
        if match is None:
            upgraded[key] = value
            continue
        module, index = match["module"], int(match["index"])
        if module.endswith(".main"):
            name = f"{module.removesuffix('main')}{main[index]}"
        elif module.endswith(".shortcut"):
            name = f"{module.removesuffix('shortcut')}{_V1_NAMES['shortcut'][index]}"
        else:
            name = _V1_NAMES[module][index]
        upgraded[f"{name}.{key[match.end() :]}"] = value
    return upgraded


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
    return save_payload(path, payload)


def save_payload(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Atomically write a checkpoint payload as the current version, with a fresh checksum.

    :func:`save_checkpoint` builds the payload from a model; this writes one that was read
    (:func:`read_checkpoint`) and changed, e.g. to convert or repair a file.
    """
    payload = {**payload, "version": CHECKPOINT_VERSION}
    payload["checksum"] = content_checksum(payload)
    path = Path(path)
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    return path


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """One sentence for a file torch cannot load; never torch's advice to load it unsafely."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
        return CheckpointError(
            f"checkpoint {path} holds Python objects that a resemul checkpoint never contains "
            "(it was made by other software, or tampered with); it was refused unread, since "
            "loading it could run arbitrary code"
        )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"checkpoint {path} is corrupted or truncated and cannot be read ({reason[:160]})"
    )


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint's payload safely (``weights_only=True``) and check its format.

    A version-1 payload is upgraded in memory: its ``model_state`` keys are renamed
    (:func:`upgrade_state_dict`) and its ``version`` becomes the current one.

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
        raise _load_error(path, err) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a resemul checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, this library reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= CHECKSUM_VERSION:
        if "checksum" not in payload:
            raise CheckpointError(
                f"checkpoint {path} (format version {version}) lacks its checksum: damaged"
            )
        if payload["checksum"] != content_checksum(payload):
            raise CheckpointError(
                f"checkpoint {path} is damaged: its content does not match its checksum (a "
                "flipped bit on disk, or an edit); use another copy, or resume from an earlier "
                "checkpoint"
            )
    if version != CHECKPOINT_VERSION and "model_state" in payload:
        try:
            config = ModelConfig.from_dict(payload["model_config"])
            payload["model_state"] = upgrade_state_dict(payload["model_state"], config)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(
                f"checkpoint {path} (format version {version}) cannot be upgraded to version "
                f"{CHECKPOINT_VERSION}: {err!r}"
            ) from err
    payload["version"] = CHECKPOINT_VERSION
    payload.pop("checksum", None)  # verified; the payload may now be changed and re-saved
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
