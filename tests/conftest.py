"""Settings shared by the tests: the device the training tests run on.

The tests run on the CPU, also on a machine with a GPU, so that a GPU never changes what they
compare. ``RESEMUL_TEST_DEVICE=cuda`` moves the training, resume and SIGKILL tests to CUDA
(``make gpu-check`` does), with deterministic kernels so that their bitwise comparisons hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from resemul_core.config import RunConfig
from resemul_core.data.store import write_store_from_arrays
from resemul_core.profiles import apply_overrides, resolve_config

#: Where the training tests train: "cpu" unless RESEMUL_TEST_DEVICE says otherwise.
TEST_DEVICE = os.environ.get("RESEMUL_TEST_DEVICE", "cpu")
#: Deterministic kernels on CUDA: a resumed run must equal an uninterrupted one bit for bit.
TEST_DETERMINISTIC = TEST_DEVICE != "cpu"
if TEST_DETERMINISTIC:  # before any test makes a cuBLAS handle (train() sets it too, later)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pinned(config: RunConfig) -> RunConfig:
    """``config`` on the test device (profiles say "auto", which would pick a present GPU)."""
    return apply_overrides(config, {"device": TEST_DEVICE, "deterministic": TEST_DETERMINISTIC})


def pinned_config(
    variant: str,
    profile: str = "tiny",
    overrides: Mapping[str, Any] | None = None,
    *,
    num_tags: int,
    segment_length: int,
) -> RunConfig:
    """:func:`~resemul_core.profiles.resolve_config` for a store's tags and segment length,
    :func:`pinned` to the test device."""
    return pinned(
        resolve_config(
            variant, profile, overrides, num_tags=num_tags, segment_length=segment_length
        )
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A small store of 24 noise clips (16/4/4), 3 tags, 2 segments of 243 samples (the
    input of a 4-block model) each."""
    rng = np.random.default_rng(0)
    n = 24
    out = tmp_path_factory.mktemp("small") / "store"
    write_store_from_arrays(
        out,
        waveforms=[0.1 * rng.standard_normal((2, 3**5)).astype(np.float32) for _ in range(n)],
        labels=(rng.random((n, 3)) < 0.5).astype(np.uint8),
        splits=["train"] * 16 + ["valid"] * 4 + ["test"] * 4,
        tags=["a", "b", "c"],
    )
    return out
