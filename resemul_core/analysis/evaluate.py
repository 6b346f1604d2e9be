"""Clip-level evaluation: averaged segment predictions, macro ROC-AUC and PR-AUC.

Specification §3 (test protocol) and §4 (the paper's numbers).

Public: :func:`tag_metrics`, :class:`TagMetrics`, :func:`predict_clips`,
:func:`evaluate_checkpoint`,
:func:`results_table`, :data:`PAPER_RESULTS`, :data:`PRIOR_WORK_RESULTS`.

The test protocol (specification §3): a clip's prediction is the mean of the sigmoid outputs
of its segments (10 for MTAT), and the score is scikit-learn's macro ROC-AUC over the tags.
:func:`tag_metrics` is a pure function of arrays; the rest runs a model over a store.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

from resemul_core.config import VARIANTS
from resemul_core.data.datasets import ClipDataset
from resemul_core.data.store import SegmentStore, open_store
from resemul_core.model.checkpoint import load_checkpoint
from resemul_core.model.inference import clip_average, run_model
from resemul_core.runtime import select_device
from resemul_core.training.run_dir import read_metrics, resolve_checkpoint, write_predictions

__all__ = [
    "PAPER_RESULTS",
    "PRIOR_WORK_RESULTS",
    "TagMetrics",
    "evaluate_checkpoint",
    "per_tag_frame",
    "predict_clips",
    "results_table",
    "tag_metrics",
]

logger = logging.getLogger(__name__)

#: ROC-AUC reported for each variant (official poster, specification §4.1 MTAT test set; §4.2 MSD,
#: reported for the two best multi-level models and for the Basic block = SampleCNN only).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "basic": {
        "mtat": 0.9055,
        "msd": 0.8812,
    },  # SMC'17 SampleCNN = Basic, no multi (specification §2.1)
    "basic-multi": {"mtat": 0.9077},
    "se": {"mtat": 0.9083},
    "se-multi": {"mtat": 0.9111, "msd": 0.8840},
    "res1": {"mtat": 0.9048},
    "res1-multi": {"mtat": 0.9037},
    "res2": {"mtat": 0.9061},
    "res2-multi": {"mtat": 0.9098},
    "rese1": {"mtat": 0.9066},
    "rese1-multi": {"mtat": 0.9053},
    "rese2": {"mtat": 0.9102},
    "rese2-multi": {"mtat": 0.9113, "msd": 0.8847},
}

#: ROC-AUC of the earlier models the paper compares with (specification §4.2).
PRIOR_WORK_RESULTS: dict[str, dict[str, float]] = {
    "Lee & Nam 2017, multi-level multi-scale (ICML-W)": {"mtat": 0.9064, "msd": 0.8842},
    "Lee & Nam 2017, multi-level multi-scale pretrained (SPL)": {"mtat": 0.9017, "msd": 0.8878},
}


@dataclass(frozen=True)
class TagMetrics:
    """Clip-level tagging scores.

    Attributes:
        roc_auc: macro ROC-AUC, the mean over the scored tags (the paper's number).
        pr_auc: macro PR-AUC over the same tags, as scikit-learn's average precision (the
            step-wise sum, not a trapezoid); the paper reports ROC-AUC only.
        per_tag: one row per tag: ``tag``, ``positives``, ``negatives``, ``roc_auc``,
            ``pr_auc`` (NaN for excluded tags).
        excluded: tags left out of the means because the clips hold no positive or no negative.
        num_clips: number of clips scored.
    """

    roc_auc: float
    pr_auc: float
    per_tag: pd.DataFrame
    excluded: list[str]
    num_clips: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; per-tag values keyed by tag, NaN written as ``None``."""

        def number(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "roc_auc": number(self.roc_auc),
            "pr_auc": number(self.pr_auc),
            "num_clips": self.num_clips,
            "num_tags_scored": len(self.per_tag) - len(self.excluded),
            "excluded_tags": list(self.excluded),
            "per_tag": {
                row.tag: {
                    "roc_auc": number(row.roc_auc),
                    "pr_auc": number(row.pr_auc),
                    "positives": int(row.positives),
                }
                for row in self.per_tag.itertuples()
            },
        }


