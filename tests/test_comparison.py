"""The evaluation chapter's comparisons: runs trained and evaluated through the pipeline, seed
folders, paired intervals, and the claims table's verdict rules."""

import math

import numpy as np
import pandas as pd
import pytest

from resemul_core.analysis.claims import VERDICTS, evaluation_claims, excitation_claims
from resemul_core.analysis.comparison import (
    PAPER_COMPARISONS,
    difference_table,
    stack_predictions,
)
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces import pipeline
from resemul_core.training.run_dir import find_runs_by_seed, read_predictions

LENGTH = 3**5  # 4 blocks: seconds per run
QUICK = {"num_stages": 1, "max_epochs_per_stage": 1, "max_steps_per_epoch": 3, "device": "cpu"}
VARIANTS = ("basic", "basic-multi", "se", "se-multi")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 40
    labels = (rng.random((n, 3)) < 0.5).astype(np.uint8)
    labels[-8], labels[-7] = 1, 0  # every tag has a positive and a negative test clip
    out = tmp_path_factory.mktemp("compare") / "store"
    write_store_from_arrays(
        out,
        waveforms=[0.1 * rng.standard_normal((2, LENGTH)).astype(np.float32) for _ in range(n)],
        labels=labels,
        splits=["train"] * 24 + ["valid"] * 8 + ["test"] * 8,
        tags=["a", "b", "c"],
    )
    return out


