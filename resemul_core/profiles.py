"""Training profiles and the one resolver that turns (variant, profile, overrides) into a run's
configuration.

Public: :class:`Profile`, :data:`PROFILES`, :func:`get_profile`, :func:`resolve_config`,
:func:`apply_overrides`, :func:`parse_overrides`, :func:`setting_names`.

A profile is a small table of overrides of the paper's defaults; a run's configuration is::

    defaults of ModelConfig / TrainConfig / RuntimeConfig  (the paper's)
      <- the profile's table                               (e.g. demo: width 1/16, 2 stages)
      <- the caller's overrides                            (--set width=0.125, make book WIDTH=)
      <- the store's facts                                 (number of tags, segment length)

Every setting is addressed by its field name (``width``, ``seed``, ``device``), which is unique
across the three dataclasses, or qualified (``model.width``). The same resolver serves the
command line (``resemul train --set key=value``), the book's notebooks (``make book WIDTH=0.125
SEED=1`` or ``SET="..."``) and Python callers, and it rejects unknown keys with the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from resemul_core.config import (
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    model_config,
    num_blocks_for,
)

__all__ = [
    "PROFILES",
    "Profile",
    "apply_overrides",
    "get_profile",
    "parse_overrides",
    "resolve_config",
    "setting_names",
]

# section of RunConfig -> its dataclass
_SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig}
# fields a variant fixes: they are set by naming the variant, never by an override
_VARIANT_FIELDS = frozenset({"block", "multi"})
# fields that follow from the data unless set explicitly (then they must agree with it)
_STORE_FIELDS = frozenset({"num_tags", "num_blocks"})


@dataclass(frozen=True)
class Profile:
    """A named training budget: overrides of the paper's settings, by field name.

    Smaller profiles change sizes and budgets (width, stages, epochs, steps per epoch,
    precision) and, on the CPU, the first stage's learning rate, never the algorithm.

    Note:
        ``paper`` trains in float32 as the paper did; ``demo``, ``gpu`` and ``tiny`` use bf16
        autocast (also on the CPU), which makes the book's runs faster and their numbers
        slightly different from float32 ones (the measured difference is on the book's
        training page).

    Note:
        ``demo`` and ``tiny`` also shorten the horizon of BatchNorm's running averages
        (``bn_momentum`` 0.1 instead of Keras' 0.01, i.e. ~10 steps instead of ~100). This
        leaves training itself unchanged (train-mode BN uses batch statistics) and only lets
        the inference-time statistics keep up with weights that move fast over a few hundred
        steps. With the paper's 0.01, a 540-step ``demo`` run of se-multi on the synthetic data
        scored test ROC-AUC 0.58; with 0.1, 0.75 (MTAT epochs of 6,628 steps make the horizon
        irrelevant for ``paper``).

    Note:
        ``demo`` starts at learning rate 0.04 instead of the paper's 0.01 (then x0.2 per stage
        as in the paper): in 720 steps the paper's rate leaves the model far from converged.
        On the synthetic data (2026-11-28, bench/RESULTS.md, "Demo design experiment") this
        raised se-multi's test ROC-AUC from 0.867 to 0.916 (seed 0; 0.816 to 0.869 with
        seed 1) at the same cost, and spread the SE gates further from their untrained 0.5.
        ``demo-excitations`` is the longer, hotter run of se-multi that the excitation chapter
        analyses (learning rate 0.1, 3 stages): there the first block's gates respond to
        loudness enough for their spread across tags to show (see that experiment for how much
        it varies with the seed).
    """

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


# The book on 2 CPU cores (profile "demo"); chosen by the experiment of 2026-11-28 in
# bench/RESULTS.md ("Demo design experiment (CPU)").
_DEMO: dict[str, Any] = {
    "width": 1 / 16,
    "bn_momentum": 0.1,
    "learning_rate": 0.04,
    "num_stages": 2,
    "max_epochs_per_stage": 3,
    "max_steps_per_epoch": 120,
    "val_segments": 230,
    "precision": "bf16",
    "checkpoint_every": 120,
}

#: The training profiles: the paper's recipe, the book on a CPU (and the excitation chapter's
#: longer run) and on a GPU, a smoke run.
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            "paper",
            "The paper's recipe at full width in float32: 5 stages, up to 100 epochs each, "
            "one epoch = every training segment once in steps of 23: on MTAT 6,628 steps with "
            "the paper split policy (15,244 clips), 6,630 with resemul (15,247 decodable "
            "clips); the official code's 6,631 counts its hard-coded 15,250 clips.",
            {"num_workers": 6},
        ),
        Profile(
            "demo",
            "Sized for the book on 2 CPU cores (1-3 minutes per variant in bf16): width 1/16, "
            "2 stages of at most 3 epochs of 120 steps (<= 720 steps of 23 segments) from "
            "learning rate 0.04, validation on <= 230 segments, BN averaging horizon ~10 steps.",
            _DEMO,
        ),
        Profile(
            "demo-excitations",
            "The book's excitation run of se-multi on 2 CPU cores (~1.5 minutes in bf16): "
            "demo's sizes, 3 stages of at most 3 epochs of 120 steps (<= 1,080 steps) from "
            "learning rate 0.1, so that the SE gates, the first block's above all, move well "
            "away from their untrained 0.5.",
            {**_DEMO, "learning_rate": 0.1, "num_stages": 3},
        ),
        Profile(
            "gpu",
            "The book on one GPU: the paper's width in bf16, 2 stages of at most 3 epochs of "
            "1,000 steps (<= 6,000 steps of 23 segments), validation on <= 2,300 segments, "
            "the training split held on the GPU.",
            {
                "num_stages": 2,
                "max_epochs_per_stage": 3,
                "max_steps_per_epoch": 1000,
                "val_segments": 2300,
                "precision": "bf16",
                "data_on_device": True,
            },
        ),
        Profile(
            "tiny",
            "A smoke test in seconds: width 1/16, bf16, 2 stages of at most 3 epochs of 10 steps.",
            {
                "width": 1 / 16,
                "bn_momentum": 0.1,
                "num_stages": 2,
                "max_epochs_per_stage": 3,
                "max_steps_per_epoch": 10,
                "val_segments": 230,
                "precision": "bf16",
                "checkpoint_every": 5,
            },
        ),
    ]
}


def get_profile(name: str) -> Profile:
    """The training profile called ``name``; a ``ValueError`` lists the valid names."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def _owners() -> dict[str, str]:
    """Field name -> the :class:`RunConfig` section that owns it."""
    return {f.name: section for section, cls in _SECTIONS.items() for f in fields(cls)}


