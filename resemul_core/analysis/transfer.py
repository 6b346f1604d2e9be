"""Embeddings for transfer learning: a store's clips as feature vectors, and a linear probe.

Public: :func:`clip_embeddings`, :func:`linear_probe`, :func:`probe_display`.

A trained network's pooled block outputs (its *embeddings*,
:meth:`~resemul_core.interfaces.tagger.Tagger.embed`) summarise what it has learnt to hear;
a linear classifier on them is the standard test of how much of a tagging task they carry.
:func:`linear_probe` fits one logistic regression per tag (scikit-learn) on one split's clip
embeddings and scores it on another's, with the bootstrap interval over test clips of
:func:`~resemul_core.analysis.statistics.score_interval`, beside the network's own head on
the same clips.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from resemul_core.analysis.statistics import paired_difference, score_interval
from resemul_core.data.store import SegmentStore

__all__ = ["PAIRED_DIFFERENCE", "clip_embeddings", "linear_probe", "probe_display"]

#: The row of :func:`linear_probe`'s table that holds probe - head, paired over test clips.
PAIRED_DIFFERENCE = "probe - head (paired over clips)"


def clip_embeddings(
    tagger, store: SegmentStore, split: str, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every clip of a split as one embedding (the mean of its segments'), with its labels.

    The clips' stored segments are used as they are (no decoding), all of them.

    Args:
        tagger: a :class:`~resemul_core.interfaces.tagger.Tagger` (its model and
            ``embedding_blocks`` decide the embedding).
        store: the segment store.
        split: "train", "valid" or "test".

    Returns:
        ``(embeddings (K, F) float32, labels (K, T) uint8, head (K, T) float32)``: ``head`` is
        the network's own clip-level prediction (mean of segment probabilities).
    """
    indices = store.split_indices(split)
    if len(indices) == 0:
        raise ValueError(f"store {store.path} has no clips in its {split!r} split")
    vectors, heads = [], []
    for i in tqdm(indices, desc=f"embed {split}", leave=False, disable=not progress):
        segments = store.read_clip(int(i))  # n, L float32
        result = tagger.analyse(segments.reshape(-1), segments="whole", embeddings=True)
        vectors.append(result.embedding())
        heads.append(result.clip_probabilities)
    return np.stack(vectors), store.labels[indices].astype(np.uint8), np.stack(heads)


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    head: np.ndarray | None = None,
    regularisation: float = 1.0,
    num_resamples: int = 2000,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Fit one logistic regression per tag on embeddings and score it on test clips.

    Args:
        train: ``(embeddings (K, F), labels (K, T))`` to fit on.
        test: the same for scoring.
        head: ``(K_test, T)`` the network's own predictions on the test clips, for comparison.
        regularisation: scikit-learn's ``C`` (inverse strength of the L2 penalty).
        num_resamples: bootstrap resamples of the test clips for the intervals.

    Returns:
        ``(table, scores)``: the table has one row per predictor ("linear probe on
        embeddings", and "the network's head" if ``head`` is given) with the macro ROC-AUC and
        PR-AUC over tags and their 95 % intervals over test clips, and with ``head`` a row
        :data:`PAIRED_DIFFERENCE`: probe minus head, its interval from the same resampled
        clips for both (:func:`~resemul_core.analysis.statistics.paired_difference`).
        ``scores`` is the probe's ``(K_test, T)`` probabilities. A tag with one class only in
        the training clips gets the training rate as its score (it cannot be fitted).
    """
    (x_train, y_train), (x_test, y_test) = train, test
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"embeddings of {x_train.shape[1]} and {x_test.shape[1]} values")
    scores = np.empty(y_test.shape, dtype=np.float64)
    for t in range(y_train.shape[1]):
        if y_train[:, t].min() == y_train[:, t].max():
            scores[:, t] = y_train[:, t].mean()
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularisation, max_iter=2000))
        probe.fit(x_train, y_train[:, t])
        scores[:, t] = probe.predict_proba(x_test)[:, 1]
    predictors = {"linear probe on embeddings": scores}
    if head is not None:
        predictors["the network's head"] = np.asarray(head, dtype=np.float64)
    rows = []
    for name, values in predictors.items():
        row: dict = {"predictor": name}
        for metric in ("roc_auc", "pr_auc"):
            interval = score_interval(y_test, values, metric, num_resamples=num_resamples)
            row.update(
                {
                    metric: interval.estimate,
                    f"{metric}_low": interval.low,
                    f"{metric}_high": interval.high,
                }
            )
        rows.append(row)
    if head is not None:  # the same resampled clips for both: a paired interval
        row = {"predictor": PAIRED_DIFFERENCE}
        for metric in ("roc_auc", "pr_auc"):
            interval = paired_difference(
                y_test,
                scores,
                predictors["the network's head"],
                metric,
                num_resamples=num_resamples,
            )
            row.update(
                {
                    metric: interval.estimate,
                    f"{metric}_low": interval.low,
                    f"{metric}_high": interval.high,
                }
            )
        rows.append(row)
    return pd.DataFrame(rows).set_index("predictor"), scores.astype(np.float32)


def probe_display(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`linear_probe`'s table as the book prints it: each score with its interval."""

    def span(row: pd.Series, metric: str) -> str:
        return (
            f"{row[metric]:.{digits}f} [{row[f'{metric}_low']:.{digits}f}, "
            f"{row[f'{metric}_high']:.{digits}f}]"
        )

    return pd.DataFrame(
        {
            "ROC-AUC [95 % clips]": table.apply(span, axis=1, metric="roc_auc"),
            "PR-AUC [95 % clips]": table.apply(span, axis=1, metric="pr_auc"),
        }
    )
