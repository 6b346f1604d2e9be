"""Settings shared by the tests: the device the training tests run on.

The tests run on the CPU, also on a machine with a GPU, so that a GPU never changes what they
compare. ``RESEMUL_TEST_DEVICE=cuda`` moves the training, resume and SIGKILL tests to CUDA
(``make gpu-check`` does), with deterministic kernels so that their bitwise comparisons hold.
"""

from __future__ import annotations

import dataclasses
import os

from resemul_core.config import TrainConfig

#: Where the training tests train: "cpu" unless RESEMUL_TEST_DEVICE says otherwise.
TEST_DEVICE = os.environ.get("RESEMUL_TEST_DEVICE", "cpu")
#: Deterministic kernels on CUDA: a resumed run must equal an uninterrupted one bit for bit.
TEST_DETERMINISTIC = TEST_DEVICE != "cpu"
if TEST_DETERMINISTIC:  # before any test makes a cuBLAS handle (train() sets it too, later)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pinned(config: TrainConfig) -> TrainConfig:
    """``config`` on the test device (profiles say "auto", which would pick a present GPU)."""
    return dataclasses.replace(config, device=TEST_DEVICE, deterministic=TEST_DETERMINISTIC)