def setting_names() -> list[str]:
    """Every setting an override may name, as ``section.field``."""
    return [f"{owner}.{name}" for name, owner in _owners().items() if name not in _VARIANT_FIELDS]


def _route(key: str) -> tuple[str, str]:
    """``(section, field)`` of an override key, bare (``width``) or qualified (``model.width``)."""
    owners = _owners()
    section, _, name = key.rpartition(".")
    if name in _VARIANT_FIELDS:
        raise ValueError(f"{key!r} is fixed by the variant; choose another variant instead")
    if name not in owners or (section and owners[name] != section):
        raise ValueError(
            f"unknown setting {key!r}; valid settings: {', '.join(sorted(_owners_public()))}"
        )
    return owners[name], name


def _owners_public() -> list[str]:
    return [name for name in _owners() if name not in _VARIANT_FIELDS]


def apply_overrides(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``config`` with some settings replaced, each routed to the dataclass that owns it.

    Raises:
        ValueError: an unknown setting (the message lists the valid ones), a setting fixed by
            the variant (``block``, ``multi``), or a value the dataclass rejects.
    """
    changes: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key, value in overrides.items():
        section, name = _route(key)
        changes[section][name] = value
    return RunConfig(
        **{
            section: dataclasses.replace(getattr(config, section), **changes[section])
            for section in _SECTIONS
        }
    )


def resolve_config(
    variant: str,
    profile: str = "paper",
    overrides: Mapping[str, Any] | None = None,
    *,
    num_tags: int | None = None,
    segment_length: int | None = None,
) -> RunConfig:
    """The configuration of a run: the paper's defaults, the profile's table, the overrides,
    and the data's facts, in that order.

    Args:
        variant: a key of :data:`~resemul_core.config.VARIANTS`.
        profile: a key of :data:`PROFILES`.
        overrides: settings by name (``{"width": 0.125, "seed": 3}``); see :func:`setting_names`.
        num_tags: the store's number of tags; sets ``num_tags`` (an override must agree).
        segment_length: the store's segment length; sets ``num_blocks`` (an override must
            agree: 59,049 samples = 9 blocks).

    Raises:
        ValueError: unknown variant, profile or setting, an invalid value, or an override of
            ``num_tags``/``num_blocks`` that contradicts the data.
    """
    chosen = get_profile(profile)
    overrides = dict(overrides or {})
    config = RunConfig(model=model_config(variant))
    config = apply_overrides(config, {**chosen.overrides, **overrides})
    facts = {}
    if num_tags is not None:
        facts["num_tags"] = num_tags
    if segment_length is not None:
        facts["num_blocks"] = num_blocks_for(segment_length)
    for name, value in facts.items():
        given = {k for k in overrides if k.rpartition(".")[2] == name}
        if given and getattr(config.model, name) != value:
            raise ValueError(
                f"{name}={getattr(config.model, name)} was asked for, but the data gives "
                f"{name}={value} (from its {'tags' if name == 'num_tags' else 'segment length'})"
            )
    return apply_overrides(config, facts)


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """``text`` as a value of the field type ``annotation`` (bool, int, float, str, optional)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    if options and type(None) in options:
        if text.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in options if a is not type(None))
    kind = getattr(annotation, "__name__", annotation)
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if annotation is int:
            return int(text)
        if annotation is float:
            value = float(text)
            if math.isfinite(value):
                return value
            kind = "a finite float"  # NaN and infinity parse, but no setting takes them
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"setting {key}={text!r}: expected {kind}") from None
    return text


def parse_overrides(items: Iterable[str] | str | None) -> dict[str, Any]:
    """``key=value`` strings as typed overrides for :func:`resolve_config`.

    Args:
        items: ``["width=0.125", "seed=3"]`` or one string ``"width=0.125 seed=3"`` (commas
            also separate); ``None`` or ``""`` gives no overrides. Values are read as the
            field's type: ``true``/``false`` for booleans, ``none`` for an optional field.

    Raises:
        ValueError: an item without ``=``, an unknown setting, or a value of the wrong type.
    """
    if isinstance(items, str):
        items = items.replace(",", " ").split()
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        section, name = _route(key.strip())
        hints = get_type_hints(_SECTIONS[section])
        overrides[name] = _parse_value(text.strip(), hints[name], key)
    return overrides