@pytest.fixture(scope="module")
def seed_runs(store_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        for variant in VARIANTS:
            pipeline.fit(
                store_dir,
                runs / f"seed{seed}" / variant,
                variant=variant,
                profile="tiny",
                overrides={**QUICK, "seed": seed},
                progress=False,
            )
    return runs


def test_compare_runs_over_two_seeds(store_dir, seed_runs):
    comparison = pipeline.compare_runs(
        seed_runs, store_dir, device="cpu", num_resamples=200, progress=False
    )
    assert comparison.seeds == ["seed0", "seed1"]
    assert list(comparison.scores) == list(VARIANTS)
    assert comparison.labels.shape == (8, 3) and comparison.scores["se"].shape == (2, 8, 3)
    # every run wrote its predictions, and they are what its metrics were computed from
    for seed in comparison.seeds:
        for variant in VARIANTS:
            saved = read_predictions(seed_runs / seed / variant)
            result = comparison.results[seed][variant]
            assert saved["scores"].shape == (8, 3)
            assert result["num_clips"] == 8
    table = comparison.scores_table.set_index("variant")
    assert (table["seeds"] == 2).all()
    # the point estimate is the mean over the seeds' scores
    for variant in VARIANTS:
        per_seed = [comparison.results[s][variant]["roc_auc"] for s in comparison.seeds]
        assert table.loc[variant, "roc_auc"] == pytest.approx(np.mean(per_seed))
        assert table.loc[variant, "roc_auc_seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert table.loc[variant, "roc_auc_low"] <= table.loc[variant, "roc_auc_high"]
    names = set(comparison.differences["comparison"])
    assert names == {"multi-level − single, Basic", "multi-level − single, SE", "SE − Basic",
                     "SE − Basic, multi-level"}  # fmt: skip
    assert comparison.differences["seed_low"].notna().all()
    assert set(comparison.claims["verdict"]) <= set(VERDICTS)
    assert comparison.times["seed"].tolist().count("seed1") == len(VARIANTS)


def test_seed_folders_must_hold_the_same_variants(store_dir, seed_runs, tmp_path):
    groups = find_runs_by_seed(seed_runs)
    assert list(groups) == ["seed0", "seed1"] and list(groups["seed0"]) == list(VARIANTS)
    assert list(find_runs_by_seed(seed_runs / "seed0")) == [""]  # a plain runs folder
    with pytest.raises(FileNotFoundError, match="no run for res1"):
        find_runs_by_seed(seed_runs, "basic res1")


def test_predictions_of_other_clips_do_not_pair():
    tags = np.array(["a", "b"])
    base = {
        "scores": np.zeros((3, 2)),
        "labels": np.eye(3, 2, dtype=np.uint8),
        "clip_index": np.arange(3),
        "tags": tags,
    }
    other = {**base, "clip_index": np.array([0, 1, 5])}
    with pytest.raises(ValueError, match="the runs of se and basic scored different clips"):
        stack_predictions({"": {"basic": base, "se": other}})
    with pytest.raises(ValueError, match="se has no predictions for seed1"):
        stack_predictions({"seed0": {"basic": base, "se": base}, "seed1": {"basic": base}})


def _differences(signs: dict[str, int]) -> pd.DataFrame:
    rows = [
        {"comparison": c.name, "a": c.a, "b": c.b, "difference": 0.01 * s, "low": -1.0,
         "high": 1.0, "seed_low": math.nan, "seed_high": math.nan, "paper": c.paper, "sign": s}
        for c in PAPER_COMPARISONS
        if (s := signs.get(c.b, 0)) is not None
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_multi_level_claims_follow_the_paper_direction():
    # paper: multi-level helps Basic (+0.0022) and hurts Res-1 (-0.0011)
    claims = evaluation_claims(_differences({"basic": 1, "res1": 1, "se": 0})).set_index("claim")
    assert claims.loc["multi-level aggregation helps Basic", "verdict"] == "reproduced"
    assert claims.loc["multi-level aggregation hurts Res-1", "verdict"] == "contradicted"
    assert (
        claims.loc["multi-level aggregation helps SE", "verdict"] == "not resolved at this budget"
    )
    assert len(claims) == 6  # one per block, nothing else without the other tables


def test_best_model_and_time_claims():
    ahead = pd.DataFrame({"other": ["a", "b"], "difference": [0.02, 0.01], "low": [0.01, 0.001],
                          "high": [0.03, 0.02], "sign": [1, 1]})  # fmt: skip
    tied = ahead.assign(sign=[1, 0])
    behind = ahead.assign(sign=[1, -1])
    empty = _differences({}).iloc[:0]
    for table, verdict in ((ahead, "reproduced"), (tied, "not resolved at this budget"),
                           (behind, "contradicted")):  # fmt: skip
        claims = evaluation_claims(empty, rese2_vs_all=table, se_vs_single=table)
        assert claims["verdict"].tolist() == [verdict, verdict]
    assert "closest: b +0.0100" in evaluation_claims(empty, rese2_vs_all=ahead)["evidence"][0]
    for ratio, verdict in ((1.7, "reproduced"), (2.0, "reproduced"), (2.13, "contradicted"),
                           (1.3, "contradicted")):  # fmt: skip
        assert evaluation_claims(empty, time_ratio=ratio)["verdict"].tolist() == [verdict]


def _summary(positive: int, negative: int, first: tuple, last: tuple, moved=0.1) -> dict:
    def iv(t):
        return {"estimate": t[0], "low": t[1], "high": t[2], "level": 0.95, "source": "clips"}

    return {
        "shape": {"middle_levels": [3, 4, 5, 6, 7], "first_minus_middle": iv(first),
                  "last_minus_middle": iv(last)},
        "gates": [{"level": lv, "mean_abs_from_half": moved} for lv in range(1, 10)],
        "loudness": {"positive": positive, "negative": negative, "average": {"slope": -0.1},
                     "level": 1},
    }  # fmt: skip


def test_excitation_claims():
    claims = excitation_claims(_summary(8, 0, (0.02, 0.01, 0.03), (-0.01, -0.02, -0.005)))
    assert claims["verdict"].tolist() == ["reproduced", "contradicted", "reproduced"]
    assert "p = 0.00781" in claims["evidence"][2]  # two-sided sign test, 8 of 8: 2 / 2**8
    claims = excitation_claims(_summary(5, 3, (0.01, -0.01, 0.03), (0.01, 0.0, 0.02)))
    assert claims["verdict"].tolist() == ["not resolved at this budget"] * 3
    assert excitation_claims(_summary(0, 8, (0, -1, 1), (0, -1, 1)))["verdict"][2] == "contradicted"
    # untrained gates (still at 0.5 within 0.01): resolved differences are not judged
    untrained = excitation_claims(
        _summary(8, 0, (0.02, 0.01, 0.03), (-0.01, -0.02, -0.005), moved=0.01)
    )
    assert untrained["verdict"].tolist() == ["not resolved at this budget"] * 3
    assert "gates not trained (mean |g − 0.5| < 0.05: level 1: 0.010" in untrained["evidence"][0]


def test_difference_table_pairs_the_same_resamples():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < 0.3).astype(int)
    good = (y + rng.random((300, 4)))[None]
    noise = rng.random((1, 300, 4))
    scores = {"basic": noise, "basic-multi": good, "se": noise}
    table = difference_table(y, scores, num_resamples=300).set_index("comparison")
    assert list(table.index) == ["multi-level − single, Basic", "SE − Basic"]
    assert table.loc["multi-level − single, Basic", "sign"] == 1
    # identical scores: the paired difference is exactly zero in every resample
    assert table.loc["SE − Basic", ["difference", "low", "high"]].tolist() == [0.0, 0.0, 0.0]
    assert table.loc["SE − Basic", "sign"] == 0
    assert math.isnan(table.loc["SE − Basic", "seed_low"])  # one seed: no seed interval


def test_resemul_compare_prints_the_chapter_tables(store_dir, seed_runs, capsys):
    from resemul_core.interfaces.cli import main

    args = ["compare", str(seed_runs), "--data", str(store_dir), "--variants", "se se-multi"]
    assert main([*args, "--resamples", "100", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 variants, seed0, seed1, 8 clips")
    assert "ROC-AUC ± sd over seeds" in out and "multi-level − single, SE" in out
    assert "multi-level aggregation helps SE" in out


def test_a_difference_is_resolved_only_when_every_seed_agrees():
    from resemul_core.analysis.comparison import resolved_sign
    from resemul_core.analysis.statistics import Interval

    above = Interval(0.02, 0.01, 0.03, 0.95, "clips")
    assert resolved_sign(above, np.array([0.03])) == 1  # one seed: the clip interval alone
    assert resolved_sign(above, np.array([0.03, 0.01])) == 1
    assert resolved_sign(above, np.array([0.05, -0.01])) == 0  # the sign changed with the seed
    below = Interval(-0.02, -0.03, -0.01, 0.95, "clips")
    assert resolved_sign(below, np.array([-0.01, -0.03])) == -1
    assert resolved_sign(Interval(0.02, -0.01, 0.05, 0.95, "clips"), np.array([0.02, 0.02])) == 0
