"""Tests of resemul_core.analysis.evaluate: metrics against hand-computed values, clip
averaging, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from resemul_core.analysis.evaluate import (
    PAPER_RESULTS,
    evaluate_checkpoint,
    predict_clips,
    results_table,
    tag_metrics,
)
from resemul_core.config import VARIANTS
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.cli import main as cli_main
from resemul_core.model.checkpoint import save_checkpoint
from resemul_core.model.sample_cnn import build_model
from resemul_core.training.run_dir import write_metrics

LENGTH = 3**5

# 4 clips x 4 tags; "none" has no positive clip. Hand-computed per tag:
#   a: pairs (pos, neg) 0.9>0.2, 0.9>0.6, 0.4>0.2, 0.4<0.6       -> ROC 3/4
#      ranking 0.9+ 0.6- 0.4+ 0.2-: AP = 0.5 * 1 + 0.5 * 2/3      -> PR 5/6
#   b: every positive above the single negative                   -> ROC 1, PR 1
#   d: tie 0.5/0.5 counts 1/2, 0.5>0.1, 0.3<0.5, 0.3>0.1          -> ROC 2.5/4
#      thresholds 0.5 (P 1/2, R 1/2), 0.3 (P 2/3, R 1)            -> PR 0.25 + 1/3
Y_TRUE = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]])
Y_SCORE = np.array(
    [[0.9, 0.1, 0.3, 0.5], [0.2, 0.3, 0.1, 0.5], [0.4, 0.2, 0.2, 0.1], [0.6, 0.8, 0.4, 0.3]]
)
TAGS = ["a", "b", "none", "d"]


def test_tag_metrics_match_hand_computed_values():
    metrics = tag_metrics(Y_TRUE, Y_SCORE, TAGS)
    per_tag = metrics.per_tag.set_index("tag")
    assert per_tag.loc["a", "roc_auc"] == pytest.approx(0.75)
    assert per_tag.loc["a", "pr_auc"] == pytest.approx(5 / 6)
    assert per_tag.loc["b", ["roc_auc", "pr_auc"]].tolist() == pytest.approx([1.0, 1.0])
    assert per_tag.loc["d", "roc_auc"] == pytest.approx(0.625)
    assert per_tag.loc["d", "pr_auc"] == pytest.approx(0.25 + 1 / 3)
    assert math.isnan(per_tag.loc["none", "roc_auc"]) and per_tag.loc["none", "positives"] == 0
    assert metrics.excluded == ["none"] and metrics.num_clips == 4
    assert metrics.roc_auc == pytest.approx((0.75 + 1.0 + 0.625) / 3)
    assert metrics.pr_auc == pytest.approx((5 / 6 + 1.0 + 0.25 + 1 / 3) / 3)
    kept = [0, 1, 3]
    expected = roc_auc_score(Y_TRUE[:, kept], Y_SCORE[:, kept], average="macro")
    assert metrics.roc_auc == pytest.approx(expected)


def test_tag_metrics_json_and_errors():
    data = json.loads(json.dumps(tag_metrics(Y_TRUE, Y_SCORE, TAGS).to_dict()))
    assert data["per_tag"]["none"] == {"roc_auc": None, "pr_auc": None, "positives": 0}
    assert data["num_tags_scored"] == 3 and data["excluded_tags"] == ["none"]
    all_positive = tag_metrics(np.ones((3, 1)), np.zeros((3, 1)), ["x"])
    assert all_positive.excluded == ["x"] and math.isnan(all_positive.roc_auc)
    with pytest.raises(ValueError, match="shape"):
        tag_metrics(Y_TRUE, Y_SCORE[:, :3], TAGS)
    with pytest.raises(ValueError, match="0/1"):
        tag_metrics(Y_TRUE * 2, Y_SCORE, TAGS)


class _MeanModel(nn.Module):
    """Logit of tag k = (k + 1) * mean of the segment: predictable clip averages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * torch.tensor([[1.0, 2.0]])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    counts = [3, 1, 2, 3, 2, 1]  # clips hold different numbers of segments
    waveforms = [rng.uniform(-0.5, 0.5, (n, LENGTH)).astype(np.float32) for n in counts]
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]])
    splits = ["train", "valid", "test", "test", "test", "test"]
    return write_store_from_arrays(
        tmp_path_factory.mktemp("data") / "store",
        waveforms=waveforms,
        labels=labels,
        splits=splits,
        tags=["x", "y"],
    )


