"""What a run is configured by: the variants, the model, the recipe, the runtime.

Public: :class:`DictConfig`, :data:`BLOCK_TYPES`, :data:`INITS`, :data:`VARIANTS`,
:class:`Variant`, :func:`get_variant`, :func:`check_variants`, :class:`ModelConfig`,
:func:`model_config`, :class:`TrainConfig`, :class:`RuntimeConfig`, :class:`RunConfig`,
:data:`PRECISIONS`, :func:`check_precision`, :func:`check_device`, :func:`num_blocks_for`.

Three typed dataclasses configure a run, one per concern: :class:`ModelConfig` (the network),
:class:`TrainConfig` (the recipe) and :class:`RuntimeConfig` (device, workers, speed), held
together by :class:`RunConfig`. Every field name is unique across the three, so an override
such as ``width=0.125`` or ``seed=3`` names its owner by itself
(:func:`resemul_core.profiles.resolve_config`). This module imports nothing heavy: no torch.

Code cites the book's specification page as "specification §N.M".
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

__all__ = [
    "BLOCK_TYPES",
    "INITS",
    "KERAS_BN_EPS",
    "KERAS_BN_MOMENTUM",
    "PRECISIONS",
    "VARIANTS",
    "DictConfig",
    "ModelConfig",
    "RunConfig",
    "RuntimeConfig",
    "TrainConfig",
    "Variant",
    "check_device",
    "check_variants",
    "get_variant",
    "check_precision",
    "model_config",
    "num_blocks_for",
]

# Keras 2.0.5 BatchNormalization defaults (specification §7.2): momentum 0.99 means a PyTorch
# momentum of 0.01, and epsilon is 1e-3 rather than PyTorch's 1e-5.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01

#: The precision settings, faithful first.
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; otherwise a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


#: Device names a run accepts: "auto", or a device type with an optional index.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_DEVICE = re.compile(r"(?P<type>[a-z]+)(?::(?P<index>\d+))?")


def check_device(device: str) -> str:
    """``device`` if it names a device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (also
    ``"mps"``, ``"xpu"``, ``"xpu:N"``); otherwise a ``ValueError`` listing the valid forms.
    Whether the device is present is :func:`resemul_core.runtime.select_device`'s question."""
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if device != "auto" and (
        match is None
        or match["type"] not in DEVICE_TYPES
        or (match["index"] is not None and match["type"] in ("cpu", "mps"))
    ):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N, mps, xpu")
    return device


def _check_numbers(config: Any) -> None:
    """Refuse a ``float`` field of the dataclass ``config`` that is not a finite real number
    (NaN, infinity, a string), and an ``int`` field that is not an integer, naming the field."""
    owner = type(config).__name__
    for f in fields(config):
        value = getattr(config, f.name)
        kinds = str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        if "float" in kinds:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{owner}.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{owner}.{f.name} must be a finite number, got {value}")
        elif "int" in kinds and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral)
        ):
            raise ValueError(f"{owner}.{f.name} must be an integer, got {value!r}")


_Config = TypeVar("_Config", bound="DictConfig")


