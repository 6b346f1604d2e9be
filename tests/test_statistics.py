"""Bootstrap and seed intervals (resemul_core.analysis.statistics) against hand-computed values
and against scikit-learn on explicitly resampled data."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from resemul_core.analysis.excitation_stats import std_across_tags, tag_means
from resemul_core.analysis.statistics import (
    Interval,
    bootstrap_weights,
    macro_scores,
    paired_difference,
    score_interval,
    seed_interval,
    weighted_average_precision,
    weighted_roc_auc,
    weighted_std_across_tags,
)

Y = np.array([[1], [0], [1], [0]])
S = np.array([[0.9], [0.1], [0.4], [0.6]])


def test_roc_auc_by_hand():
    # pairs (pos, neg): (.9,.1) (.9,.6) (.4,.1) right, (.4,.6) wrong -> 3/4
    assert weighted_roc_auc(Y, S, np.ones(4))[0, 0] == pytest.approx(0.75)
    # the first positive counted twice: 2*2 + 1 right of 3*2 weighted pairs -> 5/6
    assert weighted_roc_auc(Y, S, [2, 1, 1, 1])[0, 0] == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts one half
    assert weighted_roc_auc([[1], [0]], [[0.5], [0.5]], [1, 1])[0, 0] == 0.5


def test_average_precision_by_hand():
    # ranked .9(+) .6(-) .4(+) .1(-): recall 1/2 at precision 1, 2/2 at precision 2/3
    assert weighted_average_precision(Y, S, np.ones(4))[0, 0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # the negative .6 counted three times: precision at the second positive is 2/5
    assert weighted_average_precision(Y, S, [1, 1, 1, 3])[0, 0] == pytest.approx(0.5 + 0.5 * 2 / 5)


def test_undefined_tags_are_nan_and_left_out_of_the_macro_mean():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.8, 0.1], [0.3, 0.2], [0.6, 0.3]])
    per_tag = weighted_roc_auc(y, s, np.ones(3))
    assert per_tag[0, 0] == 1.0 and math.isnan(per_tag[0, 1])
    assert macro_scores(y, s, np.ones((1, 3)))[0] == 1.0
    # a resample without the negative clip leaves tag 0 undefined too
    assert math.isnan(weighted_roc_auc(y, s, [2, 0, 1])[0, 0])


def test_weights_equal_scikit_learn_on_the_duplicated_data():
    rng = np.random.default_rng(1)
    k, t = 40, 5
    y = (rng.random((k, t)) < 0.35).astype(int)
    y[0], y[1] = 1, 0  # every tag has a positive and a negative
    s = np.round(rng.random((k, t)), 1)  # one decimal: many ties
    weights = bootstrap_weights(k, 30, seed=3)
    roc, ap = weighted_roc_auc(y, s, weights), weighted_average_precision(y, s, weights)
    for r, w in enumerate(weights):
        rows = np.repeat(np.arange(k), w)
        for j in range(t):
            yy, ss = y[rows, j], s[rows, j]
            if 0 < yy.sum() < len(yy):
                assert roc[r, j] == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)
                assert ap[r, j] == pytest.approx(average_precision_score(yy, ss), abs=1e-12)
            else:
                assert math.isnan(roc[r, j]) and math.isnan(ap[r, j])


def test_bootstrap_weights_are_resamples_and_reproducible():
    w = bootstrap_weights(7, 50, seed=0)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all() and (w >= 0).all()
    assert (w == bootstrap_weights(7, 50, seed=0)).all()
    assert (w != bootstrap_weights(7, 50, seed=1)).any()
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_weights(0)


def test_score_interval_brackets_the_estimate_and_narrows_with_more_clips():
    rng = np.random.default_rng(0)

    def data(k):
        y = (rng.random((k, 3)) < 0.4).astype(int)
        return y, y * 0.3 + rng.random((k, 3))  # informative but noisy scores

    y, s = data(60)
    small = score_interval(y, s, num_resamples=500)
    assert small.source == "clips" and small.level == 0.95
    assert small.low < small.estimate < small.high
    assert small.estimate == pytest.approx(
        np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)])
    )
    y, s = data(600)
    large = score_interval(y, s, num_resamples=500)
    assert large.high - large.low < 0.6 * (small.high - small.low)  # ~1/sqrt(10)


def test_paired_difference():
    rng = np.random.default_rng(2)
    y = (rng.random((200, 4)) < 0.3).astype(int)
    noise = rng.random((200, 4))
    same = paired_difference(y, noise, noise, num_resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_difference(y, y + noise, noise, num_resamples=500)
    assert better.sign == 1 and better.estimate > 0.3
    assert paired_difference(y, noise, y + noise, num_resamples=500).sign == -1
    # seeds: (S, K, T) scores are averaged over their models, resample by resample
    two_seeds = np.stack([y + noise, noise])
    mixed = paired_difference(y, two_seeds, noise, num_resamples=200)
    half = (
        macro_scores(y, y + noise, np.ones((1, 200)))[0] / 2
        + macro_scores(y, noise, np.ones((1, 200)))[0] / 2
    )
    assert mixed.estimate == pytest.approx(half - macro_scores(y, noise, np.ones((1, 200)))[0])


def test_seed_interval_by_hand():
    iv = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert (iv.estimate, iv.source) == (2.0, "seeds")
    assert iv.low == pytest.approx(2 - half) and iv.high == pytest.approx(2 + half)
    one = seed_interval([0.8])
    assert one.estimate == 0.8 and math.isnan(one.low) and one.sign == 0
    assert str(one) == "0.8000"


def test_interval_sign_and_dict():
    assert Interval(0.1, 0.05, 0.2, 0.95, "clips").sign == 1
    assert Interval(-0.1, -0.2, -0.01, 0.95, "clips").sign == -1
    assert Interval(0.1, -0.05, 0.2, 0.95, "clips").sign == 0
    assert Interval(0.5, math.nan, math.nan, 0.95, "seeds").to_dict()["low"] is None


def test_weighted_std_across_tags_matches_the_unweighted_analysis():
    rng = np.random.default_rng(4)
    x = rng.random((30, 6))
    y = (rng.random((30, 4)) < 0.5).astype(int)
    y[0] = 1
    unit = weighted_std_across_tags(x, y, np.ones((1, 30)))[0]
    assert unit == pytest.approx(std_across_tags(tag_means(x, y)))
    w = bootstrap_weights(30, 5, seed=0)
    rows = np.repeat(np.arange(30), w[2])
    assert weighted_std_across_tags(x, y, w)[2] == pytest.approx(
        std_across_tags(tag_means(x[rows], y[rows]))
    )


def test_std_profile_intervals_are_basic_bootstrap_intervals():
    from resemul_core.analysis.statistics import middle_levels, std_profile_intervals

    assert middle_levels(range(1, 10)) == [3, 4, 5, 6, 7]
    assert middle_levels([1, 2, 3]) == [2]
    with pytest.raises(ValueError, match="at least 3 SE levels"):
        middle_levels([1, 2])
    rng = np.random.default_rng(5)
    y = (rng.random((50, 3)) < 0.4).astype(int)
    y[0] = 1
    clips = [rng.random((50, 4)) for _ in range(3)]
    out = std_profile_intervals(clips, y, [1, 2, 3], num_resamples=400, seed=7)
    draws = weighted_std_across_tags(clips[0], y, bootstrap_weights(50, 400, seed=7))
    estimate = std_across_tags(tag_means(clips[0], y))
    q_low, q_high = np.percentile(draws, [2.5, 97.5])
    first = out["levels"][1]
    assert first.estimate == pytest.approx(estimate)
    # reflected around the estimate: resampling inflates the std, the interval undoes it
    assert (first.low, first.high) == pytest.approx((2 * estimate - q_high, 2 * estimate - q_low))
    assert np.median(draws) > estimate  # the upward shift the reflection corrects
    assert out["middle"] == [2]
    contrast = out["first_minus_middle"]
    assert contrast.estimate == pytest.approx(estimate - out["levels"][2].estimate)
