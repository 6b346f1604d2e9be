"""The paper's pipeline as four calls: prepare, fit, evaluate, analyse the excitations.

Public: :func:`prepare`, :func:`fit`, :class:`Fit`, :func:`evaluate`, :func:`evaluate_all`,
:func:`compare_runs`, :class:`RunComparison`, :func:`analyse_excitations`,
:class:`ExcitationAnalysis`.

This is the one front door: the command line (``resemul data prepare``, ``resemul train``,
``resemul evaluate``, ``resemul excitations``) parses its arguments and calls these functions,
and the book's notebooks call the same functions in their cells, so ``make book`` runs exactly
what ``resemul`` runs. Each step skips work already done: a complete store is opened, an
interrupted one resumed; a finished run returns at once, an interrupted one continues.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from matplotlib.figure import Figure

from resemul_core.config import RunConfig, get_variant
from resemul_core.data.prepare import prepare_store
from resemul_core.data.sources import read_source
from resemul_core.data.store import SegmentStore, open_store
from resemul_core.data.synth import DEFAULT_NUM_CLIPS, ensure_dataset
from resemul_core.files import write_json
from resemul_core.profiles import apply_overrides, get_profile, resolve_config
from resemul_core.training.loop import train
from resemul_core.training.run_dir import (
    LAST_CHECKPOINT,
    find_runs,
    resolve_checkpoint,
    write_metrics,
)
from resemul_core.training.state import TrainResult, saved_run_config

__all__ = [
    "DATASETS",
    "ExcitationAnalysis",
    "Fit",
    "RunComparison",
    "analyse_excitations",
    "compare_runs",
    "evaluate",
    "evaluate_all",
    "fit",
    "prepare",
]

logger = logging.getLogger(__name__)

StoreLike = SegmentStore | str | os.PathLike

#: Datasets :func:`prepare` knows: the embedded generator plus every adapter.
DATASETS = ("synth", "mtat", "msd", "table")


def _store(store: StoreLike) -> SegmentStore:
    return store if isinstance(store, SegmentStore) else open_store(store)


def prepare(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split_policy: str | None = None,
    seed: int = 0,
    synth_clips: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    audio: Mapping[str, Any] | None = None,
    **source_options: Any,
) -> SegmentStore:
    """Make sure a prepared segment store of ``dataset`` exists at ``out``, and open it.

    ``"synth"`` first writes the embedded synthetic dataset to ``root`` (unless a complete one
    with the same parameters is there) and then prepares it through the MTAT adapter, like
    real MagnaTagATune.

    Args:
        dataset: one of :data:`DATASETS` (``synth``, ``mtat``, ``msd``, ``table``).
        root: the dataset folder (``synth``: where to write it; ``table``: the table file).
        out: the store directory; rerun to resume an interrupted preparation.
        split_policy: ``mtat``/``msd`` only: ``"paper"`` (default) or ``"resemul"``
            (:mod:`resemul_core.data.sources`).
        seed: the synthetic dataset's seed (``synth``), or the random split's (``table``).
        synth_clips: clips of the synthetic dataset (default: the book's, ``DEFAULT_NUM_CLIPS``).
        workers: decoding processes (default: one per CPU core).
        overwrite: replace what ``out`` holds.
        audio: :func:`~resemul_core.data.prepare.prepare_store`'s audio settings
            (``sample_rate``, ``segment_length``, ``segments_per_clip``, ``clip_duration``);
            the paper's by default.
        **source_options: further options of the dataset's adapter (``top_k``, ``min_duration``,
            ``path_column``, ...; :func:`~resemul_core.data.sources.read_source`).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if dataset == "synth":
        ensure_dataset(
            root, num_clips=synth_clips or DEFAULT_NUM_CLIPS, seed=seed, progress=progress
        )
        dataset = "mtat"
    elif synth_clips is not None:
        raise ValueError("synth_clips applies to the synthetic dataset only")
    if dataset in ("mtat", "msd"):
        source_options["split_policy"] = split_policy or "paper"
    elif split_policy:
        raise ValueError("a split policy applies to the mtat, msd and synth datasets only")
    if dataset == "table":
        source_options["seed"] = seed
    source = read_source(dataset, root, **source_options)
    return prepare_store(
        source, out, workers=workers, progress=progress, overwrite=overwrite, **(audio or {})
    )


