"""The one forward loop: every pass of a model over data outside a training step.

Public: :func:`run_model`, :class:`BatchOutput`, :func:`clip_average`, :func:`inference_model`,
:data:`INFERENCE_PRECISIONS`.

Validation during training (:func:`~resemul_core.training.loop.validation_loss`), clip-level
evaluation (:func:`~resemul_core.analysis.evaluate.predict_clips`), tagging
(:meth:`~resemul_core.interfaces.tagger.Tagger.predict`) and the excitation analysis
(:func:`~resemul_core.analysis.excitations.extract_excitations`) all run the model through
:func:`run_model`: eval mode (dropout off, BatchNorm frozen) for the duration, no autograd,
one precision rule, batches copied to the device without blocking, float32 outputs.

The precision rule: evaluation, tagging and excitation extraction run in ``"fp32"`` (the
paper's numbers are float32 ones; on CUDA that also means TF32 off); validation during
training runs in the training's precision (``TrainConfig.precision``: it is part of the
recipe's loop). :func:`run_model` applies whichever it is given through
:func:`~resemul_core.runtime.configure_backends` and :func:`~resemul_core.runtime.autocast`.

The device: callers pass a resolved ``torch.device``; user-facing functions take a string
(``"auto"``, ``"cpu"``, ``"cuda:1"``) and resolve it with
:func:`~resemul_core.runtime.select_device`.

A clip's prediction is the mean over its segments of the sigmoid outputs (the test protocol
of specification §3): :func:`clip_average`.

Tagging can trade exactness for speed: :func:`inference_model` gives a copy of a model that
computes the same function faster on the CPU (BatchNorm folded into the convolutions, ReLUs
in place, micro-batches; :mod:`resemul_core.model.fast_inference`), to the tolerance its
docstring states. Run it through :func:`run_model` at precision ``"fp32"``: the copy carries
its own precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from resemul_core.model.fast_inference import FastSampleCNN
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.runtime import autocast, configure_backends

__all__ = ["INFERENCE_PRECISIONS", "BatchOutput", "clip_average", "inference_model", "run_model"]

#: The precisions of :func:`inference_model`, faithful first.
INFERENCE_PRECISIONS = ("fp32", "fast", "bf16")

#: One item of :func:`run_model`'s input: a ``(B, L)`` float waveform batch (tensor or array),
#: or a tuple/list whose first item is one (the other items are handed back untouched).
Batch = torch.Tensor | np.ndarray | tuple[Any, ...] | list[Any]


class BatchOutput(NamedTuple):
    """What :func:`run_model` yields for one batch: three fields.

    * ``logits``: ``(B, T)`` float32, on the device.
    * ``gates``: one ``(B, C_i)`` float32 tensor per SE block in block order, on the device,
      with ``gates=True``; otherwise (and for variants without SE) an empty list.
    * ``extra``: the batch's items after the waveform (labels, clip counts, ...), untouched;
      ``()`` for a bare waveform batch.
    * ``pooled``: with ``pooled=True``, every block's output max-pooled over time, one
      ``(B, C_i)`` float32 tensor per block, block 1 first (the embeddings); otherwise ``[]``.
    """

    logits: torch.Tensor
    gates: list[torch.Tensor]
    extra: tuple[Any, ...]
    pooled: list[torch.Tensor] = []


def run_model(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    precision: str = "fp32",
    gates: bool = False,
    pooled: bool = False,
    progress: bool = False,
    desc: str = "inference",
) -> Iterator[BatchOutput]:
    """Run ``model`` over ``batches``, one :class:`BatchOutput` per batch, in order.

    Args:
        model: maps ``(B, L)`` waveforms to ``(B, T)`` logits (a
            :class:`~resemul_core.model.sample_cnn.SampleCNN`), already on ``device``.
            In eval mode while the loop runs; its previous mode is restored when the loop
            ends, is closed or raises.
        batches: ``(B, L)`` float waveform batches (tensors or arrays), or tuples/lists whose
            first item is one; batch sizes may vary.
        device: where the model is; each waveform batch is copied there without blocking.
        precision: "fp32", "tf32" or "bf16" (:mod:`resemul_core.runtime`); see the module
            docstring for which caller uses which.
        gates: call ``model.forward_with_gates`` and also yield the SE gates.
        pooled: call ``model.forward_pooled`` and also yield every block's pooled output
            (not together with ``gates``).
        progress: show a tqdm bar over the batches.
        desc: the bar's label.

    Yields:
        :class:`BatchOutput`: float32 logits (and gates) on ``device``, computed under
        ``torch.inference_mode`` and, for "bf16", bf16 autocast; the caller's code between
        batches runs outside both.
    """
    if gates and pooled:
        raise ValueError("run_model yields gates or pooled block outputs, not both")
    configure_backends(device, precision)
    was_training = model.training
    model.eval()
    try:
        for item in tqdm(batches, desc=desc, leave=False, disable=not progress):
            if isinstance(item, (tuple, list)):
                waveform, extra = item[0], tuple(item[1:])
            else:
                waveform, extra = item, ()
            with torch.inference_mode(), autocast(device, precision):
                x = torch.as_tensor(waveform).to(device, non_blocking=True)  # B, L
                block_gates: list[torch.Tensor] = []
                block_pools: list[torch.Tensor] = []
                if gates:
                    logits, block_gates = model.forward_with_gates(x)  # B, T; [(B, C_i)]
                elif pooled:
                    logits, block_pools = model.forward_pooled(x)  # B, T; [(B, C_i)]
                else:
                    logits = model(x)  # B, T
                output = BatchOutput(
                    logits.float(),
                    [g.float() for g in block_gates],
                    extra,
                    [p.float() for p in block_pools],
                )
            yield output
    finally:
        model.train(was_training)


def clip_average(probabilities: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Clip-level predictions: the mean of each clip's segment probabilities.

    Args:
        probabilities: ``(N, T)`` per-segment sigmoid outputs, the segments of clip 0 first,
            then those of clip 1, ...
        counts: ``(K,)`` segments per clip, summing to ``N``.

    Returns:
        ``(K, T)`` per-clip means, in the dtype and on the device of ``probabilities``
        (a clip with no segments gets NaN).

    Raises:
        ValueError: ``counts`` does not sum to ``N``.
    """
    counts = [int(c) for c in counts]
    if sum(counts) != probabilities.shape[0]:
        raise ValueError(
            f"clip counts sum to {sum(counts)}, but there are {probabilities.shape[0]} segments"
        )
    if not counts:
        return probabilities.new_zeros((0, *probabilities.shape[1:]))
    return torch.stack([p.mean(dim=0) for p in torch.split(probabilities, counts)])  # K, T