class DictConfig:
    """Mixin for a dataclass: :meth:`to_dict` and a strict :meth:`from_dict`.

    Checkpoints store configs as plain dicts so that they load with ``weights_only=True``.
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_Config], data: Mapping[str, Any]) -> _Config:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
        return cls(**data)


#: The paper's block types (specification §2.2).
BLOCK_TYPES = ("basic", "se", "res1", "res2", "rese1", "rese2")
INITS = ("keras", "he")


@dataclass(frozen=True)
class Variant:
    """One of the paper's twelve models: a block type with or without multi-level aggregation.

    Attributes:
        name: the registry name, e.g. ``"rese2-multi"``.
        block: the block type, one of :data:`BLOCK_TYPES`.
        multi: whether the head reads the last three blocks (specification §2.1).
        num_convs: convolutions on a residual block's main path (1 or 2); 0 for the plain
            conv block.
        se: whether the blocks carry squeeze-and-excitation gates.
    """

    name: str
    block: str
    multi: bool
    num_convs: int
    se: bool


def variant_name(block: str, multi: bool) -> str:
    """The registry name of a block type with or without multi-level aggregation."""
    return f"{block}-multi" if multi else block


# block type -> (residual convs n or 0 for the plain conv block, uses SE)
_BLOCK_SPECS: dict[str, tuple[int, bool]] = {
    "basic": (0, False),
    "se": (0, True),
    "res1": (1, False),
    "res2": (2, False),
    "rese1": (1, True),
    "rese2": (2, True),
}

#: The twelve variants of the paper, in the paper's order: every block type without and with
#: multi-level feature aggregation.
VARIANTS: dict[str, Variant] = {
    name: Variant(name, block, multi, *_BLOCK_SPECS[block])
    for block in BLOCK_TYPES
    for multi in (False, True)
    for name in [variant_name(block, multi)]
}


def get_variant(name: str) -> Variant:
    """The registry row of ``name``; a ``ValueError`` lists the valid names."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def check_variants(names: Iterable[str] | str | None) -> list[str]:
    """Variant names from a list or one space/comma-separated string, checked, in the given
    order; ``None`` or ``""`` gives every variant. A ``ValueError`` names the unknown ones."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    names = list(names or VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}; valid variants: {', '.join(VARIANTS)}"
        )
    return names


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """Everything needed to rebuild a model; stored in every checkpoint.

    Defaults are the paper's (specification §2); only ``block`` and ``multi`` differ between the
    twelve variants.
    """

    block: str = "basic"  # one of BLOCK_TYPES (specification §2.2)
    multi: bool = False  # head on the max-pooled last three blocks (specification §2.1)
    num_tags: int = 50  # outputs; 50 for MTAT/MSD top-50 (specification §1)
    width: float = 1.0  # multiplier on every channel count; 1.0 = paper
    alpha: float = 16.0  # SE expansion ratio, hidden = alpha * C (specification §2.2)
    dropout: float = 0.5  # head dropout before the last Dense (specification §2.1)
    block_dropout: float = 0.2  # dropout between the two convs of Res-2/ReSE-2 (specification §2.2)
    init: str = "keras"  # "keras" = Keras 2.0.5 incl. its Conv1D fan bug; "he" (specification §2.3)
    bn_eps: float = KERAS_BN_EPS  # Keras BatchNormalization epsilon (specification §7.2)
    bn_momentum: float = KERAS_BN_MOMENTUM  # = 1 - Keras momentum 0.99 (specification §7.2)
    num_blocks: int = 9  # input length is 3 ** (num_blocks + 1): 59049 samples for 9

    def __post_init__(self) -> None:
        _check_numbers(self)
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"unknown block type {self.block!r}; valid: {', '.join(BLOCK_TYPES)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if self.num_blocks < 3:
            raise ValueError(f"num_blocks must be >= 3, got {self.num_blocks}")
        if self.width <= 0 or self.alpha <= 0 or self.num_tags < 1:
            raise ValueError("width and alpha must be > 0 and num_tags >= 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.block_dropout < 1.0):
            raise ValueError("dropout rates must lie in [0, 1)")
        if self.bn_eps <= 0:
            raise ValueError(f"ModelConfig.bn_eps must be > 0, got {self.bn_eps}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"ModelConfig.bn_momentum must lie in (0, 1], got {self.bn_momentum}")

    @property
    def segment_length(self) -> int:
        """Input samples per segment, 3 ** (num_blocks + 1) (59049 for the paper)."""
        return 3 ** (self.num_blocks + 1)

    @property
    def has_se(self) -> bool:
        """Whether the blocks carry squeeze-and-excitation gates."""
        return _BLOCK_SPECS[self.block][1]

    @property
    def num_convs(self) -> int:
        """Convolutions on a residual block's main path (1 or 2); 0 for the plain conv block."""
        return _BLOCK_SPECS[self.block][0]

    @property
    def variant(self) -> str:
        """The registry name of this configuration's block type and head."""
        return variant_name(self.block, self.multi)

    def block_channels(self) -> list[int]:
        """Output width of each block: 128, 128, 256 x (n-3), 512 at width 1.0.

        The official code doubles before block index 2 and before the last block
        (specification §2.1).
        """
        widths = []
        for i in range(self.num_blocks):
            base = 128 * (2 if i >= 2 else 1) * (2 if i == self.num_blocks - 1 else 1)
            widths.append(self.scale(base))
        return widths

    def scale(self, channels: int) -> int:
        return max(1, round(channels * self.width))


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a registered variant, with optional field overrides.

    Raises:
        ValueError: for an unknown variant name (the message lists the valid names) or an
            unknown override.
    """
    variant = get_variant(name)
    known = {f.name for f in fields(ModelConfig)} - {"block", "multi"}
    bad = set(overrides) - known
    if bad:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(bad))} for build_model; "
            f"valid: {', '.join(sorted(known))}"
        )
    return ModelConfig(block=variant.block, multi=variant.multi, **overrides)


@dataclass(frozen=True)
class TrainConfig(DictConfig):
    """Every number of the training recipe; stored in every checkpoint and fixed for a run.

    The defaults are the paper's (specification §3). Where and how fast a run computes
    is a :class:`RuntimeConfig`, which may change when a run is resumed; these may not.

    Note:
        Keras' ``fit(epochs=100, initial_epoch=...)`` with epoch numbers continuing across
        stages caps the epoch *index* at 100, so the official code left later stages fewer
        than 100 epochs; here every stage may run ``max_epochs_per_stage`` epochs. With
        patience 2 neither cap is reached on MTAT.

    Note:
        ``precision`` is part of the recipe, not of the runtime, because it changes the numbers
        a run produces (:mod:`resemul_core.runtime`); a resume that would change it is refused.
    """

    learning_rate: float = 0.01  # lr of the first stage (specification §3)
    lr_factor: float = 0.2  # lr multiplier from one stage to the next (specification §3)
    num_stages: int = 5  # learning-rate stages: 0.01, 0.002, 4e-4, 8e-5, 1.6e-5 (specification §3)
    momentum: float = 0.9  # SGD momentum (specification §3)
    nesterov: bool = True  # Nesterov momentum (specification §3)
    lr_decay: float = (
        1e-6  # Keras time decay per step: lr_t = lr / (1 + decay t) (specification §3)
    )
    # Keras' l2(wd) on convolution kernels only: gradient 2·wd·w; official default 0
    # (specification §2.3; build_optimizer)
    weight_decay: float = 0.0
    batch_size: int = 23  # segments per optimizer step (specification §3)
    patience: int = (
        2  # Keras 2.0.5 EarlyStopping patience: stop at 3rd bad epoch (specification §3)
    )
    max_epochs_per_stage: int = 100  # epochs per stage at most (specification §3)
    max_steps_per_epoch: int | None = (
        None  # cap on steps; None: ceil(segments/batch) (specification §3)
    )
    val_segments: int | None = (
        None  # validate on the first N segments; None: all (specification §3)
    )
    val_batch_size: int = 230  # segments per validation forward pass (no effect on the value)
    seed: int = 0  # seeds weights, data order and dropout (not in the paper)
    precision: str = "fp32"  # "fp32" (the paper's), "tf32" or "bf16" (resemul_core.runtime)
    # fine-tuning (resemul_core.training.init_from): a checkpoint file or run directory (its
    # best.pt) whose weights start the run instead of the random init; None: the random init
    init_from: str | None = None
    # the stem and the first N blocks keep init_from's weights and BN statistics (needs init_from)
    freeze_blocks: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.init_from, os.PathLike):  # a Path is a path: store it as plain text
            object.__setattr__(self, "init_from", os.fspath(self.init_from))
        _check_numbers(self)  # NaN and infinity first: they pass every comparison below
        positive = ("learning_rate", "batch_size", "num_stages", "max_epochs_per_stage")
        for name in positive + ("val_batch_size",):
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
        if self.momentum >= 1.0:
            raise ValueError(f"TrainConfig.momentum must lie in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("TrainConfig.nesterov needs momentum > 0 (or nesterov=false)")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"TrainConfig.seed must lie in [0, 2**64), got {self.seed}")
        check_precision(self.precision)
        if self.init_from is not None and (
            not isinstance(self.init_from, str) or not self.init_from.strip()
        ):
            raise ValueError(
                f"TrainConfig.init_from must be a path or None, got {self.init_from!r}"
            )
        if self.freeze_blocks < 0:
            raise ValueError(f"TrainConfig.freeze_blocks must be >= 0, got {self.freeze_blocks}")
        if self.freeze_blocks > 0 and self.init_from is None:
            raise ValueError(
                f"freeze_blocks={self.freeze_blocks} needs init_from: frozen blocks would keep "
                "their random initial weights, so give the trained model to start from "
                "(--init-from CHECKPOINT, or init_from=...)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`. Also reads the training configs of earlier versions:
        their ``autocast: true`` was bf16 (``false`` fp32), and they held the runtime fields,
        which are left out here (:meth:`RuntimeConfig.from_dict` reads them)."""
        data = {k: v for k, v in data.items() if k not in _RUNTIME_NAMES}
        if "autocast" in data and "precision" not in data:
            data["precision"] = "bf16" if data.pop("autocast") else "fp32"
        return super().from_dict(data)