def test_predict_clips_averages_segment_probabilities(store):
    scores, labels, clips = predict_clips(
        _MeanModel(), store, split="test", clips_per_batch=3, progress=False
    )
    assert clips.tolist() == [2, 3, 4, 5]
    assert labels.tolist() == [[1, 1], [0, 0], [1, 0], [0, 1]]
    for row, clip in zip(scores, clips, strict=True):
        segments = torch.from_numpy(store.read_clip(int(clip)))
        means = segments.mean(dim=1, keepdim=True) * torch.tensor([[1.0, 2.0]])
        np.testing.assert_allclose(row, torch.sigmoid(means).mean(dim=0).numpy(), rtol=1e-6)


def test_evaluate_checkpoint_and_cli(store, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("se", num_tags=2, width=1 / 16, num_blocks=4)
    run = tmp_path / "run"
    save_checkpoint(run / "best.pt", model=model, tags=["x", "y"], stage=0, epoch=3)
    result = evaluate_checkpoint(run, store, device="cpu", progress=False)
    scores, labels, _ = predict_clips(model.eval(), store, progress=False)
    assert result["roc_auc"] == pytest.approx(tag_metrics(labels, scores, ["x", "y"]).roc_auc)
    assert result["variant"] == "se" and result["num_clips"] == 4 and result["epoch"] == 3
    assert write_metrics(result, tmp_path / "out").name == "metrics.json"

    assert (
        cli_main(
            [
                "evaluate",
                str(run),
                "--data",
                str(store.path),
                "--device",
                "cpu",
                "--no-progress",
                "--per-tag",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ROC-AUC" in out and "metrics.json" in out
    written = json.loads((run / "metrics.json").read_text())
    assert written["roc_auc"] == pytest.approx(result["roc_auc"])
    assert set(written["per_tag"]) == {"x", "y"} and written["split"] == "test"
    assert (
        cli_main(
            [
                "evaluate",
                str(run / "best.pt"),
                "--data",
                str(store.path),
                "--split",
                "valid",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (run / "metrics_valid.json").is_file()


def test_evaluate_refuses_other_tags(store, tmp_path):
    model = build_model("basic", num_tags=2, width=1 / 16, num_blocks=4)
    save_checkpoint(tmp_path / "m.pt", model=model, tags=["p", "q"])
    with pytest.raises(ValueError, match="other tags"):
        evaluate_checkpoint(tmp_path / "m.pt", store, device="cpu", progress=False)
    wrong_length = build_model("basic", num_tags=2, width=1 / 16, num_blocks=5)
    save_checkpoint(tmp_path / "w.pt", model=wrong_length, tags=["x", "y"])
    with pytest.raises(ValueError, match="729-sample"):
        evaluate_checkpoint(tmp_path / "w.pt", store, device="cpu", progress=False)


def test_results_table_sets_ours_beside_the_paper(tmp_path):
    run = tmp_path / "rese2-run"
    run.mkdir()
    (run / "metrics.json").write_text(
        json.dumps({"variant": "rese2-multi", "roc_auc": 0.9, "pr_auc": 0.4})
    )
    table = results_table([run, {"variant": "basic", "roc_auc": 0.91, "pr_auc": 0.45}])
    assert table["variant"].tolist() == ["basic", "rese2-multi"]  # the paper's order
    assert table["paper_roc_auc"].tolist() == [0.9055, 0.9113]
    assert table["difference"].tolist() == pytest.approx([0.91 - 0.9055, 0.9 - 0.9113])
    msd = results_table([run], dataset="msd")
    assert msd["paper_roc_auc"].tolist() == [0.8847]
    with pytest.raises(FileNotFoundError, match="resemul evaluate"):
        results_table([tmp_path])


def test_paper_results_cover_every_variant():
    assert set(PAPER_RESULTS) == set(VARIANTS)
    assert PAPER_RESULTS["se-multi"] == {"mtat": 0.9111, "msd": 0.8840}
    assert all(0.9 < r["mtat"] < 0.92 for r in PAPER_RESULTS.values())