def inference_model(model: SampleCNN, *, precision: str = "fast") -> SampleCNN:
    """A model for inference only (tagging, embeddings), as fast as ``precision`` allows.

    Args:
        model: a trained :class:`~resemul_core.model.sample_cnn.SampleCNN`, any variant,
            width and number of blocks.
        precision: one of :data:`INFERENCE_PRECISIONS`:

            * ``"fp32"``: the exact reference: ``model`` itself, switched to eval mode.
            * ``"fast"``: on the CPU, a float32
              :class:`~resemul_core.model.fast_inference.FastSampleCNN`: BatchNorm folded into
              the convolutions and the head's ``fc1``, ReLUs and additions in place, cheaper
              max-pooling, and micro-batches of one segment (at paper width) through the
              first, large maps. The same function up to float32 rounding. **Tolerance:
              probabilities (per segment and clip means) within 1e-4 of the reference's,
              pooled outputs and gates within 1e-4 relative to their largest value.** Measured
              at paper width (all twelve variants, se-multi and rese2-multi over 4 seeds,
              random weights with BN statistics of synthetic music) and on 20 trained
              width-1/16 and 1/8 checkpoints: at most 3e-5 per segment, 3e-6 in clip means,
              1e-5 relative in pooled outputs. Speed on 2 cores: about 3x the eager float32
              forward (10 paper-width se-multi segments: 0.11 s against 0.33 s; rese2-multi
              0.22 s against 0.70 s; ``bench/tag_forward_speed.py``).
            * ``"bf16"``: the same copy with bfloat16 maps and weights (float32 head), about
              1.9x faster again (5-6.5x the eager float32 forward), but only as faithful as
              bf16 autocast, i.e. **not** to float32: in the same measurements its clip
              probabilities differ from the reference's by 0.003-0.046 (trained checkpoints:
              up to 0.026), per-segment probabilities by 0.01-0.32; autocast's own
              differences are the same size.

            On any other device than the CPU, ``"fast"`` and ``"bf16"`` also return ``model``
            in eval mode: a GPU runs the float32 model fast as it is, and for ``"bf16"`` the
            caller applies bf16 autocast itself (``run_model``'s ``precision="bf16"``), as
            :class:`~resemul_core.interfaces.tagger.Tagger` does.

    Returns:
        a :class:`~resemul_core.model.sample_cnn.SampleCNN`: ``fast(x)`` gives float32 logits
        ``(B, num_tags)`` and ``fast.forward_pooled(x)`` float32 ``(logits, [(B, C_i), ...])``
        for ``x`` of shape ``(B, L)`` or ``(B, 1, L)``, as the original does. A fast copy
        leaves ``model`` untouched (weights, buffers and mode), is always in eval mode
        (``train()`` raises), and is on the CPU; it shares no memory with ``model``, so later
        changes to ``model`` do not reach it. Building one takes 0.01-0.07 s at paper width
        and raises glibc's ``malloc`` mmap threshold for the process, once (so that freed
        maps are reused rather than faulted in anew; see ``fast_inference``).

    Raises:
        ValueError: an unknown precision, or a fast copy asked for another precision than
            its own.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"unknown inference precision {precision!r}; valid: {', '.join(INFERENCE_PRECISIONS)}"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if isinstance(model, FastSampleCNN):
        if precision != "fp32" and model.dtype == dtype:
            return model
        raise ValueError(f"{precision!r} asked of a model already made fast in {model.dtype}")
    device = next(model.parameters()).device
    if precision == "fp32" or device.type != "cpu":
        return model.eval()
    return FastSampleCNN(model, dtype=dtype)