@dataclass(frozen=True)
class RuntimeConfig(DictConfig):
    """Where and how fast a run computes; none of it changes the result, so it may change
    when a run is resumed. Recorded in checkpoints for reference.

    Note:
        Data-parallel runs (``torchrun``) keep ``TrainConfig.batch_size`` as the *global* batch.
        With ``sync_bn`` (the default) BatchNorm normalises over the global batch as the
        paper's single GPU did, and a run matches a single-process run up to float rounding,
        except that dropout masks are drawn per rank. Without it every rank normalises its own
        ``batch_size / world_size`` segments: faster, but a different (noisier) model.
    """

    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda", "cuda:1"
    num_workers: int = 0  # DataLoader worker processes; 0 = load in the main process
    checkpoint_every: int = 1000  # optimizer steps between resume checkpoints
    compile: bool = False  # torch.compile forward + backward; CUDA graphs on one GPU
    deterministic: bool = False  # deterministic CUDA kernels, no autotuning: slower
    data_on_device: bool = False  # hold the training split on the device as int16
    sync_bn: bool = True  # under DDP, BN statistics over the global batch, not per rank

    def __post_init__(self) -> None:
        _check_numbers(self)
        check_device(self.device)
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0, got {self.checkpoint_every}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        """Rebuild from :meth:`to_dict`, or from an earlier version's training config (which
        held these fields among the recipe's): keys of other configs are ignored."""
        return super().from_dict({k: v for k, v in data.items() if k in _RUNTIME_NAMES})


