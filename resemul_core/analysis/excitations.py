"""Excitation analysis: what the squeeze-and-excitation gates learn (specification §5).

Public: :func:`extract_excitations` (model + segment store -> :class:`ExcitationSet`),
:class:`ExcitationSet`, :func:`save_excitations`, :func:`load_excitations`, :func:`require_se`,
:func:`se_variants`.

This module runs a model over a split and keeps its SE gates; the statistics over them
(tag means, standard deviations across tags, loudness regressions, the summary next to the
paper's numbers) are the pure functions of :mod:`resemul_core.analysis.excitation_stats`.

Shape legend: N = segments, K = clips, T = tags, C = channels of one SE block. A *level* is
the 1-based index of the block an SE gate belongs to (1..9 in the paper's model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from resemul_core.analysis.excitation_stats import (
    DEFAULT_FLOOR_DB,
    rms_loudness,
    segment_rms,
    tag_means,
)
from resemul_core.config import VARIANTS, ModelConfig
from resemul_core.files import atomic_write
from resemul_core.model.inference import run_model
from resemul_core.runtime import select_device

__all__ = [
    "ExcitationSet",
    "se_variants",
    "require_se",
    "extract_excitations",
    "save_excitations",
    "load_excitations",
]

logger = logging.getLogger(__name__)

_FORMAT = "resemul-excitations"
_VERSION = 1


class SegmentSource(Protocol):
    """What :func:`extract_excitations` needs of a segment store (see ``store.SegmentStore``)."""

    tags: Sequence[str]
    clips: pd.DataFrame  # one row per clip, with a ``clip_id`` column
    labels: np.ndarray  # (num_clips, T) uint8

    def split_indices(self, split: str) -> np.ndarray: ...

    def read_clip(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ExcitationSet:
    """The SE gates of one model over one split, per clip and (for some levels) per segment.

    Attributes:
        levels: 1-based block level of each SE block, in block order.
        clip: one ``(K, C_i)`` float32 array per level: the gate averaged over the clip's
            segments (specification §5.1).
        segment: level -> ``(N, C_i)`` float32 per-segment gates, for the levels kept.
        segment_clip: ``(N,)`` int64, the row of ``clip``/``labels`` each segment belongs to.
        segment_rms: ``(N,)`` float32 RMS amplitude of each input segment (full scale = 1).
        clip_ids: ``(K,)`` clip identifiers as strings.
        labels: ``(K, T)`` uint8 binary tag labels.
        tags: the T tag names.
        variant: the model's variant name, e.g. ``"se-multi"``.
        split: the split the clips come from.
    """

    levels: tuple[int, ...]
    clip: tuple[np.ndarray, ...]
    segment: dict[int, np.ndarray]
    segment_clip: np.ndarray
    segment_rms: np.ndarray
    clip_ids: np.ndarray
    labels: np.ndarray
    tags: tuple[str, ...]
    variant: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        k, t = self.labels.shape
        if len(self.clip) != len(self.levels):
            raise ValueError(f"{len(self.clip)} clip arrays for {len(self.levels)} levels")
        for level, arr in zip(self.levels, self.clip, strict=True):
            if arr.ndim != 2 or arr.shape[0] != k:
                raise ValueError(f"level {level}: expected ({k}, C) clip array, found {arr.shape}")
        n = len(self.segment_clip)
        for level, arr in self.segment.items():
            if level not in self.levels or arr.shape != (n, self.channels(level)):
                raise ValueError(
                    f"level {level}: expected ({n}, {self.channels(level)}) segment array, "
                    f"found {arr.shape}"
                )
        if self.segment_rms.shape != (n,) or len(self.clip_ids) != k or len(self.tags) != t:
            raise ValueError("segment_rms, clip_ids and tags do not match segments/labels")

    @property
    def num_clips(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_segments(self) -> int:
        return int(len(self.segment_clip))

    def channels(self, level: int) -> int:
        """Number of channels C of the SE block at ``level``."""
        return int(self.clip[self._position(level)].shape[1])

    def clip_level(self, level: int) -> np.ndarray:
        """``(K, C)`` clip-mean gates of the SE block at ``level``."""
        return self.clip[self._position(level)]

    def segment_level(self, level: int) -> np.ndarray:
        """``(N, C)`` per-segment gates of the SE block at ``level``."""
        if level not in self.segment:
            kept = ", ".join(map(str, sorted(self.segment))) or "none"
            raise KeyError(
                f"per-segment excitations of level {level} were not kept (kept: {kept}); "
                "extract with segment_levels='all'"
            )
        return self.segment[level]

    def tag_means(self, level: int) -> np.ndarray:
        """``(T, C)`` mean clip excitation per tag, see
        :func:`~resemul_core.analysis.excitation_stats.tag_means`."""
        return tag_means(self.clip_level(level), self.labels)

    def loudness(self, measure: str = "rms", *, floor_db: float = DEFAULT_FLOOR_DB) -> np.ndarray:
        """``(N,)`` per-segment loudness as RMS amplitude or dB, see
        :func:`~resemul_core.analysis.excitation_stats.rms_loudness`."""
        return rms_loudness(self.segment_rms, measure, floor_db=floor_db)

    def _position(self, level: int) -> int:
        try:
            return self.levels.index(level)
        except ValueError:
            raise KeyError(f"no SE block at level {level}; levels: {self.levels}") from None


# --- extraction ---------------------------------------------------------------------------


def se_variants() -> list[str]:
    """Names of the registered variants whose blocks carry SE gates (``se*``, ``rese*``)."""
    return [name for name, variant in VARIANTS.items() if variant.se]


def require_se(config: ModelConfig) -> None:
    """Raise ``ValueError`` unless the configured model has SE blocks.

    The message names the variant and lists the SE-bearing ones.
    """
    if not config.has_se:
        raise ValueError(
            f"variant {config.variant!r} has no squeeze-and-excitation blocks, so there are "
            f"no excitations to analyse; use one of: {', '.join(se_variants())}"
        )


def extract_excitations(
    model: torch.nn.Module,
    store: SegmentSource,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    segment_levels: str | Sequence[int] = "first",
    progress: bool = True,
) -> ExcitationSet:
    """Run every segment of a split through an SE model and collect its SE gates.

    Args:
        model: a :class:`~resemul_core.model.sample_cnn.SampleCNN` of an SE-bearing variant. It
            is moved to ``device`` and run in float32 and eval mode by
            :func:`~resemul_core.model.inference.run_model` (``forward_with_gates``); its
            training flag is restored afterwards.
        store: the segment store (``store.open_store``); segments ``(n_seg, L)`` with ``L`` the
            model's input length.
        split: which split's clips to use (the paper: ``"test"``).
        batch_size: segments per forward pass; batches span clip boundaries.
        device: where to run the model: a ``torch.device`` or a name for
            :func:`~resemul_core.runtime.select_device` (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
        segment_levels: levels whose per-segment gates are kept: ``"first"`` (the first SE
            block, what the loudness analysis needs), ``"all"``, or a list of levels.
        progress: show a tqdm progress bar over clips.

    Returns:
        an :class:`ExcitationSet` with clip means for every level.

    Raises:
        ValueError: the model has no SE blocks, or a clip's segments have the wrong length.

    Note:
        Per-segment gates of all nine paper-size blocks over the MTAT test split take about
        400 MB, so by default only the first block's are kept; clip means (specification §5.1) are
        accumulated on the fly for every level. Clips with no segments are skipped.
    """
    config: ModelConfig = model.config
    require_se(config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    levels = tuple(i + 1 for i, block in enumerate(model.blocks) if block.se is not None)
    keep = _segment_levels(segment_levels, levels)
    indices = np.asarray(store.split_indices(split), dtype=np.int64)
    if len(indices) == 0:
        raise ValueError(f"split {split!r} has no clips")

    device = select_device(str(device))
    model.to(device)
    counts = np.zeros(len(indices), dtype=np.int64)
    rms: list[np.ndarray] = []

    def clips() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for row, index in enumerate(
            tqdm(indices, desc=f"excitations ({split})", unit="clip", disable=not progress)
        ):
            segments = np.asarray(store.read_clip(int(index)), dtype=np.float32)
            if segments.ndim != 2 or segments.shape[1] != config.segment_length:
                raise ValueError(
                    f"clip {int(index)}: expected segments of shape (n, "
                    f"{config.segment_length}), found {segments.shape}"
                )
            counts[row] = len(segments)
            if len(segments):
                rms.append(segment_rms(segments))
                yield segments, np.full(len(segments), row, dtype=np.int64)

    sums: list[np.ndarray] = []  # per level (K, C_i) float64, sized at the first batch
    kept: dict[int, list[np.ndarray]] = {level: [] for level in keep}
    owners: list[np.ndarray] = []
    batches = _rebatch(clips(), batch_size)  # (segments (b, L), owner rows (b,))
    for out in run_model(model, batches, device=device, precision="fp32", gates=True):
        gates, (owner,) = out.gates, out.extra
        for pos, gate in enumerate(gates):
            g = gate.cpu().numpy()  # b, C_i
            if len(sums) < len(gates):
                sums.append(np.zeros((len(indices), g.shape[1])))
            np.add.at(sums[pos], owner, g)
            if levels[pos] in kept:
                kept[levels[pos]].append(g)
        owners.append(owner)

    present = counts > 0
    if not present.any():
        raise ValueError(f"split {split!r} has no segments")
    if not present.all():
        logger.warning("skipped %d clip(s) without segments", int((~present).sum()))
    # Rows of clips without segments are dropped, so segment -> clip rows are renumbered.
    new_row = np.cumsum(present) - 1
    clip_arrays = tuple((s[present] / counts[present, None]).astype(np.float32) for s in sums)
    clips = store.clips.iloc[indices[present]]
    result = ExcitationSet(
        levels=levels,
        clip=clip_arrays,
        segment={level: np.concatenate(parts) for level, parts in kept.items()},
        segment_clip=new_row[np.concatenate(owners)],
        segment_rms=np.concatenate(rms).astype(np.float32),
        clip_ids=clips["clip_id"].astype(str).to_numpy(),
        labels=np.asarray(store.labels)[indices[present]].astype(np.uint8),
        tags=tuple(store.tags),
        variant=config.variant,
        split=split,
    )
    logger.info(
        "extracted %d SE levels for %d clips / %d segments of split %r",
        len(levels),
        result.num_clips,
        result.num_segments,
        split,
    )
    return result


def _rebatch(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regroup ``(segments (n, L), owner rows (n,))`` chunks into batches of ``batch_size``
    segments (the last one may be smaller); batches span clip boundaries."""
    pending: list[np.ndarray] = []
    pending_owner: list[np.ndarray] = []
    size = 0
    for segments, owner in chunks:
        pending.append(segments)
        pending_owner.append(owner)
        size += len(segments)
        if size >= batch_size:
            batch, owners = np.concatenate(pending), np.concatenate(pending_owner)
            full = size - size % batch_size
            for start in range(0, full, batch_size):
                yield batch[start : start + batch_size], owners[start : start + batch_size]
            pending, pending_owner, size = [batch[full:]], [owners[full:]], size - full
    if size:
        yield np.concatenate(pending), np.concatenate(pending_owner)


def _segment_levels(spec: str | Sequence[int], levels: tuple[int, ...]) -> tuple[int, ...]:
    if spec == "first":
        return levels[:1]
    if spec == "all":
        return levels
    if isinstance(spec, str):
        raise ValueError(f"segment_levels must be 'first', 'all' or a list of levels, got {spec!r}")
    unknown = sorted(set(spec) - set(levels))
    if unknown:
        raise ValueError(f"no SE block at level(s) {unknown}; levels: {list(levels)}")
    return tuple(sorted(set(spec)))


def save_excitations(path: str | os.PathLike, excitations: ExcitationSet) -> Path:
    """Atomically write an :class:`ExcitationSet` as an uncompressed ``.npz`` file.

    Keys: ``clip_level_<k>`` ``(K, C)``, ``segment_level_<k>`` ``(N, C)``, ``levels``,
    ``segment_clip``, ``segment_rms``, ``clip_ids``, ``labels``, ``tags``, ``variant``,
    ``split``, ``format``, ``version``. Readable with ``np.load(allow_pickle=False)``.
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(_FORMAT),
        "version": np.array(_VERSION),
        "levels": np.asarray(excitations.levels, dtype=np.int64),
        "segment_clip": excitations.segment_clip.astype(np.int64),
        "segment_rms": excitations.segment_rms.astype(np.float32),
        "clip_ids": np.asarray(excitations.clip_ids, dtype=str),
        "labels": excitations.labels.astype(np.uint8),
        "tags": np.asarray(excitations.tags, dtype=str),
        "variant": np.array(excitations.variant),
        "split": np.array(excitations.split),
    }
    for level, arr in zip(excitations.levels, excitations.clip, strict=True):
        arrays[f"clip_level_{level}"] = arr.astype(np.float32)
    for level, arr in excitations.segment.items():
        arrays[f"segment_level_{level}"] = arr.astype(np.float32)
    path = Path(path)
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)
    return path


def load_excitations(path: str | os.PathLike) -> ExcitationSet:
    """Read a file written by :func:`save_excitations`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an excitation file of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"excitation file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != _FORMAT:
            raise ValueError(f"{path} is not a resemul excitation file")
        if int(data["version"]) != _VERSION:
            raise ValueError(f"{path} has version {int(data['version'])}, expected {_VERSION}")
        levels = tuple(int(v) for v in data["levels"])
        return ExcitationSet(
            levels=levels,
            clip=tuple(data[f"clip_level_{k}"] for k in levels),
            segment={k: data[f"segment_level_{k}"] for k in levels if f"segment_level_{k}" in data},
            segment_clip=data["segment_clip"],
            segment_rms=data["segment_rms"],
            clip_ids=data["clip_ids"],
            labels=data["labels"],
            tags=tuple(str(t) for t in data["tags"]),
            variant=str(data["variant"]),
            split=str(data["split"]),
        )
