"""The one forward loop: every pass of a model over data outside a training step.

Public: :func:`run_model`, :class:`BatchOutput`, :func:`clip_average`.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from resemul_core.runtime import autocast, configure_backends

__all__ = ["BatchOutput", "clip_average", "run_model"]

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
    """

    logits: torch.Tensor
    gates: list[torch.Tensor]
    extra: tuple[Any, ...]


def run_model(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    precision: str = "fp32",
    gates: bool = False,
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
        progress: show a tqdm bar over the batches.
        desc: the bar's label.

    Yields:
        :class:`BatchOutput`: float32 logits (and gates) on ``device``, computed under
        ``torch.inference_mode`` and, for "bf16", bf16 autocast; the caller's code between
        batches runs outside both.
    """
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
                if gates:
                    logits, block_gates = model.forward_with_gates(x)  # B, T; [(B, C_i)]
                else:
                    logits, block_gates = model(x), []  # B, T
                output = BatchOutput(logits.float(), [g.float() for g in block_gates], extra)
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
