"""Tests of resemul_core.model.inference: the one forward loop, the one clip average, and the
fast inference model (:func:`inference_model`, :mod:`resemul_core.model.fast_inference`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resemul_core.analysis.evaluate import predict_clips
from resemul_core.analysis.excitations import extract_excitations
from resemul_core.config import VARIANTS
from resemul_core.data.datasets import SegmentDataset
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.tagger import Tagger
from resemul_core.model import fast_inference
from resemul_core.model.fast_inference import FastSampleCNN, fold_batch_norm
from resemul_core.model.inference import (
    INFERENCE_PRECISIONS,
    BatchOutput,
    clip_average,
    inference_model,
    run_model,
)
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
    tagger = Tagger(model, TAGS, precision="fp32", device="cpu", batch_size=64)
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


# --- the fast inference model -------------------------------------------------------------

#: The "fast" path's tolerance (float32 rounding only), on logits, pooled outputs and gates.
FAST_TOL = {"rtol": 1e-4, "atol": 1e-4}
#: The "bf16" path's on the milder statistics of ``_model``: bfloat16 keeps 8 significant
#: bits (the adversarial statistics of ``_trained_like`` amplify its rounding far more).
BF16_TOL = {"rtol": 0.05, "atol": 0.05}


def _trained_like(name: str, *, num_blocks: int = 4, seed: int = 0) -> torch.nn.Module:
    """A small model whose every BatchNorm has non-trivial statistics and affine parameters.

    Running variances reach down to the Keras epsilon (1e-3), so that a fold that ignored
    ``eps`` (or mixed up mean and variance, gamma and beta) would change the outputs by far
    more than the tolerance.
    """
    torch.manual_seed(seed)
    model = build_model(name, num_tags=len(TAGS), width=1 / 16, num_blocks=num_blocks)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.0, 1.0).pow_(2).add_(1e-3)  # 1e-3 ... 1
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _digest(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_fold_batch_norm_equals_conv_then_eval_batch_norm():
    torch.manual_seed(1)
    conv = torch.nn.Conv1d(5, 7, kernel_size=3, padding=1)
    linear = torch.nn.Linear(6, 7)
    bn = torch.nn.BatchNorm1d(7, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(1e-4, 1e-2)  # of the order of eps: eps matters
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        x = torch.randn(3, 5, 11)
        weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
        torch.testing.assert_close(F.conv1d(x, weight, bias, padding=1), bn(conv(x)))
        features = torch.randn(4, 6)
        weight, bias = fold_batch_norm(linear.weight, linear.bias, bn)
        torch.testing.assert_close(F.linear(features, weight, bias), bn(linear(features)))
        weight, bias = fold_batch_norm(conv.weight, None, None)  # nothing to fold
        assert torch.equal(weight, conv.weight) and torch.equal(bias, torch.zeros(7))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_model_matches_the_reference_and_leaves_it_untouched(name):
    model = _trained_like(name).train()
    before = _digest(model)
    fast = inference_model(model)  # "fast" by default
    assert isinstance(fast, FastSampleCNN) and not fast.training
    assert model.training  # still in its mode, with the same weights and buffers
    _assert_same_state(before, model)

    model.eval()
    (x,) = _batches((5,), seed=2)
    with torch.no_grad():
        ref_logits, ref_pooled = model.forward_pooled(x)
        _, ref_gates = model.forward_with_gates(x)
        logits, pooled = fast.forward_pooled(x)
        _, gates = fast.forward_with_gates(x)
        plain = fast(x)
    assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, **FAST_TOL)
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    assert [p.shape for p in pooled] == [p.shape for p in ref_pooled]
    for mine, theirs in zip(pooled, ref_pooled, strict=True):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, **FAST_TOL)
    assert len(gates) == len(ref_gates) == (4 if model.config.has_se else 0)
    for mine, theirs in zip(gates, ref_gates, strict=True):
        torch.testing.assert_close(mine, theirs, **FAST_TOL)
    _assert_same_state(before, model)


@pytest.mark.parametrize("name", ["se-multi", "rese2", "res1-multi", "basic"])
def test_the_tolerance_would_catch_a_fold_that_ignored_eps(name):
    model = _trained_like(name).eval()
    careless = _trained_like(name).eval()
    for module in careless.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.eps = 0.0  # what folding without eps computes
    (x,) = _batches((5,), seed=2)
    with torch.no_grad():
        ref, wrong = model(x), careless(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, ref, **FAST_TOL)


@pytest.mark.parametrize("name", ["rese2-multi", "se", "res1"])
def test_fast_model_takes_every_input_shape_and_batch_size(name):
    model = _trained_like(name).eval()
    fast = inference_model(model)
    (x,) = _batches((3,), seed=4)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fast(x), ref, **FAST_TOL)  # (B, L)
        torch.testing.assert_close(fast(x.unsqueeze(1)), ref, **FAST_TOL)  # (B, 1, L)
        one_logits, one_pooled = fast.forward_pooled(x[1:2])  # batch of 1
        torch.testing.assert_close(one_logits, ref[1:2], **FAST_TOL)
        assert [p.shape[0] for p in one_pooled] == [1] * 4
        features = fast.forward_features(x)
        assert features.dtype == torch.float32
        torch.testing.assert_close(features, model.forward_features(x), **FAST_TOL)
        maps = fast.block_outputs(x)
        for mine, theirs in zip(maps, model.block_outputs(x), strict=True):
            torch.testing.assert_close(mine, theirs, **FAST_TOL)
    with pytest.raises(ValueError, match="expected a waveform of shape"):
        fast(x[:, :-1])


@pytest.mark.parametrize("name", ["rese2-multi", "se-multi", "res2", "basic"])
def test_micro_batches_give_the_same_outputs(name, monkeypatch):
    model = _trained_like(name, num_blocks=5).eval()
    x = torch.rand(5, 3**6, generator=torch.Generator().manual_seed(5)) - 0.5  # 5 blocks
    with torch.no_grad():
        ref_logits, ref_pooled = model.forward_pooled(x)
        assert inference_model(model)._micro_plan()[1] > 5  # small maps: one micro-batch
        # micro-batches of 2 segments (2 + 2 + 1) for every stage, then for the first three:
        # the stem's and block 1's conv outputs are 8 x 243 floats a segment (7,776 bytes),
        # block 2's 8 x 81 (2,592), block 3's 16 x 27 (1,728)
        monkeypatch.setattr(fast_inference, "MICRO_BATCH_BYTES", 2 * 7776)
        for limit, stages in ((0, 6), (4000, 3)):
            monkeypatch.setattr(fast_inference, "MICRO_STAGE_BYTES", limit)
            fast = inference_model(model)
            assert fast._micro_plan() == (stages, 2)
            logits, pooled = fast.forward_pooled(x)
            torch.testing.assert_close(logits, ref_logits, **FAST_TOL)
            for mine, theirs in zip(pooled, ref_pooled, strict=True):
                torch.testing.assert_close(mine, theirs, **FAST_TOL)
            _, gates = fast.forward_with_gates(x)
            _, ref_gates = model.forward_with_gates(x)
            for mine, theirs in zip(gates, ref_gates, strict=True):
                torch.testing.assert_close(mine, theirs, **FAST_TOL)


def test_fp32_is_the_model_itself_and_bf16_rounds_within_its_tolerance():
    model = _model("rese2-multi").train()
    before = _digest(model)
    (x,) = _batches((4,), seed=6)
    exact = inference_model(model, precision="fp32")
    assert exact is model and not model.training
    with torch.no_grad():
        ref_logits, ref_pooled = model.forward_pooled(x)
        assert torch.equal(exact(x), ref_logits)  # the reference itself, bit for bit
        bf16 = inference_model(model, precision="bf16")
        logits, pooled = bf16.forward_pooled(x)
    assert bf16.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, **BF16_TOL)
    assert not torch.equal(logits, ref_logits)  # it does round
    for mine, theirs in zip(pooled, ref_pooled, strict=True):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, **BF16_TOL)
    _assert_same_state(before, model)
    with pytest.raises(ValueError, match="unknown inference precision 'fp16'"):
        inference_model(model, precision="fp16")
    assert INFERENCE_PRECISIONS == ("fp32", "fast", "bf16")


def test_fast_model_is_inference_only_and_runs_through_the_loop():
    model = _trained_like("se").eval()
    fast = inference_model(model)
    assert inference_model(fast) is fast  # already fast
    with pytest.raises(ValueError, match="already made fast"):
        inference_model(fast, precision="bf16")
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    assert fast.eval() is fast and not any(p.requires_grad for p in fast.parameters())
    batches = _batches((4, 3))
    outputs = list(run_model(fast, batches, device=CPU, gates=True))
    with torch.no_grad():
        for out, x in zip(outputs, batches, strict=True):
            logits, gates = fast.forward_with_gates(x)
            torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
            assert len(out.gates) == len(gates) == 4
            torch.testing.assert_close(out.logits, model(x), **FAST_TOL)
    assert not fast.training


def test_off_the_cpu_the_model_itself_comes_back_in_eval_mode():
    with torch.device("meta"):
        model = build_model("se", num_tags=3, width=1 / 16, num_blocks=4)
    model.train()
    for precision in INFERENCE_PRECISIONS:
        assert inference_model(model, precision=precision) is model and not model.training
        model.train()
