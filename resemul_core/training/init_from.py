"""Fine-tuning: a run that starts from a trained model's weights instead of the random init.

Public: :class:`InitReport`, :func:`load_initial_weights`, :func:`start_from`,
:func:`check_init_from`, :func:`freeze`, :func:`train_mode`.

``TrainConfig.init_from`` names a checkpoint (or a run directory: its ``best.pt``). A fresh run
builds its model as usual (seeded random init, the store's number of tags) and then takes from
that checkpoint:

- the stem and every block, which must match exactly (same block type, width, alpha and number
  of blocks: the same state-dict keys and shapes); anything else is refused;
- the head's hidden layer (``head.fc1``, ``head.bn``) when its shapes match, i.e. when both
  models are ``-multi`` variants or neither is;
- the output layer ``head.fc2`` only when the checkpoint predicted the store's tags: in the same
  order it is loaded, in another order its rows are reordered; for other tags it keeps its
  fresh initialisation, made for the store's tags ("re-headed").

``TrainConfig.freeze_blocks = N`` then keeps the stem and the first N blocks as loaded: their
parameters get no gradient (so SGD moves neither them nor their momentum) and they run in eval
mode during training (BatchNorm normalises with, and keeps, the loaded running statistics;
dropout is off), so a frozen part computes exactly what it computed in the trained model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resemul_core.config import ModelConfig, RunConfig, TrainConfig
from resemul_core.data.integrity import file_sha256
from resemul_core.model.checkpoint import CheckpointError, read_checkpoint
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.training.run_dir import resolve_checkpoint

__all__ = [
    "InitReport",
    "check_init_from",
    "freeze",
    "load_initial_weights",
    "start_from",
    "train_mode",
]

logger = logging.getLogger(__name__)

_HIDDEN = ("head.fc1.", "head.bn.")  # the head's hidden layer: features -> features
_OUTPUT = ("head.fc2.weight", "head.fc2.bias")  # the output layer: one row per tag


@dataclass(frozen=True)
class InitReport:
    """What :func:`load_initial_weights` took from a checkpoint; stored in every checkpoint of
    the run and in its ``config.json`` (as :meth:`to_dict`: plain values only).

    Attributes:
        source: the checkpoint file read, absolute.
        sha256: the sha256 of that file's bytes, for provenance.
        variant: the checkpoint's variant, e.g. ``"se-multi"``.
        loaded: number of state-dict tensors taken from it (BN statistics included).
        reinitialised: the state-dict keys that kept the fresh initialisation.
        head: ``"loaded"`` (same tags, same order), ``"reordered"`` (same tags, another order:
            the rows of ``head.fc2`` follow the store's order) or ``"re-made"``.
        source_tags: the checkpoint's number of tags.
        tags: the new model's number of tags (the store's).
        frozen_blocks: ``TrainConfig.freeze_blocks``: the stem and this many blocks are frozen.
    """

    source: str
    sha256: str
    variant: str
    loaded: int
    reinitialised: tuple[str, ...]
    head: str
    source_tags: int
    tags: int
    frozen_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reinitialised": list(self.reinitialised)}

    def summary(self) -> str:
        """One line, e.g. ``init from runs/se/best.pt: 52 tensors loaded, head re-made for 12
        tags (the checkpoint had 50)``."""
        if self.head == "loaded":
            head = f"head kept for its {self.tags} tags"
        elif self.head == "reordered":
            head = f"head kept, its {self.tags} tags reordered to the store's order"
        elif any(key.startswith(_HIDDEN) for key in self.reinitialised):
            head = (
                f"head re-made for {self.tags} tags (the {self.variant} head reads other features)"
            )
        elif self.source_tags != self.tags:
            head = f"head re-made for {self.tags} tags (the checkpoint had {self.source_tags})"
        else:
            head = f"head re-made for {self.tags} tags (the checkpoint had other tags)"
        frozen = f", stem and blocks 1-{self.frozen_blocks} frozen" if self.frozen_blocks else ""
        return f"init from {self.source}: {self.loaded} tensors loaded, {head}{frozen}"


def _read_source(
    source: str | os.PathLike, model: ModelConfig
) -> tuple[Path, ModelConfig, dict[str, Any], list]:
    """The checkpoint file of ``source``, its model config, weights and tag names. An authors'
    Keras file (``.hdf5``/``.h5``) is read as ``model``'s variant and size, converted once and
    cached (:func:`~resemul_core.model.keras_import.cached_keras_checkpoint`)."""
    if Path(source).suffix.lower() in (".hdf5", ".h5"):
        from resemul_core.model.keras_import import cached_keras_checkpoint

        sizes = {"width": model.width, "alpha": model.alpha, "num_blocks": model.num_blocks}
        source = cached_keras_checkpoint(source, variant=model.variant, **sizes)
    path = resolve_checkpoint(source)  # a FileNotFoundError naming it
    payload = read_checkpoint(path)  # weights only, checksum verified
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        state = dict(payload["model_state"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds no usable model ({err})") from err
    return path, config, state, list(payload.get("tags") or [])


def _body_mismatch(theirs: Mapping[str, torch.Tensor], ours: Mapping[str, Any]) -> str | None:
    """The first stem or block tensor (in layer order) that differs in name or shape."""
    for key, value in ours.items():
        if key.startswith("head."):
            continue
        if key not in theirs:
            return f"{key} of shape {tuple(value.shape)} is not in it"
        if theirs[key].shape != value.shape:
            return f"{key} has shape {tuple(theirs[key].shape)} there, {tuple(value.shape)} here"
    for key, value in theirs.items():
        if not key.startswith("head.") and key not in ours:
            return f"it has {key} of shape {tuple(value.shape)}, which this model lacks"
    return None


def _how_to_fit(theirs: ModelConfig, ours: ModelConfig) -> str:
    """The settings that would give a model with the checkpoint's body."""
    changes = []
    if theirs.block != ours.block:
        changes.append(f"--variant {theirs.variant}")
    if theirs.width != ours.width:
        changes.append(f"--width {theirs.width:g}")
    if theirs.alpha != ours.alpha and theirs.has_se:
        changes.append(f"--set alpha={theirs.alpha:g}")
    if theirs.num_blocks != ours.num_blocks:
        changes.append(f"a store of {theirs.segment_length}-sample segments")
    return " and ".join(changes) or "the checkpoint's own model settings"