def tag_metrics(y_true: np.ndarray, y_score: np.ndarray, tags: Sequence[str]) -> TagMetrics:
    """Per-tag and macro ROC-AUC and PR-AUC of clip-level scores.

    Args:
        y_true: ``(num_clips, num_tags)`` 0/1 labels.
        y_score: ``(num_clips, num_tags)`` scores (probabilities; any monotone score works).
        tags: ``num_tags`` names.

    Returns:
        :class:`TagMetrics`. A tag without a positive or without a negative clip has no
        ROC-AUC; it is listed in ``excluded`` and left out of both means. The macro ROC-AUC
        equals ``sklearn.metrics.roc_auc_score(y_true, y_score, average="macro")`` when no tag
        is excluded (where scikit-learn would raise instead).

    Raises:
        ValueError: shapes disagree, or labels are not 0/1.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape or y_true.shape[1] != len(tags):
        raise ValueError(
            f"expected y_true and y_score of shape (num_clips, {len(tags)}), found "
            f"{y_true.shape} and {y_score.shape}"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score holds NaN or infinite values")
    rows = []
    for k, tag in enumerate(tags):
        truth, score = y_true[:, k], y_score[:, k]
        positives = int(truth.sum())
        negatives = len(truth) - positives
        roc = pr = math.nan
        if positives and negatives:
            roc = float(roc_auc_score(truth, score))
            pr = float(average_precision_score(truth, score))
        rows.append(
            {
                "tag": tag,
                "positives": positives,
                "negatives": negatives,
                "roc_auc": roc,
                "pr_auc": pr,
            }
        )
    per_tag = pd.DataFrame(rows, columns=["tag", "positives", "negatives", "roc_auc", "pr_auc"])
    excluded = per_tag.loc[per_tag["roc_auc"].isna(), "tag"].tolist()
    if excluded:
        logger.warning(
            "%d tag(s) without a positive or a negative clip left out of the means: %s",
            len(excluded),
            ", ".join(excluded),
        )
    scored = per_tag.dropna(subset=["roc_auc"])
    return TagMetrics(
        roc_auc=float(scored["roc_auc"].mean()) if len(scored) else math.nan,
        pr_auc=float(scored["pr_auc"].mean()) if len(scored) else math.nan,
        per_tag=per_tag,
        excluded=excluded,
        num_clips=int(y_true.shape[0]),
    )


def _collate_clips(
    items: list[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the segments of several clips into one batch and remember the clip boundaries.

    ``(segments (n_i, L), labels (T,), clip)`` items -> ``(segments (sum(n_i), L),
    labels (clips, T), counts (clips,))``.
    """
    segments = torch.cat([s for s, _, _ in items])  # sum(n_seg), L
    labels = torch.stack([y for _, y, _ in items])  # clips, T
    counts = torch.tensor([s.shape[0] for s, _, _ in items])
    return segments, labels, counts


