"""Where and how a run computes: device choice, numerical precision, CUDA switches, compilation.

Public: :func:`select_device`, :data:`PRECISIONS`, :func:`check_precision`, :func:`autocast`,
:func:`configure_backends`, :func:`deterministic_algorithms`, :func:`compile_model`.

Every part of the library that runs a model (training, validation, evaluation, tagging, the
excitation analysis) takes its device and precision rules from here.

Precision is one explicit setting, ``"fp32"``, ``"tf32"`` or ``"bf16"``. The paper trained in
float32. The three settings, from faithful to fast:

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
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from resemul_core.config import PRECISIONS, check_device, check_precision

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_precision",
    "compile_model",
    "configure_backends",
    "deterministic_algorithms",
    "select_device",
]


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


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; otherwise as named.

    Raises:
        ValueError: a name that is no device (:func:`~resemul_core.config.check_device`), or a
            CUDA device that is not present.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_device(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} requested but there are only {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    return device


def compile_model(
    net: nn.Module, *, device: torch.device, distributed: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` a training model: forward and backward as fused kernels.

    On one CUDA device the compiled graphs are replayed as CUDA graphs
    (``mode="reduce-overhead"``): at batch 23 an eager step issues hundreds of small kernels
    and the host, not the GPU, limits the speed; a graph replay is one launch. Under DDP the
    default mode is used (DDP's gradient hooks run between the graphs). The loss, the
    optimizer step and the learning rate stay outside, eager, so the per-step learning rate
    is a plain float that neither recompiles nor syncs.

    Args:
        net: the model (or its DDP wrapper) in training mode; its ``state_dict`` keys are
            unchanged (save the model, not the returned callable).
        device: where it runs.
        distributed: whether ``net`` is a DDP wrapper.

    Returns:
        ``forward(waveform (B, L)) -> logits (B, T)``. Shapes stay fixed during training (every
        batch is full), so it compiles once per process, plus once per train/eval switch.
    """
    cuda_graphs = device.type == "cuda" and not distributed
    compiled = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def forward(waveform: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: reuse the graph's memory
        return compiled(waveform)

    return forward


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, and only if ``enabled``, PyTorch uses deterministic kernels only.

    For bitwise-reproducible CUDA runs (and resumes): cuDNN and cuBLAS pick deterministic
    algorithms and :func:`~resemul_core.runtime.configure_backends` turns autotuning off.
    Slower; CPU runs are reproducible without it. The previous setting is restored on exit.
    """
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    # cuBLAS reads this when its handle is made; without it deterministic mode raises
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
