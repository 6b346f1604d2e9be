"""What ``bench/gpu_check.py`` and its check modules share: sizes, the context, verdicts.

A module of its own because ``gpu_check.py`` runs as ``__main__``: the check modules import
these classes from here, so that ``except CheckFailed`` in the runner catches theirs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ALL_VARIANTS = (
    "basic",
    "basic-multi",
    "se",
    "se-multi",
    "res1",
    "res1-multi",
    "res2",
    "res2-multi",
    "rese1",
    "rese1-multi",
    "rese2",
    "rese2-multi",
)


@dataclass(frozen=True)
class Sizes:
    """How big each check's work is: one set for a GPU, a reduced one for the CPU."""

    reduced: bool
    budget_s: float  # default time budget
    paper_clips: tuple[int, int, int]  # train/valid/test clips of the 59,049-sample tone store
    paper_segments: int  # segments per clip of that store
    pytest_select: str | None  # pytest -k expression of check 1 (None: every test)
    precision_width: float  # check 4
    precision_steps: int
    speed_store: str  # check 6: "paper" or "tiny" (243-sample segments, 4 blocks)
    speed_width: float
    speed_variants: tuple[str, ...]
    speed_steps: int  # timed steps per mode (in speed_chunks chunks)
    speed_warmup: int
    speed_chunks: int
    compile_warmup: int  # steps of compilation and CUDA graph recording before READY
    baseline_steps: int
    eval_segments: int  # segments of the timed validation call (MTAT: 15,290 per epoch)
    loader_workers: int
    timing_reserve_s: float  # check 6 stops waiting for compilations this long before the end
    book_profile: str  # check 7
    book_variants: tuple[str, ...]  # se-multi first (the excitation notebook reads it)
    synth_clips: int
    tag_width: float  # check 8
    ddp_store: str  # check 9
    ddp_profile: str
    ddp_steps: int  # steps per epoch
    ddp_epochs: int
    tiny_clips: tuple[int, int, int] = (48, 16, 16)
    tiny_segments: int = 4


GPU_SIZES = Sizes(
    reduced=False,
    budget_s=480.0,
    paper_clips=(64, 16, 16),
    paper_segments=10,
    pytest_select=None,
    precision_width=1.0,
    precision_steps=200,
    speed_store="paper",
    speed_width=1.0,
    speed_variants=ALL_VARIANTS,
    speed_steps=40,
    speed_warmup=5,
    speed_chunks=4,
    compile_warmup=5,
    baseline_steps=20,
    eval_segments=15_290,
    loader_workers=8,
    timing_reserve_s=120.0,
    book_profile="gpu",
    book_variants=("se-multi", "basic"),
    synth_clips=32,
    tag_width=0.25,
    ddp_store="paper",
    ddp_profile="paper",
    ddp_steps=28,
    ddp_epochs=3,
)
CPU_SIZES = Sizes(
    reduced=True,
    budget_s=300.0,
    paper_clips=(12, 6, 10),
    paper_segments=2,
    pytest_select="sigkill or stop_and_resume_gives",
    precision_width=1 / 16,
    precision_steps=6,
    speed_store="tiny",
    speed_width=1 / 16,
    speed_variants=("se-multi",),
    speed_steps=6,
    speed_warmup=2,
    speed_chunks=2,
    compile_warmup=2,
    baseline_steps=4,
    eval_segments=460,
    loader_workers=1,
    timing_reserve_s=40.0,
    book_profile="tiny",
    book_variants=("se-multi",),
    synth_clips=16,
    tag_width=1 / 16,
    ddp_store="tiny",
    ddp_profile="tiny",
    ddp_steps=3,
    ddp_epochs=2,
)


class CheckFailed(Exception):
    """A check's verdict FAIL: ``reason`` is one line, ``details`` go to the JSON."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.details = reason, details or {}


class CheckSkipped(Exception):
    """A check that cannot run here; the message says why."""


@dataclass
class Context:
    """What the checks share: the device, the sizes, a scratch folder, the clock, the data."""

    device: torch.device
    sizes: Sizes
    work: Path
    deadline: float  # time.monotonic() after which no check starts
    gpus: int
    variants: tuple[str, ...]
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    speed: Any = None  # check 6's worker processes, started before the other checks
    _stores: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def store(self, kind: str) -> Any:
        """The shared tone store, made once: ``"paper"`` (59,049-sample segments) or
        ``"tiny"`` (243 samples, a 4-block model)."""
        if kind not in self._stores:
            from precision import make_tone_store

            try:
                if kind == "paper":
                    self._stores[kind] = make_tone_store(
                        self.work / "tones",
                        clips=self.sizes.paper_clips,
                        segments_per_clip=self.sizes.paper_segments,
                    )
                else:
                    self._stores[kind] = make_tone_store(
                        self.work / "tiny",
                        clips=self.sizes.tiny_clips,
                        segments_per_clip=self.sizes.tiny_segments,
                        segment_length=243,
                    )
            except Exception as err:  # every check that needs it fails with this one reason
                self._stores[kind] = err
        if isinstance(self._stores[kind], Exception):
            err = self._stores[kind]
            raise CheckFailed(f"could not make the {kind} test store: {describe(err)}") from err
        return self._stores[kind]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, minimum: float = 60.0) -> float:
        """Seconds a subprocess of a check may take: the budget left plus a minute."""
        return max(minimum, self.remaining() + 60.0)


def describe(err: BaseException) -> str:
    """One sentence for an exception; a missing third-party package says how to get it."""
    if isinstance(err, ModuleNotFoundError) and err.name and not _is_ours(err.name):
        return (
            f"cannot import {err.name} ({err}); on an offline GPU host install the carried "
            "wheels (make gpu-wheels)"
        )
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()


def _is_ours(module: str) -> bool:
    """Whether a module name is this project's (the library or a bench/ module)."""
    top = module.split(".")[0]
    return top == "resemul_core" or (REPO / "bench" / f"{top}.py").is_file()