def predict_clips(
    model: nn.Module,
    store: SegmentStore | str | os.PathLike,
    *,
    split: str = "test",
    clips_per_batch: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip-level probabilities: the mean sigmoid output over each clip's segments.

    Args:
        model: a :class:`~resemul_core.model.sample_cnn.SampleCNN` (any module mapping ``(B, L)`` to
            ``(B, T)`` logits) on ``device``; run in eval mode by
            :func:`~resemul_core.model.inference.run_model`, its mode restored afterwards.
        store: a :class:`~resemul_core.data.store.SegmentStore` or its directory.
        split: 'train', 'valid' or 'test'.
        clips_per_batch: clips per forward pass (10 segments each for MTAT).
        device: where the model is: a ``torch.device`` or a name for
            :func:`~resemul_core.runtime.select_device` ("auto", "cpu", "cuda", ...).
        precision: "fp32" (the default: the paper's numbers are float32 ones), "tf32" or
            "bf16" (:mod:`resemul_core.runtime`).

    Returns:
        ``(scores, labels, clip_indices)``: ``(num_clips, T)`` float32 probabilities,
        ``(num_clips, T)`` uint8 labels and ``(num_clips,)`` store indices.
    """
    device = select_device(str(device))
    dataset = ClipDataset(store, split)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {dataset.store.path} holds no clips")
    loader = DataLoader(
        dataset,
        batch_size=clips_per_batch,
        collate_fn=_collate_clips,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    desc = f"evaluate {split}"
    outputs = run_model(
        model, loader, device=device, precision=precision, progress=progress, desc=desc
    )
    scores, labels = [], []
    for out in outputs:
        clip_labels, counts = out.extra
        probs = torch.sigmoid(out.logits).cpu()  # sum(n_seg), T
        scores.append(clip_average(probs, counts))  # clips, T
        labels.append(clip_labels)
    return (
        torch.cat(scores).numpy().astype(np.float32),
        torch.cat(labels).numpy().astype(np.uint8),
        dataset.clip_index.copy(),
    )


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    store: SegmentStore | str | os.PathLike,
    *,
    split: str = "test",
    device: str = "auto",
    clips_per_batch: int = 16,
    num_workers: int = 0,
    progress: bool = True,
    predictions_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score a trained model on a split of a store.

    Args:
        checkpoint: a checkpoint file or a run directory (its ``best.pt``).
        store: a :class:`~resemul_core.data.store.SegmentStore` or its directory.
        split: which split to score.
        device: "auto", "cpu", "cuda", ...
        predictions_dir: if given, the clip-level predictions are also written there
            (:func:`~resemul_core.training.run_dir.write_predictions`), for the intervals of
            :mod:`resemul_core.analysis.comparison`.

    Returns:
        A JSON-ready dict: ``checkpoint``, ``variant``, ``store``, ``store_fingerprint``,
        ``split``, ``num_clips``, macro ``roc_auc`` and ``pr_auc``, ``excluded_tags``,
        ``per_tag`` (see :meth:`TagMetrics.to_dict`), and the checkpoint's ``stage``,
        ``epoch`` and ``val_loss`` when it has them.

    Raises:
        ValueError: the store's tags or segment length differ from the model's.
    """
    store = store if isinstance(store, SegmentStore) else open_store(store)
    path = resolve_checkpoint(checkpoint)
    torch_device = select_device(device)
    model, payload = load_checkpoint(path, map_location=torch_device)
    if model.config.segment_length != store.segment_length:
        raise ValueError(
            f"{path} takes {model.config.segment_length}-sample segments, store {store.path} "
            f"holds {store.segment_length}"
        )
    tags = payload.get("tags")
    if tags is not None and list(tags) != list(store.tags):
        raise ValueError(f"{path} was trained on other tags than those of store {store.path}")
    if payload.get("store_fingerprint") not in (None, store.fingerprint):
        logger.warning("%s was trained on a different store than %s", path, store.path)
    store.verify_clips(store.split_indices(split))  # scores of damaged audio would mislead
    scores, labels, clip_index = predict_clips(
        model,
        store,
        split=split,
        clips_per_batch=clips_per_batch,
        device=torch_device,
        num_workers=num_workers,
        progress=progress,
    )
    metrics = tag_metrics(labels, scores, store.tags)
    if predictions_dir is not None:
        write_predictions(
            predictions_dir,
            split,
            scores=scores,
            labels=labels,
            clip_index=clip_index,
            tags=store.tags,
        )
    result = {
        "checkpoint": str(path),
        "variant": model.config.variant,
        "store": str(store.path),
        "store_fingerprint": store.fingerprint,
        "split": split,
        **{k: payload[k] for k in ("stage", "epoch", "val_loss") if k in payload},
        **metrics.to_dict(),
    }
    logger.info(
        "%s on %s/%s: ROC-AUC %.4f, PR-AUC %.4f over %d clips",
        path,
        store.path,
        split,
        metrics.roc_auc,
        metrics.pr_auc,
        metrics.num_clips,
    )
    return result


def results_table(
    runs: Iterable[str | os.PathLike | Mapping[str, Any]], *, dataset: str = "mtat"
) -> pd.DataFrame:
    """Our scores beside the paper's, one row per variant in the paper's order.

    Args:
        runs: run directories (their ``metrics.json``), metrics files, or result dicts from
            :func:`evaluate_checkpoint`.
        dataset: which column of :data:`PAPER_RESULTS` to compare with ("mtat" or "msd").

    Returns:
        Columns ``variant``, ``roc_auc``, ``pr_auc``, ``paper_roc_auc`` (NaN where the paper
        reports none) and ``difference`` (ours - paper).
    """
    rows = []
    for run in runs:
        metrics = read_metrics(run)
        variant = metrics["variant"]
        paper = PAPER_RESULTS.get(variant, {}).get(dataset, math.nan)
        roc = metrics["roc_auc"] if metrics["roc_auc"] is not None else math.nan
        pr = metrics["pr_auc"] if metrics["pr_auc"] is not None else math.nan
        rows.append(
            {
                "variant": variant,
                "roc_auc": roc,
                "pr_auc": pr,
                "paper_roc_auc": paper,
                "difference": roc - paper,
            }
        )
    order = {name: i for i, name in enumerate(VARIANTS)}
    table = pd.DataFrame(
        rows, columns=["variant", "roc_auc", "pr_auc", "paper_roc_auc", "difference"]
    )
    return table.sort_values("variant", key=lambda s: s.map(order), kind="stable").reset_index(
        drop=True
    )


def per_tag_frame(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per-tag scores of several evaluations as one long table.

    Returns:
        Columns ``variant``, ``tag``, ``roc_auc``, ``pr_auc``, ``positives``.
    """
    rows = [
        {"variant": variant, "tag": tag, **scores}
        for variant, result in results.items()
        for tag, scores in result["per_tag"].items()
    ]
    return pd.DataFrame(rows, columns=["variant", "tag", "roc_auc", "pr_auc", "positives"])