@dataclass(frozen=True)
class Fit:
    """What :func:`fit` returns: the training result, and the configuration that ran.

    Attributes:
        result: the :class:`~resemul_core.training.state.TrainResult`.
    """

    result: TrainResult

    @property
    def config(self) -> RunConfig:
        """The run's resolved configuration (for a resumed run: the saved one, with this
        call's runtime settings)."""
        return self.result.config

    @property
    def device(self) -> str:
        """The device the run used this time, e.g. ``"cpu"`` or ``"cuda:0"``."""
        return self.result.device

    def settings(self) -> dict[str, Any]:
        """Every setting of the run, ``section.field -> value``, with the device it used."""
        return {**self.config.flat(), "runtime.device (used)": self.device}


def fit(
    store: StoreLike,
    run_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool | Literal["auto"] = "auto",
    overwrite: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> Fit:
    """Train ``variant`` on ``store`` into ``run_dir`` with a profile and overrides; by default
    continue the run already there, or return at once if it is finished.

    The configuration is resolved once (:func:`resemul_core.profiles.resolve_config`: the
    paper's defaults, the profile's table, ``overrides``, then the store's number of tags and
    segment length) and handed to :func:`~resemul_core.training.loop.train` as it is.

    Args:
        store: the segment store or its directory.
        run_dir: the run directory.
        variant: a key of :data:`~resemul_core.config.VARIANTS`; needed for a fresh run.
        profile: a key of :data:`~resemul_core.profiles.PROFILES` (default ``"paper"``). When a
            run is resumed and neither ``variant`` nor ``profile`` is given, the saved
            configuration is used, with ``overrides`` applied to it.
        overrides: settings by name, e.g. ``{"width": 0.125, "seed": 1, "device": "cpu"}``
            (:func:`~resemul_core.profiles.parse_overrides` reads ``key=value`` strings). On
            resume only runtime settings (device, workers, ...) may differ from the saved run.
            To fine-tune, ``{"init_from": "runs/se-multi", "freeze_blocks": 2}`` starts from a
            trained model's weights, re-headed for this store's tags
            (:mod:`resemul_core.training.init_from`).
        resume: ``"auto"``: continue a run in ``run_dir`` if there is one, else start afresh;
            ``True``: there must be one; ``False``: start afresh (an existing run is an error
            unless ``overwrite``).
        overwrite: start afresh, replacing a run in ``run_dir``.
        max_steps: stop (resumably) after this many steps of this call.
        progress: show progress bars.

    Raises:
        ValueError: unknown variant, profile or setting; a fresh run without a variant.
        CheckpointError: the run in ``run_dir`` was configured differently or is unreadable.
    """
    if variant is not None:
        get_variant(variant)  # a wrong name stops here, before any data is read
    if profile is not None:
        get_profile(profile)
    run_dir = Path(run_dir)
    resuming = not overwrite and (
        resume is True or (resume == "auto" and (run_dir / LAST_CHECKPOINT).is_file())
    )
    if variant is None and not resuming:
        raise ValueError("a fresh run needs a variant (e.g. se-multi)")
    store = _store(store)
    if resuming and variant is None and profile is None:
        config = apply_overrides(saved_run_config(run_dir), overrides or {})
    else:
        if variant is None:
            variant = saved_run_config(run_dir).variant
        config = resolve_config(
            variant,
            profile or "paper",
            overrides,
            num_tags=len(store.tags),
            segment_length=store.segment_length,
        )
    result = train(
        store,
        run_dir,
        config,
        resume=resuming,
        overwrite=overwrite,
        max_steps=max_steps,
        progress=progress,
    )
    return Fit(result)


def evaluate(
    source: str | os.PathLike,
    store: StoreLike,
    *,
    split: str = "test",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    clips_per_batch: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a trained model on a split, the paper's way, and write its metrics file.

    Args:
        source: a run directory (its ``best.pt``) or a checkpoint file.
        store: the segment store or its directory.
        split: ``"test"`` (the paper's numbers), ``"valid"`` or ``"train"``.
        out: the folder for ``metrics.json`` and ``predictions.npz`` (``metrics_<split>.json``
            and ``predictions_<split>.npz`` for other splits); default: the run directory, or
            the checkpoint's folder.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Returns:
        :func:`~resemul_core.analysis.evaluate.evaluate_checkpoint`'s result, plus
        ``metrics_path``.
    """
    from resemul_core.analysis.evaluate import evaluate_checkpoint

    folder = Path(out) if out is not None else resolve_checkpoint(source).parent
    result = evaluate_checkpoint(
        source,
        _store(store),
        split=split,
        device=device,
        clips_per_batch=clips_per_batch,
        num_workers=num_workers,
        progress=progress,
        predictions_dir=folder,
    )
    path = write_metrics(result, folder)
    return {**result, "metrics_path": str(path)}


def evaluate_all(
    runs: str | os.PathLike,
    store: StoreLike,
    *,
    variants: Iterable[str] | str | None = None,
    split: str = "test",
    device: str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` every run under ``runs`` (one directory per variant, as ``make book``
    writes them), in the registry's order.

    Args:
        runs: the folder holding ``runs/se-multi``, ``runs/basic``, ...
        variants: which ones (names, or one space- or comma-separated string); default: every
            variant with a run there.

    Returns:
        ``{variant: result}``.
    """
    store = _store(store)
    return {
        variant: evaluate(run_dir, store, split=split, device=device, progress=progress)
        for variant, run_dir in find_runs(runs, variants).items()
    }


@dataclass(frozen=True)
class RunComparison:
    """What :func:`compare_runs` returns: the paper's table and comparisons with intervals.

    Attributes:
        results: ``{seed_name: {variant: evaluate()'s result}}``; one seed named ``""`` when
            the runs folder holds no ``seed<N>`` folders.
        tags: the tag names; labels: ``(K, T)`` test labels; scores: ``{variant: (S, K, T)}``.
        scores_table: :func:`~resemul_core.analysis.comparison.score_table`.
        differences: :func:`~resemul_core.analysis.comparison.difference_table` (ROC-AUC).
        times: :func:`~resemul_core.training.run_dir.training_times` of every run, with a
            ``seed`` column.
        claims: :func:`~resemul_core.analysis.claims.evaluation_claims`.
    """

    results: dict[str, dict[str, dict[str, Any]]]
    tags: list[str]
    labels: Any
    scores: dict[str, Any]
    scores_table: Any
    differences: Any
    times: Any
    claims: Any

    @property
    def seeds(self) -> list[str]:
        """The seed folders compared (``[""]`` for a single set of runs)."""
        return list(self.results)


def compare_runs(
    runs: str | os.PathLike,
    store: StoreLike,
    *,
    variants: Iterable[str] | str | None = None,
    split: str = "test",
    device: str = "auto",
    num_resamples: int = 2000,
    progress: bool = True,
) -> RunComparison:
    """Evaluate every run under ``runs`` (every seed) and compare them the paper's way.

    Each run is scored by :func:`evaluate` (writing its ``metrics.json`` and
    ``predictions.npz``); the predictions are then resampled for intervals
    (:mod:`resemul_core.analysis.comparison`) and the paper's claims are given verdicts
    (:mod:`resemul_core.analysis.claims`).

    Args:
        runs: a folder with one run per variant, or ``seed<N>`` folders of such runs
            (``make book SEEDS="0 1 2"``).
        variants: which variants (default: every one trained for every seed).
        num_resamples: bootstrap resamples of the test clips.
    """
    from resemul_core.analysis.comparison import compare_variants, stack_predictions
    from resemul_core.training.run_dir import (
        find_runs_by_seed,
        read_predictions,
        time_ratio,
        training_times,
    )

    store = _store(store)
    groups = find_runs_by_seed(runs, variants)
    results = {
        seed: {
            variant: evaluate(run_dir, store, split=split, device=device, progress=progress)
            for variant, run_dir in group.items()
        }
        for seed, group in groups.items()
    }
    labels, tags, scores = stack_predictions(
        {
            seed: {v: read_predictions(run_dir, split) for v, run_dir in group.items()}
            for seed, group in groups.items()
        }
    )
    times = pd.concat(
        [training_times(group).assign(seed=seed) for seed, group in groups.items()],
        ignore_index=True,
    )
    try:
        ratio = time_ratio(times)
    except ValueError:  # no SE or no ReSE-2 run
        ratio = None
    tables = compare_variants(labels, scores, time_ratio=ratio, num_resamples=num_resamples)
    return RunComparison(
        results=results, tags=tags, labels=labels, scores=scores, times=times, **tables
    )


@dataclass(frozen=True)
class ExcitationAnalysis:
    """What :func:`analyse_excitations` returns and wrote.

    Attributes:
        excitations: the :class:`~resemul_core.analysis.excitations.ExcitationSet`.
        summary: :func:`~resemul_core.analysis.excitation_stats.summarize_excitations`'s dict
            (also ``OUT/summary.json``).
        figures: the figures by name (also ``OUT/<name>.png``).
        out: the output folder, holding ``excitations.npz`` too.
    """

    excitations: Any
    summary: dict[str, Any]
    figures: dict[str, Figure]
    out: Path


def analyse_excitations(
    source: str | os.PathLike,
    store: StoreLike,
    *,
    out: str | os.PathLike | None = None,
    split: str = "test",
    device: str = "auto",
    loudness: str = "rms",
    segment_levels: str = "first",
    batch_size: int = 64,
    tags: Iterable[str] | None = None,
    num_resamples: int = 2000,
    progress: bool = True,
) -> ExcitationAnalysis:
    """The paper's excitation analysis (specification §5) of a trained SE-bearing model.

    Extracts the SE gates over a split, saves them (``OUT/excitations.npz``), summarises them
    (``OUT/summary.json``: spread across tags per level, first-level loudness regressions) and
    draws the figures (``OUT/*.png``).

    Args:
        source: a run directory or checkpoint of a variant with SE blocks.
        store: the segment store or its directory.
        out: output folder; default ``RUN_DIR/excitations`` (next to the checkpoint).
        split: the split to analyse (the paper: test).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        loudness: per-segment loudness, ``"rms"`` (amplitude) or ``"db"`` (dBFS).
        segment_levels: SE levels whose per-segment gates are kept: ``"first"`` or ``"all"``.
        batch_size: segments per forward pass.
        tags: tags for the per-level figure (default: chosen from the data).
        num_resamples: bootstrap resamples of the clips for the intervals of the summary.

    Raises:
        ValueError: the model has no SE blocks (the message names the variants that do).
    """
    from resemul_core.analysis.excitation_stats import summarize_excitations
    from resemul_core.analysis.excitations import (
        extract_excitations,
        require_se,
        save_excitations,
    )
    from resemul_core.analysis.plots import excitation_figures
    from resemul_core.runtime import select_device
    from resemul_core.training.run_dir import load_model

    checkpoint = resolve_checkpoint(source)
    model, _ = load_model(checkpoint)
    require_se(model.config)  # before the store is read
    store = _store(store)
    folder = Path(out) if out is not None else checkpoint.parent / "excitations"
    excitations = extract_excitations(
        model,
        store,
        split=split,
        batch_size=batch_size,
        device=select_device(device),
        segment_levels=segment_levels,
        progress=progress,
    )
    save_excitations(folder / "excitations.npz", excitations)
    summary = summarize_excitations(excitations, loudness=loudness, num_resamples=num_resamples)
    summary["checkpoint"] = str(checkpoint)
    summary["store"] = str(store.path)
    write_json(folder / "summary.json", summary)
    figures = excitation_figures(
        excitations,
        summary=summary,  # draws the regressions the summary fitted, no second fit
        show_tags=list(tags) if tags is not None else None,
        out_dir=folder,
    )
    return ExcitationAnalysis(excitations, summary, figures, folder)
