"""Training-step benchmarks: our step in three modes against a plain baseline in its own process.

Our training step (:func:`~resemul_core.training.loop.train_step`, fed by
:func:`~resemul_core.training.feeding.device_batches` as
:func:`~resemul_core.training.loop.train` runs it, the
backends set by :func:`~resemul_core.runtime.configure_backends`, precision a parameter,
bf16 by default, the loss never read back) in one of :data:`MODES`:

* ``eager+loader``: int16 batches read by a ``DataLoader`` (pinned on CUDA), dequantized on
  the device;
* ``eager+resident``: the training split held on the device (``ResidentSplit``), batches
  gathered there;
* ``compiled+resident``: as above through :func:`~resemul_core.runtime.compile_model` (CUDA
  graphs on one GPU). Dynamo is reset first and made to fail rather than fall back to eager
  when it hits its recompile limit, and a compile that leaves no graph is an error.

The **baseline** is a plain loop as peer repositories write it: one decoded float32 ``.npy``
file per clip loaded per item (:class:`data_speed.NpyClips`), fp32, eager, ``loss.item()``
every step, PyTorch's default backend settings. It runs in a process of its own
(:func:`run_baseline_process`), because TF32 and cuDNN autotuning are process-wide switches
that our runs turn on.

Timing: ``warmup`` untimed steps, then ``steps`` timed steps in ``chunks`` consecutive chunks,
the device synchronised before every clock read; the figure is the median of the chunks'
segments/s (data loading included).

Command line, for :func:`run_baseline_process` (one JSON line per variant on stdout)::

    python bench/train_speed.py baseline --store S --npy DIR --variants basic,se ...

``bench/throughput.py`` runs :class:`OursRun` in worker processes that compile in parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from data_speed import NpyClips
from torch.utils.data import ConcatDataset, DataLoader, Subset

from resemul_core.config import TrainConfig, num_blocks_for
from resemul_core.data.datasets import SegmentBatches, SegmentDataset
from resemul_core.data.store import SegmentStore, open_store
from resemul_core.model.sample_cnn import build_model, count_parameters
from resemul_core.runtime import compile_model, configure_backends
from resemul_core.training.feeding import ResidentSplit, device_batches
from resemul_core.training.loop import train_step, validation_loss
from resemul_core.training.schedule import bce_loss, build_optimizer, epoch_batches

#: The ways "ours" is timed, slowest first.
MODES = ("eager+loader", "eager+resident", "compiled+resident")
REPO = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``: what a table cell can hold."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


def strict_compile() -> None:
    """Forget earlier compilations and make dynamo raise instead of silently running eager.

    Compiling many models in one process reaches dynamo's recompile limit, after which it
    falls back to eager with only a log warning; a benchmark must fail instead.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = torch._dynamo.config
    if hasattr(config, "suppress_errors"):
        config.suppress_errors = False  # incompatible with the switch below
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # new, old name
        if hasattr(config, name):
            setattr(config, name, True)
            break


def compile_stats() -> dict[str, int]:
    """Dynamo's counters: graphs compiled, frames compiled (a recompile adds one), breaks."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["total"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def timed_chunks(
    run: Callable[[int], None],
    *,
    steps: int,
    chunks: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Call ``run(n)`` on consecutive chunks of ``steps``; the median chunk's segments/s."""
    rates = []
    for size in np.array_split(np.arange(steps), max(1, min(chunks, steps))):
        synchronize(device)
        started = time.perf_counter()
        run(len(size))
        synchronize(device)
        rates.append(len(size) * batch_size / (time.perf_counter() - started))
    median = statistics.median(rates)
    return {
        "segments_per_s": median,
        "s_per_step": batch_size / median,
        "chunk_segments_per_s": [round(r, 1) for r in rates],
        "steps": steps,
    }


