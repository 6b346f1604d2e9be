"""Numerical precision of a run: one explicit setting, ``"fp32"``, ``"tf32"`` or ``"bf16"``.

Public: :data:`PRECISIONS`, :func:`check_precision`, :func:`autocast`,
:func:`configure_backends`.

The paper trained in float32. The three settings, from faithful to fast:

* ``fp32``: float32 everywhere; on CUDA, TF32 is switched *off* for convolutions and matmuls
  (PyTorch allows it for cuDNN convolutions by default, which would silently round their
  inputs to 10 bits of mantissa). The ``paper`` profile's setting.
* ``tf32``: float32 tensors, but CUDA convolutions and matmuls use TF32 tensor cores (Ampere
  and later). On the CPU identical to fp32.
* ``bf16``: bf16 autocast of the forward passes (training and validation), on CUDA and on the
  CPU; losses, BatchNorm statistics and the optimizer stay float32. The ``demo``, ``gpu`` and
  ``tiny`` profiles' setting (1.1-1.9x faster per step than fp32 on this project's CPUs at
  widths 1/16-1/8).

The measured cost of the fast settings (validation loss and ROC-AUC of the same short run in
fp32 and bf16) is in ``bench/RESULTS.md`` and on the book's training page.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "check_precision", "configure_backends"]

#: The precision settings, faithful first.
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; otherwise a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a forward pass: bf16 for ``"bf16"`` (CUDA and CPU), else none.

    bf16 keeps float32's exponent range, so no loss scaling is needed.
    """
    device = torch.device(device)
    if check_precision(precision) == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(device: torch.device | str, precision: str) -> None:
    """Set the process-wide CUDA switches for a run on ``device`` at ``precision``.

    On CUDA: TF32 for convolutions and matmuls on for ``"tf32"`` and ``"bf16"`` (it only touches
    what autocast leaves in float32), off for ``"fp32"``; cuDNN autotuning on (training shapes
    are fixed, so it pays from the second step), unless deterministic algorithms were asked for
    with ``torch.use_deterministic_algorithms(True)``, where autotuning could pick different
    kernels in different processes. Nothing to do on the CPU.

    Note:
        These switches are global to the process: a later run in the same process with another
        precision sets them again, and code that compares two settings (a benchmark baseline)
        belongs in its own process.
    """
    check_precision(precision)
    if torch.device(device).type != "cuda":
        return
    fast = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
