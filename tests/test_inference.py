"""Tests of resemul_core.model.inference: the one forward loop and the one clip average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resemul_core.analysis.evaluate import predict_clips
from resemul_core.analysis.excitations import extract_excitations
from resemul_core.data.datasets import SegmentDataset
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.tagger import Tagger
from resemul_core.model.inference import BatchOutput, clip_average, run_model
from resemul_core.model.sample_cnn import build_model
from resemul_core.training.loop import validation_loss

L = 243  # 3 ** 5: input length of the 4-block test models
TAGS = ["x", "y", "z"]
CPU = torch.device("cpu")


def _model(name: str = "rese2-multi") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_tags=len(TAGS), width=1 / 16, num_blocks=4)
    # Non-trivial running statistics: eval-mode BatchNorm differs from training-mode BatchNorm.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def _batches(sizes=(4, 3), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, L, generator=generator) - 0.5 for n in sizes]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(3)
    counts = [2, 3, 1, 4, 2]  # clips hold different numbers of segments
    waveforms = [(rng.standard_normal((n, L)) * 0.2).clip(-1, 1).astype(np.float32) for n in counts]
    labels = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0]])
    return write_store_from_arrays(
        tmp_path_factory.mktemp("data") / "store",
        waveforms=waveforms,
        labels=labels,
        splits=["train", "test", "test", "test", "test"],
        tags=TAGS,
    )


# --- the loop -----------------------------------------------------------------------------


def test_the_loop_runs_in_eval_mode_and_restores_the_mode():
    model = _model().train()
    batches = _batches()
    modes = [
        (model.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        for _ in run_model(model, batches, device=CPU)
    ]  # the caller's code between batches runs in eval mode, outside inference mode
    assert modes == [(False, False, True)] * 2 and model.training

    loop = run_model(model, batches, device=CPU)
    next(loop)
    assert not model.training
    loop.close()  # left early
    assert model.training

    def failing():
        yield batches[0]
        raise RuntimeError("reader broke")

    with pytest.raises(RuntimeError, match="reader broke"):
        list(run_model(model, failing(), device=CPU))
    assert model.training
    model.eval()
    list(run_model(model, batches, device=CPU))
    assert not model.training  # an eval-mode model stays in eval mode


def test_the_loop_yields_float32_logits_and_hands_back_the_rest_of_each_batch():
    model = _model().eval()
    batches = _batches((4, 3, 1))
    items = [batches[0], (batches[1].numpy(), "labels", 7), [batches[2], None]]
    outputs = list(run_model(model, items, device=CPU))
    assert all(isinstance(out, BatchOutput) for out in outputs)
    assert [out.extra for out in outputs] == [(), ("labels", 7), (None,)]
    with torch.no_grad():
        for out, x in zip(outputs, batches, strict=True):
            assert out.logits.dtype == torch.float32 and not out.logits.requires_grad
            assert out.gates == []
            torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)


def test_precision_rule_fp32_is_plain_float32_and_bf16_is_autocast():
    model = _model().eval()
    (x,) = _batches((5,))
    with torch.no_grad():
        plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    (fp32_out,) = run_model(model, [x], device=CPU)
    (bf16_out,) = run_model(model, [x], device=CPU, precision="bf16")
    assert fp32_out.logits.dtype == bf16_out.logits.dtype == torch.float32
    torch.testing.assert_close(fp32_out.logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(bf16_out.logits, bf16, rtol=0, atol=0)
    assert not torch.equal(bf16_out.logits, plain)  # bf16 rounds: the rule is not a no-op
    assert not torch.is_autocast_enabled("cpu")  # the caller's code runs outside autocast
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        list(run_model(model, [x], device=CPU, precision="fp16"))


@pytest.mark.parametrize(("name", "num_gates"), [("rese2-multi", 4), ("se", 4), ("basic", 0)])
def test_gates_have_one_batch_by_channels_array_per_se_block(name, num_gates):
    model = _model(name).eval()
    (x,) = _batches((5,))
    (plain,) = run_model(model, [x], device=CPU)
    (out,) = run_model(model, [x], device=CPU, gates=True)
    channels = model.config.block_channels()
    assert [g.shape for g in out.gates] == [(5, c) for c in channels[:num_gates]]
    assert all(g.dtype == torch.float32 and ((g > 0) & (g < 1)).all() for g in out.gates)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)


# --- the clip average ---------------------------------------------------------------------


def test_clip_average_matches_hand_computed_means():
    probs = torch.tensor([[0.2, 0.4], [0.6, 0.8], [1.0, 0.0], [0.1, 0.3], [0.3, 0.5], [0.5, 0.1]])
    # clip 0: rows 0-1, clip 1: row 2, clip 2: rows 3-5
    expected = torch.tensor([[0.4, 0.6], [1.0, 0.0], [0.3, 0.3]])
    torch.testing.assert_close(clip_average(probs, [2, 1, 3]), expected)
    torch.testing.assert_close(clip_average(probs, torch.tensor([2, 1, 3])), expected)
    torch.testing.assert_close(clip_average(probs, [6]), probs.mean(dim=0, keepdim=True))
    assert clip_average(probs[:0], []).shape == (0, 2)
    with pytest.raises(ValueError, match="sum to 5, but there are 6 segments"):
        clip_average(probs, [2, 3])


# --- the four callers agree ---------------------------------------------------------------


def test_the_four_callers_agree_on_the_same_model(store):
    model = _model("se").train()
    test_clips = [1, 2, 3, 4]
    segments = {i: store.read_clip(i) for i in test_clips}  # (n_i, L) float32 each
    per_clip = {  # one batch per clip, through the loop directly
        i: next(run_model(model, [segments[i]], device=CPU, gates=True)) for i in test_clips
    }
    assert model.training

    # evaluation: one clip per batch, the same batches as above
    scores, labels, clips = predict_clips(model, store, clips_per_batch=1, progress=False)
    assert clips.tolist() == test_clips and model.training
    np.testing.assert_array_equal(labels, store.labels[test_clips])
    for row, i in zip(scores, clips, strict=True):
        expected = torch.sigmoid(per_clip[i].logits).mean(dim=0).numpy()
        np.testing.assert_array_equal(row, expected)

    # tagging a clip's audio gives its evaluation row
    tagger = Tagger(model, TAGS, segments_per_clip=None, device="cpu", batch_size=64)
    for row, i in zip(scores, clips, strict=True):
        np.testing.assert_array_equal(tagger.predict(segments[i].reshape(-1)), row)

    # validation: the mean over segments of the per-segment BCE
    model.train()
    loss = validation_loss(model, SegmentDataset(store, "test"), batch_size=4)
    assert model.training
    bce = torch.cat(
        [
            F.binary_cross_entropy_with_logits(
                per_clip[i].logits,
                torch.from_numpy(store.labels[i]).float().expand(len(segments[i]), -1),
                reduction="none",
            ).mean(dim=1)
            for i in test_clips
        ]
    )
    assert loss == pytest.approx(bce.double().mean().item(), rel=1e-6)

    # excitations: the clip means of the same gates
    result = extract_excitations(model, store, batch_size=3, segment_levels="all", progress=False)
    assert model.training
    for pos, level in enumerate(result.levels):
        by_clip = np.stack([per_clip[i].gates[pos].mean(dim=0).numpy() for i in test_clips])
        np.testing.assert_allclose(result.clip_level(level), by_clip, rtol=0, atol=1e-6)
        np.testing.assert_allclose(
            result.segment_level(level),
            np.concatenate([per_clip[i].gates[pos].numpy() for i in test_clips]),
            rtol=0,
            atol=1e-6,
        )