_RUNTIME_NAMES = frozenset(f.name for f in fields(RuntimeConfig))


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run is configured by: the model, the recipe and the runtime.

    Built by :func:`resemul_core.profiles.resolve_config` from a variant, a profile and
    overrides; :func:`~resemul_core.training.loop.train` takes it as it is.
    """

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.train.freeze_blocks > self.model.num_blocks:
            raise ValueError(
                f"freeze_blocks={self.train.freeze_blocks} is more than the model's "
                f"{self.model.num_blocks} blocks (0 to {self.model.num_blocks} can be frozen)"
            )

    @property
    def variant(self) -> str:
        return self.model.variant

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(),
                "runtime": self.runtime.to_dict()}  # fmt: skip

    def flat(self) -> dict[str, Any]:
        """``{"model.width": 0.0625, "train.seed": 0, "runtime.device": "cpu", ...}``: one row
        per setting, for a table of what ran."""
        return {
            f"{part}.{k}": v for part, values in self.to_dict().items() for k, v in values.items()
        }


def num_blocks_for(segment_length: int) -> int:
    """The number of blocks whose input is ``segment_length = 3 ** (num_blocks + 1)`` samples."""
    n = round(math.log(segment_length, 3)) - 1
    if n < 3 or 3 ** (n + 1) != segment_length:
        raise ValueError(
            f"segment length {segment_length} is not 3**(n + 1) for n >= 3 blocks "
            "(59049 = 3**10 for the paper's 9 blocks)"
        )
    return n