def _check_body(
    path: Path,
    theirs: ModelConfig,
    state: Mapping[str, torch.Tensor],
    ours: ModelConfig,
    shapes: Mapping[str, torch.Tensor],
) -> None:
    """Refuse a checkpoint (``theirs``, its ``state``) whose stem and blocks do not fit a
    model of config ``ours`` (its state dict, or only its shapes, ``shapes``)."""
    mismatch = _body_mismatch(state, shapes)
    if mismatch is not None:
        raise CheckpointError(
            f"cannot start from {path}: its stem and blocks ({theirs.variant}, width "
            f"{theirs.width:g}) do not fit this model's ({ours.variant}, width {ours.width:g}): "
            f"{mismatch}; train with {_how_to_fit(theirs, ours)} to start from it"
        )


def check_init_from(config: RunConfig, run_dir: str | os.PathLike) -> None:
    """Refuse a fresh run's ``init_from`` before the run directory is touched: a missing file,
    one inside ``run_dir`` (which a fresh run clears), or a body that does not fit."""
    if config.train.init_from is None:
        return
    path, theirs, state, _ = _read_source(config.train.init_from, config.model)
    if path.resolve().parent == Path(run_dir).resolve():
        raise ValueError(
            f"cannot start the run in {run_dir} from its own checkpoint {path}: a fresh run "
            "replaces it; copy it elsewhere first, or train into another --out"
        )
    with torch.device("meta"):  # shapes only: no weights allocated, no random numbers drawn
        ours = SampleCNN(config.model).state_dict()
    _check_body(path, theirs, state, config.model, ours)


