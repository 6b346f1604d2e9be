"""The CPU fast path (channels-last feature maps) computes what the plain (B, C, T) path does.

The reference is the same model with ``channels_last_on_cpu = False``: the unmodified modules
called on ``(B, C, T)`` maps. In float64 the two must agree to rounding (forward, every
gradient, BatchNorm buffers, dropout masks); in float32 the fast path must be no further from
the float64 result than the reference is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from resemul_core.model.sample_cnn import SampleCNN, build_model
from resemul_core.training.loop import train_step
from resemul_core.training.schedule import bce_loss

VARIANTS = ["basic", "se-multi", "res1", "res2", "rese2-multi"]


def _pair(name: str, *, num_blocks: int = 6) -> tuple[SampleCNN, SampleCNN]:
    """(fast, reference): the same weights, at demo width on short segments."""
    torch.manual_seed(0)
    fast = build_model(name, num_tags=10, width=1 / 16, num_blocks=num_blocks)
    reference = copy.deepcopy(fast)
    reference.channels_last_on_cpu = False
    return fast, reference


def _grads(model: SampleCNN) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _run(model: SampleCNN, waveform: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward with a fixed seed (same dropout draws); returns the logits."""
    torch.manual_seed(1)
    logits = model(waveform)
    bce_loss(logits, labels).backward()
    return logits.detach()


def _batch(model: SampleCNN, batch: int = 5, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(2)
    length = model.config.segment_length
    waveform = (torch.rand(batch, length, generator=generator) * 2 - 1).to(dtype)
    labels = (torch.rand(batch, model.config.num_tags, generator=generator) < 0.3).to(dtype)
    return waveform, labels


@pytest.mark.parametrize("name", VARIANTS)
def test_fast_path_equals_reference_in_float64(name: str) -> None:
    fast, reference = _pair(name)
    fast.double()
    reference.double()
    waveform, labels = _batch(fast, dtype=torch.float64)
    torch.testing.assert_close(_run(fast, waveform, labels), _run(reference, waveform, labels))
    fast_grads, reference_grads = _grads(fast), _grads(reference)
    assert fast_grads.keys() == reference_grads.keys()
    # biases ahead of a BatchNorm have a true gradient of 0: compare on the model's scale
    scale = max(g.abs().max().item() for g in reference_grads.values())
    for key, grad in reference_grads.items():
        torch.testing.assert_close(fast_grads[key], grad, atol=1e-10 * scale, rtol=1e-7, msg=key)
    for (key, a), b in zip(fast.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=key)  # BN running stats


@pytest.mark.parametrize("name", ["basic", "se-multi", "res2"])
def test_fast_path_float32_is_as_accurate_as_reference(name: str) -> None:
    fast, reference = _pair(name)
    exact = copy.deepcopy(reference).double()
    waveform, labels = _batch(fast)
    logits = _run(fast, waveform, labels)
    _run(reference, waveform, labels)
    _run(exact, waveform.double(), labels.double())
    torch.testing.assert_close(logits, _run(reference, waveform, labels), atol=1e-4, rtol=1e-4)
    exact_grads = _grads(exact)
    for key, truth in exact_grads.items():
        # on the tensor's scale, or the model's for biases ahead of a BN (true gradient 0)
        scale = max(
            truth.abs().max().item(), 1e-3 * max(g.abs().max().item() for g in exact_grads.values())
        )
        err_fast = (_grads(fast)[key].double() - truth).abs().max().item() / scale
        err_ref = (_grads(reference)[key].double() - truth).abs().max().item() / scale
        assert err_fast <= 10 * err_ref + 1e-4, (key, err_fast, err_ref)


def test_eval_mode_and_gates_match() -> None:
    fast, reference = _pair("rese2-multi")
    fast.eval()
    reference.eval()
    waveform, _ = _batch(fast)
    with torch.no_grad():
        logits, gates = fast.forward_with_gates(waveform)
        ref_logits, ref_gates = reference.forward_with_gates(waveform)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert len(gates) == len(ref_gates) == len(fast.blocks)
    for gate, ref_gate in zip(gates, ref_gates, strict=True):
        assert gate.shape == ref_gate.shape
        torch.testing.assert_close(gate, ref_gate, atol=1e-5, rtol=1e-4)


def test_fast_path_is_taken_on_cpu() -> None:
    """The stem and blocks hand on channels-last maps (else oneDNN's slow kernels run)."""
    fast, _ = _pair("res2")
    waveform, _ = _batch(fast)
    h = fast.stem(waveform.view(waveform.shape[0], 1, 1, -1))
    assert h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last)
    for block in fast.blocks:
        h, _ = block(h)
        assert h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last)
    # the 3-D (B, C, T) interface of the modules is unchanged
    maps = fast.block_outputs(waveform)
    assert [m.dim() for m in maps] == [3] * (len(fast.blocks) + 1)


def test_state_dict_is_unchanged_and_loads_both_ways() -> None:
    fast, reference = _pair("rese2")
    keys = list(reference.state_dict())
    assert list(fast.state_dict()) == keys
    assert not any("channels_last" in k for k in keys)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    waveform, labels = _batch(fast)
    _run(fast, waveform, labels)  # a pass must not add or reshape anything
    assert {k: tuple(v.shape) for k, v in fast.state_dict().items()} == shapes
    reference.load_state_dict(fast.state_dict())
    fast.load_state_dict(reference.state_dict())


def _two_steps(model: SampleCNN, precision: str) -> list[torch.Tensor]:
    """The parameter updates of two ``train_step`` calls (fixed seed, fixed batch)."""
    initial = [p.detach().clone() for p in model.parameters()]
    waveform, labels = _batch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for _ in range(2):
        torch.manual_seed(3)
        train_step(model, optimizer, waveform, labels, lr=0.01, precision=precision)
    return [(p - p0).detach() for p, p0 in zip(model.parameters(), initial, strict=True)]


def test_train_step_on_cpu_matches_a_plain_step() -> None:
    """fp32: the fast step is the plain step. bf16: it is no further from the fp32 step than
    the plain computation under bf16 autocast is (only the rounding differs)."""
    fast, reference = _pair("se")
    exact = _two_steps(copy.deepcopy(reference), "fp32")
    plain_bf16 = _two_steps(copy.deepcopy(reference), "bf16")
    names = [n for n, _ in fast.named_parameters()]
    for key, a, b in zip(names, _two_steps(copy.deepcopy(fast), "fp32"), exact, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=key)
    fast_bf16 = _two_steps(fast, "bf16")
    for key, a, b, truth in zip(names, fast_bf16, plain_bf16, exact, strict=True):
        if key.endswith(".bias") and ("conv" in key or "fc1" in key):
            continue  # ahead of a BN: true gradient 0, the update is rounding noise
        assert (a - truth).norm() <= 3 * (b - truth).norm() + 0.02 * truth.norm(), key
