"""The random generators of a training run: seeding them, saving and restoring their states.

Public: :func:`rng_state`, :func:`set_rng_state`, :func:`saved_cuda_rng_state`,
:func:`seed_everything`, :func:`rank_seed`.

A run draws from torch's CPU generator, the run device's CUDA generator, numpy's and Python's.
Their states are saved in every ``last.pt`` (:mod:`resemul_core.training.state`) and restored on
resume, so that a resumed CPU run ends with bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["rank_seed", "rng_state", "saved_cuda_rng_state", "seed_everything", "set_rng_state"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator a run draws from: torch's CPU one, the run device's CUDA one
    (only that one: the other visible GPUs are not the run's, and may be absent on resume),
    numpy's and Python's."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        # numpy and python states as plain lists so that weights_only loading accepts them
        "numpy": [
            str(np_state[0]),
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`'s generators; the CUDA one only on a CUDA device."""
    torch.set_rng_state(state["torch"])
    cuda = saved_cuda_rng_state(state["cuda"], device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def saved_cuda_rng_state(
    saved: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor | None:
    """The saved CUDA generator state to restore on ``device``, or None.

    Args:
        saved: a checkpoint's ``rng["cuda"]``: empty (saved on the CPU), the run device's one
            state, or, in checkpoints of earlier versions, one state per GPU visible then.
        device: the device the resumed run uses; ``cuda`` devices must carry their index.

    Returns:
        None on the CPU or when nothing was saved (a CPU run resumed on a GPU: the CUDA
        generator keeps the seed it has). Otherwise the one saved state, or from a per-GPU list the
        entry of ``device``'s index, or the first when that GPU was not visible then (a
        change of visible GPUs continues correctly, though with other dropout masks).
    """
    if device.type != "cuda" or len(saved) == 0:
        return None
    if len(saved) == 1:
        return saved[0]
    index = device.index or 0
    return saved[index] if index < len(saved) else saved[0]


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and CUDA), numpy's and Python's generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed (CPU and CUDA) of rank ``rank`` > 0 from ``step`` on: dropout masks
    independent of rank 0's."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