class OursRun:
    """One variant's model, optimizer and batch stream in one mode, ready to warm up and time.

    Args:
        variant: a key of :data:`~resemul_core.config.VARIANTS`.
        store: its training split is the data; the model fits its segment length.
        mode: one of :data:`MODES`.
        total_steps: steps the batch stream holds (warm-up and timed together).
    """

    def __init__(
        self,
        variant: str,
        *,
        store: SegmentStore,
        mode: str,
        width: float,
        batch_size: int,
        precision: str,
        device: torch.device,
        num_workers: int,
        total_steps: int,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        self.mode, self.device, self.precision = mode, device, precision
        self.batch_size = batch_size
        configure_backends(device, precision)  # what train() does: TF32, cuDNN autotuning
        torch.manual_seed(seed)
        blocks = num_blocks_for(store.segment_length)
        self.model = build_model(
            variant, num_tags=store.num_tags, width=width, num_blocks=blocks
        ).to(device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, TrainConfig(), stage=0)
        self.compiled = mode.startswith("compiled")
        if self.compiled:
            strict_compile()
            self.forward: Callable = compile_model(self.model, device=device)
        else:
            self.forward = self.model
        batches = SegmentBatches(store, "train")
        rows = epoch_batches(
            len(batches), batch_size=batch_size, num_steps=total_steps, seed=seed, epoch=0
        )
        resident = ResidentSplit(batches, device) if mode.endswith("resident") else None
        self.batches: Iterator = device_batches(
            batches, rows, device=device, num_workers=num_workers, resident=resident
        )

    @property
    def params(self) -> int:
        return count_parameters(self.model)

    def run(self, steps: int) -> None:
        """``steps`` training steps on the next batches of the stream."""
        for _ in range(steps):
            waveform, labels = next(self.batches)
            train_step(
                self.forward, self.optimizer, waveform, labels, lr=0.01, precision=self.precision
            )

    def warm_up(self, steps: int) -> float:
        """Untimed steps (compilation, CUDA graph recording, cuDNN autotuning); seconds.

        Raises:
            RuntimeError: a compiled mode ran without any compiled graph.
        """
        synchronize(self.device)
        started = time.perf_counter()
        self.run(steps)
        synchronize(self.device)
        if self.compiled and compile_stats()["unique_graphs"] == 0:
            raise RuntimeError("torch.compile produced no graph: the model ran eager")
        return time.perf_counter() - started

    def measure(self, steps: int, chunks: int) -> dict[str, Any]:
        """Segments/s over ``steps`` timed steps (see :func:`timed_chunks`)."""
        figures = timed_chunks(
            self.run, steps=steps, chunks=chunks, batch_size=self.batch_size, device=self.device
        )
        figures.update(mode=self.mode, precision=self.precision, params=self.params)
        if self.compiled:
            figures.update(compile_stats())
        return figures


def time_ours(
    variant: str,
    *,
    store: SegmentStore,
    mode: str,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str = "bf16",
    num_workers: int = 2,
    chunks: int = 5,
) -> dict[str, Any]:
    """Our training step in one mode: ``{"segments_per_s", "s_per_step", "params", ...}``."""
    run = OursRun(
        variant,
        store=store,
        mode=mode,
        width=width,
        batch_size=batch_size,
        precision=precision,
        device=device,
        num_workers=num_workers,
        total_steps=warmup + steps,
    )
    warmup_s = run.warm_up(warmup)
    return run.measure(steps, chunks) | {"warmup_s": warmup_s}


@torch.no_grad()
def time_validation(
    model: torch.nn.Module,
    store: SegmentStore,
    *,
    device: torch.device,
    precision: str,
    num_workers: int,
    segments: int,
    batch_size: int = 230,
) -> float:
    """Segments/s of one :func:`~resemul_core.training.loop.validation_loss` call (eval forward
    passes,
    its DataLoader's start and loading included) over ``segments`` segments, the training
    split's repeated, after a call over the split alone (cuDNN autotuning)."""
    dataset = SegmentDataset(store, "train")
    repeated = ConcatDataset([dataset] * math.ceil(segments / len(dataset)))
    kwargs = {"batch_size": batch_size, "device": device, "precision": precision}
    validation_loss(model, dataset, num_workers=num_workers, **kwargs)
    synchronize(device)
    started = time.perf_counter()
    validation_loss(model, Subset(repeated, range(segments)), num_workers=num_workers, **kwargs)
    synchronize(device)
    return segments / (time.perf_counter() - started)


def time_baseline(
    variant: str,
    *,
    npy: Path,
    store: SegmentStore,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    num_workers: int = 2,
    chunks: int = 5,
) -> dict[str, Any]:
    """The plain loop on the ``.npy`` files; ``{"segments_per_s", "s_per_step", "params"}``."""
    torch.manual_seed(0)
    blocks = num_blocks_for(store.segment_length)
    model = build_model(variant, num_tags=store.num_tags, width=width, num_blocks=blocks)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dataset = NpyClips(
        npy, segments_per_clip=store.segments_per_clip, segment_length=store.segment_length
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,  # the bench's few clips would restart them often
    )

    def endless() -> Iterator:
        while True:
            yield from loader

    stream = endless()
    running: list[float] = []

    def run(count: int) -> None:
        for _ in range(count):
            waveform, labels = next(stream)
            waveform, labels = waveform.to(device), labels.to(device)
            loss = bce_loss(model(waveform), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running.append(loss.item())  # the usual running-loss print: a sync every step

    run(warmup)
    figures = timed_chunks(run, steps=steps, chunks=chunks, batch_size=batch_size, device=device)
    return figures | {"params": count_parameters(model), "backends": backend_flags()}


def backend_flags() -> dict[str, bool]:
    """The process-wide switches that decide conv/matmul precision and kernel choice."""
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def child_env() -> dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` (absolute paths), so a child
    process imports the same ``resemul_core`` from any working directory."""
    entries = [str(REPO)] + [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))}


def run_baseline_process(
    variants: Sequence[str],
    *,
    store: Path,
    npy: Path,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    num_workers: int,
    chunks: int = 5,
    timeout: float | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`time_baseline` of every variant in one fresh Python process (PyTorch's default
    backend settings); ``{variant: figures}``, or ``{variant: {"error": ...}}``."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "baseline",
        f"--variants={','.join(variants)}",
        f"--npy={npy}",
        f"--store={store}",
        f"--width={width!r}",
        f"--batch-size={batch_size}",
        f"--steps={steps}",
        f"--warmup={warmup}",
        f"--device={device}",
        f"--workers={num_workers}",
        f"--chunks={chunks}",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=child_env()
        )
    except subprocess.TimeoutExpired:
        return {v: {"error": f"baseline process timed out after {timeout:.0f} s"} for v in variants}
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = {row.pop("variant"): row for row in rows}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    for variant in variants:
        results.setdefault(variant, {"error": f"baseline process exit {done.returncode}: {tail}"})
    return results


def _baseline_main(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    device = torch.device(args.device)
    for variant in args.variants.split(","):
        try:
            row = time_baseline(
                variant,
                npy=args.npy,
                store=store,
                width=args.width,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                device=device,
                num_workers=args.workers,
                chunks=args.chunks,
            )
        except Exception as err:  # one variant's failure is a row, not the end of the others
            row = {"error": first_line(err)}
        print(json.dumps({"variant": variant, **row}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``baseline``: :func:`time_baseline` of each variant, one JSON line each."""
    parser = argparse.ArgumentParser(description="the baseline's own process")
    sub = parser.add_subparsers(dest="command", required=True)
    add_timing_args(sub.add_parser("baseline"))
    sub.choices["baseline"].add_argument("--variants", required=True)
    sub.choices["baseline"].add_argument("--npy", type=Path, required=True)
    return _baseline_main(parser.parse_args(argv))


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """The options of a timing process (``baseline`` here, ``worker`` in throughput.py)."""
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=23)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=5)


if __name__ == "__main__":
    sys.exit(main())