@torch.no_grad()
def load_initial_weights(
    model: SampleCNN,
    source: str | os.PathLike,
    *,
    tags: Sequence[str],
    freeze_blocks: int = 0,
) -> InitReport:
    """Overwrite a freshly initialised ``model`` with a trained checkpoint's weights.

    Args:
        model: the new run's model, already initialised (its head sized for ``tags``).
        source: a checkpoint file, a run directory (its ``best.pt``) or one of the authors'
            Keras files (read as ``model``'s variant).
        tags: the new model's tag names, in output order (the store's).
        freeze_blocks: recorded in the report only (:func:`freeze` applies it).

    Returns:
        The :class:`InitReport`, also logged at INFO.

    Raises:
        FileNotFoundError: ``source`` does not exist (the message names it).
        CheckpointError: the file is damaged or not a checkpoint, or its stem and blocks do not
            fit ``model``; the message names the file, the first differing tensor with both
            shapes, and the settings that would fit.
    """
    tags = list(tags)
    path, theirs, state, old_tags = _read_source(source, model.config)
    ours = model.state_dict()
    _check_body(path, theirs, state, model.config, ours)
    new = {key: (value if key.startswith("head.") else state[key]) for key, value in ours.items()}
    hidden = [key for key in ours if key.startswith(_HIDDEN)]
    head = "re-made"
    if all(key in state and state[key].shape == ours[key].shape for key in hidden):
        new.update({key: state[key] for key in hidden})
        rows = state["head.fc2.weight"].shape[0] if "head.fc2.weight" in state else -1
        if old_tags == tags and rows == len(tags):
            head = "loaded"
        elif sorted(old_tags) == sorted(tags) and len(set(tags)) == len(tags) == rows:
            head = "reordered"
        if head != "re-made":  # row i of the new output layer is the old row of tag i
            order = torch.tensor([old_tags.index(tag) for tag in tags])
            new.update({key: state[key][order] for key in _OUTPUT})
    model.load_state_dict(new)
    report = InitReport(
        source=str(path.absolute()),
        sha256=file_sha256(path),
        variant=theirs.variant,
        loaded=sum(new[key] is not ours[key] for key in ours),
        reinitialised=tuple(key for key in ours if new[key] is ours[key]),
        head=head,
        source_tags=len(old_tags) if old_tags else theirs.num_tags,
        tags=len(tags),
        frozen_blocks=freeze_blocks,
    )
    logger.info("%s", report.summary())
    return report


def start_from(model: SampleCNN, config: TrainConfig, tags: Sequence[str]) -> dict[str, Any] | None:
    """A fresh run's model as ``config.init_from`` has it (:func:`load_initial_weights`), and
    the report as a plain dict for its checkpoints; ``None`` (model untouched) without one."""
    if config.init_from is None:
        return None
    report = load_initial_weights(
        model, config.init_from, tags=tags, freeze_blocks=config.freeze_blocks
    )
    return report.to_dict()


def _frozen_modules(model: SampleCNN, freeze_blocks: int) -> list[nn.Module]:
    """The stem and the first ``freeze_blocks`` blocks (none for 0)."""
    return [model.stem, *model.blocks[:freeze_blocks]] if freeze_blocks > 0 else []


def freeze(model: SampleCNN, freeze_blocks: int) -> None:
    """No gradient for the stem's and the first ``freeze_blocks`` blocks' parameters.

    Call before the optimizer's first step and before wrapping for DDP (which registers hooks
    only for parameters that need a gradient). SGD skips parameters without a gradient, so an
    optimizer that holds them leaves them, and their momentum, untouched.
    """
    for module in _frozen_modules(model, freeze_blocks):
        module.requires_grad_(False)


def train_mode(model: SampleCNN, freeze_blocks: int) -> None:
    """``model.train()``, but the frozen stem and blocks in eval mode: their BatchNorm layers
    normalise with the loaded running statistics and leave them unchanged, and their dropout
    is off. The training loop calls this where it would call ``model.train()``."""
    model.train()
    for module in _frozen_modules(model, freeze_blocks):
        module.eval()
